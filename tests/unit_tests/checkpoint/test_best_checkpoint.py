"""best_checkpointed_iteration.txt: the full checkpoint with the lowest validation loss, recorded in
metadata.json, kept by --keep-last-n-checkpoints, loaded with --ckpt-step best, shown by the
recovery report and megatron_lite.tools.inspect_checkpoint."""

import os
import subprocess
import sys

import pytest

from megatron_lite.arguments import ConfigError, parse_args
from megatron_lite.checkpoint.io.integrity import read_metadata
from megatron_lite.training import pretrain
from tests.unit_tests.checkpoint.test_resume import MODEL

# a learning rate high enough that the validation loss turns up again before the run ends
FLAGS = MODEL + ["--train-iters", "8", "--eval-interval", "2", "--eval-iters", "2", "--save-interval", "2",
                 "--lr", "3e-2", "--lr-warmup-iters", "0", "--lr-decay-style", "constant"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _best(d):
    with open(os.path.join(d, "best_checkpointed_iteration.txt")) as f:
        return int(f.read())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    every, kept = (str(tmp_path_factory.mktemp(n)) for n in ("every", "kept"))
    pretrain(parse_args(FLAGS + ["--save", every]))
    pretrain(parse_args(FLAGS + ["--save", kept, "--keep-last-n-checkpoints", "1"]))
    return every, kept


def test_the_best_file_names_the_checkpoint_with_the_lowest_validation_loss(runs):
    every, _ = runs
    losses = {it: read_metadata(os.path.join(every, f"iter_{it:07d}"))["validation"] for it in (2, 4, 6, 8)}
    assert all(v["iteration"] == it for it, v in losses.items())
    best = min(losses, key=lambda it: losses[it]["lm loss"])
    assert _best(every) == best
    assert best != 8, f"the validation losses {losses} never turned up: the retention check below needs that"


def test_retention_keeps_the_best_checkpoint(runs):
    every, kept = runs
    names = sorted(n for n in os.listdir(kept) if n.startswith("iter_"))
    assert names == sorted({f"iter_{_best(every):07d}", "iter_0000008"}) and _best(kept) == _best(every)


def test_ckpt_step_best_loads_it_and_the_report_and_inspect_say_so(runs, tmp_path):
    every, _ = runs
    best = _best(every)
    run = pretrain(parse_args(FLAGS + ["--load", every, "--ckpt-step", "best", "--save", str(tmp_path / "next")]))
    report = run.checkpoints.load_report
    assert run.checkpoints.loaded_iteration == best
    assert f"--ckpt-step best: named by best_checkpointed_iteration.txt" in report
    assert f"best_checkpointed_iteration.txt names iter_{best:07d} (lowest validation loss)" in report
    out = subprocess.run([sys.executable, "-m", "megatron_lite.tools.inspect_checkpoint", every],
                         capture_output=True, text=True, cwd=ROOT)
    assert f"best (lowest validation loss) iter_{best:07d}" in out.stdout and "validation     lm loss" in out.stdout


def test_ckpt_step_best_without_a_best_file_names_the_fix(tmp_path):
    d = str(tmp_path / "ckpt")
    pretrain(parse_args(MODEL + ["--train-iters", "4", "--eval-interval", "0", "--save", d]))
    with pytest.raises(ConfigError, match=r"--ckpt-step best: .*best_checkpointed_iteration.txt is missing; it "
                                          r"names the checkpoint with the lowest validation loss once"):
        pretrain(parse_args(MODEL + ["--train-iters", "6", "--load", d, "--ckpt-step", "best"]))


def test_background_saves_name_the_same_best_once_committed(runs, tmp_path):
    every, _ = runs
    d = str(tmp_path / "async")
    pretrain(parse_args(FLAGS + ["--save", d, "--async-save"]))
    assert _best(d) == _best(every)
