"""megatron_lite.tools.plot_log and compare_logs --plot: the curves read from logs (restarts
found), and a figure written with one curve per run and the marks."""

from __future__ import annotations

import struct

import pytest

from megatron_lite.tools import plot_log
from tests.unit_tests.test_compare_logs import iteration_line, run_log, write


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", head
    return struct.unpack(">II", head[16:24])


def test_restarts_are_found_by_a_going_back_iteration_and_by_a_recovery_report(tmp_path):
    lines = run_log(range(1, 6)) + run_log(range(4, 9)) + ["checkpoint recovery report for /ck"] + run_log(range(9, 13))
    curves = plot_log.read_curves(write(tmp_path / "run.log", lines))
    assert curves.restarts == [4, 9]
    assert sorted(curves.loss) == list(range(1, 13))
    assert curves.loss[7] == pytest.approx(5.0 - 0.7) and curves.lr[7] == pytest.approx(7e-4)


def test_plot_log_writes_one_figure_of_every_run(tmp_path, capsys):
    a = write(tmp_path / "a.log", run_log(range(1, 13)))
    b = write(tmp_path / "b.log", run_log(range(1, 13), loss_of=lambda it: 5.1 - 0.1 * it))
    out = tmp_path / "loss.png"
    assert plot_log.main([a, b, "--out", str(out)]) == 0
    width, height = _png_size(out)
    assert "a.log (12 iterations), b.log (12 iterations)" in capsys.readouterr().out
    assert plot_log.main([a, "--out", str(tmp_path / "loss_only.png"), "--no-lr"]) == 0
    assert _png_size(tmp_path / "loss_only.png")[1] < height   # one panel instead of two
    assert width > 0


def test_plot_log_says_what_is_wrong_with_a_log(tmp_path, capsys):
    empty = write(tmp_path / "empty.log", ["no iteration lines here"])
    assert plot_log.main([empty, "--out", str(tmp_path / "x.png")]) == 2
    assert "holds no iteration line" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_compare_logs_plot_marks_the_first_difference(tmp_path, monkeypatch):
    from megatron_lite.tools import compare_logs

    a = write(tmp_path / "a.log", run_log(range(1, 13)))
    b = write(tmp_path / "b.log", run_log(range(1, 13), loss_of=lambda it: 5.0 - 0.1 * it + (0.5 if it >= 7 else 0)))
    drawn = {}
    real = plot_log.plot

    def spy(runs, out, **kw):
        drawn.update(kw, runs=[r.label for r in runs])
        return real(runs, out, **kw)

    monkeypatch.setattr(plot_log, "plot", spy)
    out = tmp_path / "cmp.png"
    assert compare_logs.main([a, b, "--plot", str(out)]) == 1
    assert drawn["first_difference"] == 7 and drawn["runs"] == ["a.log", "b.log"]
    _png_size(out)
    line = iteration_line(1, 1e-4, 4.9)
    assert plot_log.read_curves(write(tmp_path / "one.log", [line])).restarts == []
