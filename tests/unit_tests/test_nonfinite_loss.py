"""A loss that turns non-finite (--lr 1e6) is never checkpointed: with --check-for-nan-in-loss-and-grad
(the default) the run stops at that iteration with exit code 3 and one line naming it; with its --no-
form it trains to the end without saving again. Either way the tracker keeps naming the newest
finite checkpoint and --keep-last-n-checkpoints deletes none of the finite ones."""

import os
import subprocess
import sys

import pytest

from megatron_lite.checkpoint.io.storage import load_file
from tests.unit_tests.checkpoint.test_resume import MODEL, REPO

FLAGS = MODEL + ["--train-iters", "12", "--log-interval", "1", "--save-interval", "1", "--keep-last-n-checkpoints",
                 "2", "--lr", "1e6", "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--eval-interval", "0"]


def _train(save, *extra):
    return subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *FLAGS, "--save", save, *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def _first_nonfinite(stdout):
    """(iteration, what) of the run's 'not saving checkpoints from iteration N on: WHAT' line."""
    for line in stdout.splitlines():
        if line.startswith("not saving checkpoints from iteration "):
            head, what = line.split(" on: ")
            return int(head.rsplit(" ", 1)[1]), what
    return None, None


def _tracker(save):
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


@pytest.mark.parametrize("check", ["default", "no-check"])
def test_a_non_finite_loss_is_never_checkpointed(check, tmp_path):
    save = str(tmp_path / "ck")
    out = _train(save, *(["--no-check-for-nan-in-loss-and-grad"] if check == "no-check" else []))
    bad, what = _first_nonfinite(out.stdout)
    assert bad is not None and 1 < bad < 12 and what.split()[-1] in ("nan", "inf"), out.stdout[-3000:]
    kept = sorted(int(n[5:]) for n in os.listdir(save) if n.startswith("iter_"))
    if check == "default":
        assert out.returncode == 3, out.stderr
        errors = [l for l in out.stderr.splitlines() if "error" in l]
        assert errors == [f"pretrain_gpt.py: error: iteration {bad}: {what}; stopping "
                          f"(--check-for-nan-in-loss-and-grad). The newest checkpoint is the last one saved before "
                          f"it; lower --lr or check the data, or pass --no-check-for-nan-in-loss-and-grad to train on "
                          f"without saving"]
        assert "Traceback" not in out.stderr
        assert f" iteration {bad + 1:8d}/" not in out.stdout   # stopped at once
    else:
        assert out.returncode == 0, out.stderr
        assert " iteration       12/" in out.stdout
    assert kept == [bad - 2, bad - 1] and _tracker(save) == bad - 1
    for it in kept:
        shard = load_file(save, it, "mp_rank_00_000/model_optim_rng.pt")
        assert all(t.isfinite().all() for t in shard["model"].values() if hasattr(t, "isfinite")), it
