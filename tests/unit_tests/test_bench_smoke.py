"""The GPU benchmarks (bench/train_throughput.py, bench/checkpoint_io.py) run end to end on a CPU
with --tiny, and their printed tables hold every expected row with finite positive numbers."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench.common import REFERENCE, TINY, param_counts  # noqa: E402
from bench.train_throughput import PlainGPT  # noqa: E402


def run_bench(script: str, out_dir, *args: str) -> str:
    env = dict(os.environ, OUT=str(out_dir), PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--tiny", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def table(text: str, first_header: str) -> list:
    """The body rows (lists of cells) of the printed Markdown table whose first header is `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} "))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    value = float(cell.replace(",", "").rstrip("x"))
    assert math.isfinite(value) and value > 0, f"{cell!r} is not a finite positive number"
    return value


def test_param_counts_match_the_plain_model_at_reference_size():
    with torch.device("meta"):
        model = PlainGPT(REFERENCE)
    assert sum(p.numel() for p in model.parameters()) == param_counts(REFERENCE)["total"] == 886_114_304


def test_train_throughput_tiny_prints_every_candidate_with_positive_numbers(tmp_path):
    out = run_bench("train_throughput.py", tmp_path, "--steps", "2", "--warmup", "1", "--compile-backend", "aot_eager",
                    "--megatron-lite-variant", "sel=--recompute-granularity selective --recompute-modules layernorm",
                    "--megatron-lite-variant", "fp8=--fp8-format hybrid --fp8-recipe tensorwise")
    rows = {r[0]: r for r in table(out, "candidate")}
    assert list(rows) == ["megatron_lite", "megatron_lite[sel]", "megatron_lite[fp8]", "torch_eager", "torch_compile",
                          "torchao_float8", "megatron_core"]
    for name in ("megatron_lite", "megatron_lite[sel]", "megatron_lite[fp8]", "torch_eager", "torch_compile"):
        tokens_per_s, mfu, memory, step_ms, params_m, loss = (number(c) for c in rows[name][1:])
        assert loss == pytest.approx(math.log(TINY.vocab_size), rel=0.1)   # random tokens: ~ln(V)
    torchao = rows["torchao_float8"]
    if torchao[1].startswith("skipped"):   # torchao is not a test requirement
        assert "torchao" in torchao[1] and torchao[2:] == ["-"] * 5
    core = rows["megatron_core"]
    if core[1].startswith("skipped"):   # megatron.core not importable here, or not on a CPU
        assert len(core[1]) > len("skipped: ") and core[2:] == ["-"] * 5
    else:
        assert all(number(c) for c in core[1:])
    for first_header in ("megatron_lite vs", "megatron_lite[sel] vs"):
        ratios = {r[0]: r for r in table(out, first_header)}
        assert {"torch_eager", "torch_compile"} <= set(ratios) and not any(n.startswith("megatron") for n in ratios
                                                                          if n != "megatron_core")
        for r in ratios.values():
            number(r[1]), number(r[2])
    saved = json.loads((tmp_path / "train_throughput.json").read_text())
    assert [c["name"] for c in saved["candidates"]] == list(rows)
    assert saved["megatron_lite_variants"] == {"sel": ["--recompute-granularity", "selective", "--recompute-modules",
                                                       "layernorm"],
                                               "fp8": ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]}
    # the same model everywhere, with the parameter count that the MFU formula uses
    assert {c["params"] for c in saved["candidates"] if c["status"] == "ok"} == {param_counts(TINY)["total"]}
    assert saved["peak_matmul_flops"] > 0 and saved["model"]["num_layers"] == TINY.num_layers


def test_checkpoint_io_tiny_prints_every_measurement_with_positive_numbers(tmp_path):
    out = run_bench("checkpoint_io.py", tmp_path / "out", "--dir", str(tmp_path), "--page-cache", "fadvise")
    rows = {(r[0], r[1]): r for r in table(out, "measurement")}
    expected = [("dd oflag=direct", "write"), ("dd iflag=direct", "read"), ("megatron_lite save_checkpoint", "write"),
                ("megatron_lite decide_load + restore", "read"), ("megatron_lite load_file", "read"),
                ("megatron_lite async save (1st)", "blocked"), ("megatron_lite async save (1st)", "committed"),
                ("megatron_lite async save (2nd)", "blocked"), ("megatron_lite async save (2nd)", "committed"),
                ("torch.save + fsync", "write"), ("torch.load", "read"), ("dcp.save", "write"), ("dcp.load", "read")]
    assert list(rows) == expected
    for (name, op), cells in rows.items():
        seconds, gbps, vs_dd, vs_torch, vs_dcp = cells[2:]
        number(seconds)
        if op == "blocked":
            continue
        number(gbps)
        if name.startswith("megatron_lite"):   # a ratio printed with two decimals may round to 0.00x
            for cell in (vs_dd, vs_torch, vs_dcp):
                value = float(cell.rstrip("x"))
                assert cell.endswith("x") and math.isfinite(value) and value >= 0, cell
    saved = json.loads((tmp_path / "out" / "checkpoint_io.json").read_text())
    assert saved["state_bytes"] == saved["weight_bytes"] + saved["optimizer_bytes"]
    # bf16 weights (2 bytes) plus fp32 main params and two moments (12 bytes) per parameter
    assert saved["state_bytes"] == pytest.approx(14 * param_counts(TINY)["total"], rel=0.01)
    assert not any(name.startswith("checkpoint_io_") for name in os.listdir(tmp_path))   # scratch removed
