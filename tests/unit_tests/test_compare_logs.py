"""megatron_lite.tools.compare_logs on synthetic logs: verdicts, the first difference, restarts, bad input."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron_lite.tools import compare_logs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def iteration_line(it: int, lr: float, loss: float, total: int = 12) -> str:
    """One iteration line in Megatron's shape, as training.format_log_line prints it."""
    return (f" iteration {it:8d}/{total:8d} | consumed samples: {8 * it:12d} | elapsed time per iteration (ms): "
            f"12.5 | learning rate: {lr:.6E} | global batch size:     8 | lm loss: {loss:.6E} | loss scale: 1.0 | "
            f"grad norm: 1.234 | number of skipped iterations:   0 | number of nan iterations:   0 |")


def run_log(iterations, loss_of=lambda it: 5.0 - 0.1 * it, lr_of=lambda it: 1e-4 * it) -> list:
    return [iteration_line(it, lr_of(it), loss_of(it)) for it in iterations]


def write(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def compare(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = compare_logs.main([str(a) for a in argv])
    return status, out.getvalue().splitlines(), err.getvalue()


def test_identical_runs_match_with_exit_status_0(tmp_path):
    a = write(tmp_path / "a.log", run_log(range(1, 13)))
    b = write(tmp_path / "b.log", run_log(range(1, 13)))
    status, out, _ = compare(a, b)
    assert status == 0
    assert out[-1] == "MATCH: iterations 1-12 identical (lr, loss)"
    rows = [line.split() for line in out if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(1, 13))
    assert rows[6] == ["7", "7.000000E-04", "7.000000E-04", "4.300000E+00", "4.300000E+00"]


def test_first_difference_is_reported_with_exit_status_1(tmp_path):
    a = write(tmp_path / "a.log", run_log(range(1, 13), loss_of=lambda it: 4.853209))
    b = write(tmp_path / "b.log", run_log(range(1, 13), loss_of=lambda it: 4.853209 if it < 7 else 4.863209))
    status, out, _ = compare(a, b)
    assert status == 1
    assert out[-1] == "DIFFER: first difference at iteration 7: loss 4.853209E+00 vs 4.863209E+00"
    marked = [line.split()[0] for line in out if line.endswith("<- loss differs")]
    assert marked == [str(it) for it in range(7, 13)]


def test_a_learning_rate_difference_is_named_with_the_loss(tmp_path):
    a = write(tmp_path / "a.log", run_log(range(1, 6)))
    b = write(tmp_path / "b.log", run_log(range(1, 6), lr_of=lambda it: 1e-4 * it if it != 3 else 2e-4,
                                          loss_of=lambda it: 5.0 - 0.1 * it if it != 3 else 1.0))
    status, out, _ = compare(a, b)
    assert status == 1
    assert out[-1] == ("DIFFER: first difference at iteration 3: lr 3.000000E-04 vs 2.000000E-04, "
                       "loss 4.700000E+00 vs 1.000000E+00")


def test_rtol_accepts_small_differences_and_rejects_larger_ones(tmp_path):
    a = write(tmp_path / "a.log", run_log(range(1, 5), loss_of=lambda it: 4.853209))
    b = write(tmp_path / "b.log", run_log(range(1, 5), loss_of=lambda it: 4.863209))   # relative 2.06e-3
    status, out, _ = compare(a, b, "--rtol", "3e-3")
    assert (status, out[-1]) == (0, "MATCH: iterations 1-4 equal within rtol 0.003 (lr, loss)")
    status, out, _ = compare(a, b, "--rtol", "1e-3")
    assert (status, out[-1]) == (1, "DIFFER: first difference at iteration 1: loss 4.853209E+00 vs 4.863209E+00")


def test_restart_overlap_takes_the_later_occurrence(tmp_path):
    straight = write(tmp_path / "straight.log", run_log(range(1, 13)))
    # killed after iteration 8 with its last save at 6: iterations 7-8 run twice, the first time
    # with values the restarted run does not reproduce (they are lost work)
    lost = run_log([7, 8], loss_of=lambda it: 9.0)
    resumed = write(tmp_path / "resumed.log",
                    run_log(range(1, 7)) + lost + ["checkpoint recovery report ..."] + run_log(range(7, 13)))
    status, out, _ = compare(straight, resumed)
    assert status == 0
    assert f"note: {resumed}: iterations 7-8 appear more than once (a restart); the later occurrence of each is used" \
        in out
    assert out[-1] == "MATCH: iterations 1-12 identical (lr, loss)"
    # the other way round: the restart is what gets compared, so a difference there is found
    bad_restart = write(tmp_path / "bad.log", run_log(range(1, 9)) + run_log([7, 8], loss_of=lambda it: 9.0))
    status, out, _ = compare(straight, bad_restart)
    assert (status, out[-1]) == (1, "DIFFER: first difference at iteration 7: loss 4.300000E+00 vs 9.000000E+00")


def test_concatenated_logs_of_an_interrupted_and_a_resumed_run(tmp_path):
    straight = write(tmp_path / "straight.log", run_log(range(1, 13)))
    first = write(tmp_path / "first.log", ["=== start", "fused ops: all torch"] + run_log(range(1, 6)) +
                  ["exiting at iteration 5 on a signal"])
    second = write(tmp_path / "second.log", ["=== start"] + run_log(range(6, 13)))
    both = write(tmp_path / "both.log", [open(first).read() + open(second).read()])
    status, out, _ = compare(straight, both)
    assert (status, out[-1]) == (0, "MATCH: iterations 1-12 identical (lr, loss)")


def test_prefixes_and_other_lines_are_ignored(tmp_path):
    lines = ["W1122 torch/distributed/run.py:874] *****", " validation loss at iteration 2 | lm loss value: 1.0E+00 |",
             "saved checkpoint at iteration 2 to runs/pretrain in 0.02 s (0.5 MB)"]
    prefixed = [f"[default0]:{line}" for line in run_log(range(1, 4))]
    a = write(tmp_path / "a.log", lines + prefixed)
    b = write(tmp_path / "b.log", run_log(range(1, 4)))
    assert compare_logs.parse_log(a).values == compare_logs.parse_log(b).values
    assert compare_logs.parse_log(a).values[2] == {"lr": "2.000000E-04", "loss": "4.800000E+00"}
    status, out, _ = compare(a, b)
    assert (status, out[-1]) == (0, "MATCH: iterations 1-3 identical (lr, loss)")


def test_iterations_in_one_log_only_are_noted_and_the_verdict_names_the_overlap(tmp_path):
    a = write(tmp_path / "a.log", run_log(range(1, 13)))
    b = write(tmp_path / "b.log", run_log(range(1, 7)))
    status, out, _ = compare(a, b, "--quiet")
    assert status == 0
    assert out == [f"note: only in {a}: iterations 7-12", "MATCH: iterations 1-6 identical (lr, loss)"]


def test_no_iteration_in_common_is_a_difference(tmp_path):
    a = write(tmp_path / "a.log", run_log(range(1, 6)))
    b = write(tmp_path / "b.log", run_log(range(6, 11)))
    status, out, _ = compare(a, b)
    assert status == 1
    assert out[-1] == f"DIFFER: no iteration in common ({a}: 1-5; {b}: 6-10)"


def test_a_missing_loss_differs_from_a_printed_one(tmp_path):
    a = write(tmp_path / "a.log", run_log(range(1, 3)))
    b = write(tmp_path / "b.log", [run_log([1])[0], run_log([2])[0].replace("| lm loss: 4.800000E+00 ", "")])
    status, out, _ = compare(a, b)
    assert (status, out[-1]) == (1, "DIFFER: first difference at iteration 2: loss 4.800000E+00 vs missing")


def test_bad_input_exits_2_with_a_message(tmp_path):
    good = write(tmp_path / "good.log", run_log(range(1, 3)))
    status, out, err = compare(good, tmp_path / "missing.log")
    assert status == 2 and out == []
    assert err.startswith(f"compare_logs.py: error: cannot read {tmp_path / 'missing.log'}: No such file")
    empty = write(tmp_path / "empty.log", ["fused ops: all torch", "checkpoint: nothing to load"])
    status, out, err = compare(empty, good)
    assert status == 2
    assert f"{empty} holds no iteration line" in err and "--log-interval" in err
    with pytest.raises(SystemExit) as exc:
        compare(good, good, "--rtol", "-1")
    assert exc.value.code == 2


def test_format_ranges():
    assert compare_logs.format_ranges([8, 7, 1, 2, 3, 5]) == "1-3, 5, 7-8"
    assert compare_logs.format_ranges([4]) == "4"


def test_parses_what_the_training_loop_prints():
    from megatron_lite.training import format_log_line

    run = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(global_batch_size=8),
                                              model=SimpleNamespace(seq_length=64)),
                          progress=SimpleNamespace(consumed_train_samples=40, skipped_iterations=0, nan_iterations=0))
    step = {"grad_norm": 1.5, "lm loss": 4.8532094, "loss_scale": 1.0}
    line = format_log_line(run, 5, 12, step, 12.5, 9.999978e-4)
    assert compare_logs.parse_line(line) == (5, {"lr": "9.999978E-04", "loss": "4.853209E+00"})


@pytest.mark.parametrize("command", [[os.path.join(REPO, "tools", "compare_logs.py")],
                                     ["-m", "megatron_lite.tools.compare_logs"]], ids=["wrapper", "module"])
def test_runs_as_a_command(tmp_path, command):
    """tools/compare_logs.py (the old path) and `python -m megatron_lite.tools.compare_logs` give its verdicts."""
    a = write(tmp_path / "a.log", run_log(range(1, 4)))
    b = write(tmp_path / "b.log", run_log(range(1, 4), loss_of=lambda it: 5.0 - 0.2 * it))
    same = subprocess.run([sys.executable, *command, a, a, "--quiet"], capture_output=True, text=True, cwd=REPO)
    assert same.returncode == 0, same.stderr
    assert same.stdout.strip().splitlines()[-1] == "MATCH: iterations 1-3 identical (lr, loss)"
    differ = subprocess.run([sys.executable, *command, a, b, "--quiet"], capture_output=True, text=True, cwd=REPO)
    assert differ.returncode == 1 and differ.stdout.strip().splitlines()[-1].startswith(
        "DIFFER: first difference at iteration 1: loss")
