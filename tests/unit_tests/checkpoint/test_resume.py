"""A run stopped at any point resumes bit for bit.

For (TP, PP, DP) in (1,1,1), (2,1,1), (1,2,1), (1,1,2), (2,2,2), with and without the
distributed optimizer (and once with fp16 loss scaling): 12 iterations straight versus 6,
stop, resume to 12 give identical per-iteration losses, learning rates and grad norms, and
bitwise-equal final parameters and optimizer states. Dropout is on, so the RNG restore is
exercised. One spawn per layout runs every variant of that layout.
"""

import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

from megatron_lite.arguments import parse_args
from megatron_lite.training import pretrain
from tests.unit_tests.dist_utils import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MODEL = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--mock-data", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", "127", "--make-vocab-size-divisible-by", "32", "--hidden-dropout", "0.1",
         "--attention-dropout", "0.1", "--lr", "1e-3", "--lr-warmup-iters", "3", "--lr-decay-style", "cosine",
         "--seed", "11", "--log-interval", "100", "--eval-interval", "4", "--eval-iters", "1",
         "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
         "--group-query-attention", "--num-query-groups", "2", "--untie-embeddings-and-output-weights"]
VARIANTS = {"plain": [], "distopt": ["--use-distributed-optimizer"],
            "fp16": ["--fp16", "--initial-loss-scale", "65536", "--loss-scale-window", "2", "--hysteresis", "1"],
            # bf16 moments and bf16 gradient buffers (reduce-scattered in bf16), sharded over DP
            "bf16-lean": ["--bf16", "--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16",
                          "--exp-avg-sq-dtype", "bf16", "--main-grads-dtype", "bf16", "--use-distributed-optimizer"]}


def _state(run):
    return {"model": {k: v.detach().clone() for k, v in run.module.state_dict().items()},
            "optimizer": torch.load(_roundtrip(run.optimizer.state_dict()), weights_only=True),
            "history": [(h["lm loss"], h["lr"], h["grad_norm"]) for h in run.history]}


def _roundtrip(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _straight_vs_resumed(rank, world_size, layout_flags, variants, root):
    out = {}
    for variant in variants:
        flags = MODEL + layout_flags + VARIANTS[variant] + ["--train-iters", "12"]
        straight = _state(pretrain(parse_args(flags)))
        ck = os.path.join(root, variant)
        first = pretrain(parse_args(flags + ["--save", ck, "--load", ck, "--save-interval", "100",
                                             "--exit-interval", "6"]))
        second = pretrain(parse_args(flags + ["--save", ck, "--load", ck, "--save-interval", "100"]))
        out[variant] = {"straight": straight, "first": _state(first), "second": _state(second),
                        "resumed_at": second.checkpoints.loaded_iteration}
    return out


def _assert_bitwise(a, b, what):
    """Equal structure, tensors equal bit for bit (tuples and lists count as the same)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), what
        for k in a:
            _assert_bitwise(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise(x, y, f"{what}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{what} differs"
    else:
        assert a == b, f"{what}: {a} != {b}"


LAYOUTS = [
    ("tp1-pp1-dp1", 1, [], ["plain", "distopt", "fp16"]),
    ("tp2-pp1-dp1", 2, ["--tensor-model-parallel-size", "2"], ["plain", "distopt"]),
    ("tp1-pp2-dp1", 2, ["--pipeline-model-parallel-size", "2"], ["plain", "distopt"]),
    ("tp1-pp1-dp2", 2, [], ["plain", "distopt", "bf16-lean"]),
    ("tp2-pp2-dp2", 8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
     ["plain", "distopt"]),
]


@pytest.mark.parametrize("name,world,flags,variants", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_resume_is_bitwise_identical(name, world, flags, variants, tmp_path):
    results = run_distributed(_straight_vs_resumed, world, flags, variants, str(tmp_path))
    for rank, per_rank in enumerate(results):
        for variant, r in per_rank.items():
            where = f"{name}/{variant}/rank{rank}"
            assert r["resumed_at"] == 6, where
            assert len(r["first"]["history"]) == 6 and len(r["second"]["history"]) == 6, where
            # losses, learning rates and grad norms of iterations 1-12, exactly
            assert r["first"]["history"] + r["second"]["history"] == r["straight"]["history"], where
            _assert_bitwise(r["second"]["model"], r["straight"]["model"], f"{where} model")
            _assert_bitwise(r["second"]["optimizer"], r["straight"]["optimizer"], f"{where} optimizer")
    if "fp16" in results[0]:
        # the fp16 run really scaled: the scaler moved away from --initial-loss-scale during the run,
        # and the resumed run ends with the straight run's scale and counters
        scaler = results[0]["fp16"]["straight"]["optimizer"]["grad_scaler"]
        assert float(scaler["scale"]) != 65536.0, scaler
        assert results[0]["fp16"]["second"]["optimizer"]["grad_scaler"] == scaler


# ---------------------------------------------------------------------------------- kill / signal

CLI = [sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *MODEL, "--train-iters", "12", "--log-interval", "1"]


def _iteration_lines(text):
    return [l for l in text.splitlines() if l.startswith(" iteration")]


def _fields(line):
    parts = {p.split(":")[0].strip(): p.split(":", 1)[1].strip() for p in line.split("|")[1:] if ":" in p}
    return line.split("|")[0].split()[1], parts["learning rate"], parts["lm loss"], parts["grad norm"]


def _run_until(args, line_prefix, sig):
    """Start pretrain_gpt.py, wait for the log line that starts with `line_prefix`, send `sig`."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(line_prefix):
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest


def _final_model(ck):
    from megatron_lite.checkpoint.io.storage import load_file
    return load_file(ck, 12, "mp_rank_00_000/model_optim_rng.pt")


@pytest.fixture(scope="module")
def straight_run():
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(CLI + ["--save", d, "--save-interval", "100"], capture_output=True, text=True,
                             cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        yield [_fields(l) for l in _iteration_lines(out.stdout)], _final_model(d)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_or_signalled_run_resumes_bitwise(sig, straight_run, tmp_path):
    straight_lines, straight_final = straight_run
    ck = str(tmp_path / "ck")
    args = CLI + ["--save", ck, "--load", ck, "--save-interval", "3", "--exit-signal-handler"]
    code, first = _run_until(args, " iteration        5/", getattr(signal, sig))
    if sig == "SIGKILL":
        assert code == -signal.SIGKILL
        resume_from = 3                     # the last save before the kill
    else:
        assert code == 0, first             # finishes the iteration, saves, exits 0
        resume_from = int(_fields(_iteration_lines(first)[-1])[0].split("/")[0])
        assert f"saved checkpoint at iteration {resume_from}" in first
    second = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"restored (iteration {resume_from}," in second.stdout, second.stdout
    resumed = [_fields(l) for l in _iteration_lines(second.stdout)]
    assert resumed == straight_lines[resume_from:]
    final = _final_model(ck)
    _assert_bitwise(final["model"], straight_final["model"], "model")
    _assert_bitwise(final["optimizer"], straight_final["optimizer"], "optimizer")
