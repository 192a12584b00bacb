"""--ckpt-format torch and torch_dist through the CheckpointManager: a run saves in Megatron-LM's
format and resumes from it, the recovery report says what came from where, inspect_checkpoint describes
such a checkpoint, and a directory in no known format is never taken for a damaged one.

(The formats themselves are checked against Megatron-Core in test_megatron_legacy.py and
test_torch_dist.py.)"""

import os
import subprocess
import sys

import pytest

from megatron_lite.arguments import ConfigError, parse_args, validate
from megatron_lite.checkpoint.formats import detect_format
from megatron_lite.checkpoint.recovery import CheckpointLoadError
from megatron_lite.training import pretrain
from tests.unit_tests.checkpoint.test_resume import MODEL

BASE = MODEL + ["--eval-interval", "0", "--train-iters", "4"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _history(run):
    return [(h["iteration"], h["lm loss"], h["lr"], h["grad_norm"]) for h in run.history]


@pytest.fixture(scope="module")
def straight():
    return _history(pretrain(parse_args(BASE)))


@pytest.fixture(scope="module", params=["torch", "torch_dist"])
def interrupted(request, tmp_path_factory):
    """A run stopped after iteration 2 (saved on exit in the format), then the same command resumed."""
    fmt, d = request.param, str(tmp_path_factory.mktemp(request.param) / "ckpt")
    flags = BASE + ["--save", d, "--load", d, "--ckpt-format", fmt]
    first = pretrain(parse_args(flags + ["--exit-interval", "2"]))
    second = pretrain(parse_args(flags))
    return fmt, d, first, second


def test_a_run_resumes_from_its_own_megatron_format_checkpoint(straight, interrupted):
    fmt, d, first, second = interrupted
    assert detect_format(os.path.join(d, "iter_0000002")) == fmt
    assert _history(first) == straight[:2]
    report = second.checkpoints.load_report
    assert second.checkpoints.loaded_iteration == 2 and "iteration 2, 16 samples" in report
    resumed = _history(second)
    assert [it for it, *_ in resumed] == [3, 4]
    if fmt == "torch":
        # megatron_lite's optimizer state and Megatron's rng_state travel in the file: bitwise the same run
        assert "Megatron-LM legacy (torch)" in report and "optimizer                       loaded" in report
        assert resumed == straight[2:]
    else:
        # the weights, the schedule and the RNG are restored, the optimizer starts fresh (and says why):
        # iteration 3's loss and learning rate are the uninterrupted run's
        assert "torch_dist" in report and "optimizer                       fresh (" in report
        assert resumed[0][:3] == straight[2][:3]


def test_finetune_takes_only_the_weights_of_a_megatron_format_checkpoint(interrupted, tmp_path):
    fmt, d, _, _ = interrupted
    run = pretrain(parse_args(BASE + ["--load", d, "--finetune", "--no-load-optim"]))
    report = run.checkpoints.load_report
    assert "mode                            finetune" in report and "reset to 0 (finetune mode)" in report
    assert [h["iteration"] for h in run.history] == [1, 2, 3, 4]


def test_inspect_describes_a_megatron_format_checkpoint(interrupted):
    fmt, d, _, _ = interrupted
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", "inspect_checkpoint.py"), d],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAILED" not in out.stdout and "damaged" not in out.stdout
    assert "format         Megatron" in out.stdout and "iteration      4" in out.stdout
    assert "TP 1 x PP 1 x DP 1" in out.stdout and "num_layers=4" in out.stdout


def test_a_directory_in_no_known_format_says_what_it_holds(tmp_path):
    d = tmp_path / "ckpt"
    (d / "iter_0000005" / "shards").mkdir(parents=True)
    (d / "iter_0000005" / "weights.bin").write_bytes(b"\0" * 8)
    (d / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(CheckpointLoadError, match=r"iter_0000005 has no metadata.json and is in none of "
                                                  r"Megatron-LM's formats either \(it holds shards, weights.bin\)"):
        pretrain(parse_args(BASE + ["--load", str(d)]))


def test_formats_that_only_megatron_lite_writes_refuse_other_formats_in_one_line():
    with pytest.raises(ConfigError, match=r"--async-save writes megatron_lite checkpoints only"):
        validate(parse_args(BASE + ["--save", "x", "--ckpt-format", "torch_dist", "--async-save"]), 1)
    with pytest.raises(ConfigError, match=r"--ckpt-format torch_dcp: megatron_lite writes megatron_lite, torch"):
        validate(parse_args(BASE + ["--save", "x", "--ckpt-format", "torch_dcp"]), 1)


def _convert(*argv):
    out = subprocess.run([sys.executable, "-m", "megatron_lite.tools.convert", *argv],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _release_model(d):
    import torch
    return torch.load(os.path.join(d, "iter_0000004", "mp_rank_00_000", "model_optim_rng.pt"),
                      weights_only=True)["model"]


def test_convert_megatron_to_megatron_lite_and_back_in_the_other_format_is_bitwise(interrupted, tmp_path):
    import torch

    fmt, d, _, second = interrupted
    other = "torch_dist" if fmt == "torch" else "torch"
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    _convert("--loader", "megatron", "--saver", "megatron_lite", "--load-dir", d, "--save-dir", a)
    layout = ["--target-tensor-parallel-size", "2"] if other == "torch" else []   # torch_dist: any layout
    _convert("--loader", "megatron_lite", "--saver", "megatron", "--saver-ckpt-format", other, "--load-dir", a,
             "--save-dir", b, *layout)
    assert detect_format(os.path.join(b, "iter_0000004")) == other
    _convert("--loader", "megatron", "--saver", "megatron_lite", "--load-dir", b, "--save-dir", c,
             "--target-tensor-parallel-size", "1")
    trained = second.module.state_dict()
    for converted in (_release_model(a), _release_model(c)):
        assert converted.keys() == trained.keys()
        for k, v in trained.items():
            assert torch.equal(converted[k], v), k


def test_convert_refuses_a_directory_that_is_not_megatron_lm(tmp_path):
    (tmp_path / "src" / "iter_0000001").mkdir(parents=True)
    (tmp_path / "src" / "latest_checkpointed_iteration.txt").write_text("1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", "convert.py"), "--loader",
                          "megatron", "--saver", "megatron_lite", "--load-dir", str(tmp_path / "src"), "--save-dir",
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and not os.path.exists(tmp_path / "out")
    assert out.stderr.strip().endswith("is not a Megatron-LM checkpoint (torch or torch_dist); it holds nothing "
                                       "(empty) (a megatron_lite checkpoint converts with --loader megatron_lite)")


def _tp2_pp2_body(rank, world_size, root):
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    out = {"straight": _history(pretrain(parse_args(BASE + layout)))}
    for fmt in ("torch", "torch_dist"):
        d = os.path.join(root, fmt)
        flags = BASE + layout + ["--save", d, "--load", d, "--ckpt-format", fmt]
        pretrain(parse_args(flags + ["--exit-interval", "2"]))
        second = pretrain(parse_args(flags))
        out[fmt] = {"resumed": _history(second), "report": second.checkpoints.load_report}
    return out


def test_tp2_pp2_runs_resume_from_their_megatron_format_checkpoints(tmp_path):
    from tests.unit_tests.dist_utils import run_distributed

    results = run_distributed(_tp2_pp2_body, 4, str(tmp_path))
    last = results[2]   # (tp_rank 0, last stage): the rank that logs the loss
    straight = last["straight"]
    assert last["torch"]["resumed"] == straight[2:]
    assert "resharded" not in last["torch"]["report"] and "rng                             restored" in \
        last["torch"]["report"]
    assert last["torch_dist"]["resumed"][0][:3] == straight[2][:3]


def _megatron_written_resume_body(rank, world_size, root):
    """Megatron-Core's model written as Megatron-LM's training writes a legacy checkpoint at
    iteration 100 (640 samples consumed, its schedule 640 samples in); megatron_lite resumes it
    with Megatron-LM's flags for that (--use-checkpoint-args --use-checkpoint-opt_param-scheduler)
    for one iteration on a batch it is given, and Megatron-Core computes that batch's loss and its
    own scheduler's learning rate after the step (the optimizer's state is not mapped, so only the
    first iteration is determined by the checkpoint alone)."""
    import itertools

    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from tests.unit_tests.checkpoint.megatron_core_reference import build_core_gpt, initialize_core
    from tests.unit_tests.checkpoint.test_megatron_legacy import (MODELS, SCHEDULER, VOCAB, megatron_lm_args,
                                                                  write_megatron_file)

    m = MODELS["llama"]
    initialize_core(1, 1)
    core = build_core_gpt(m, seed=3)
    write_megatron_file(root, 100, 0, megatron_lm_args(m, 1, 1), core.state_dict())
    tokens = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(5))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(8, 16),
             "position_ids": torch.arange(16).expand(8, 16)}
    core.eval()
    with torch.no_grad():
        mask = torch.triu(torch.ones(16, 16), diagonal=1).bool()[None, None]
        logits = core(batch["tokens"], batch["position_ids"], mask)
    # megatron_lite's softmax runs over the true vocabulary (the padding rows are masked out, as Hugging
    # Face's model has none); Megatron-Core's own loss also counts the padded rows of the vocabulary
    true_vocab = VOCAB   # --vocab-size VOCAB - 1 plus the NullTokenizer's end-of-document token
    want_loss = torch.nn.functional.cross_entropy(logits[..., :true_vocab].reshape(-1, true_vocab),
                                                  batch["labels"].reshape(-1)).item()
    params = torch.nn.Parameter(torch.zeros(1))
    sched = OptimizerParamScheduler(torch.optim.SGD([params], lr=0.0), init_lr=0.0, max_lr=3e-4, min_lr=3e-5,
                                    lr_warmup_steps=64, lr_decay_steps=6400, lr_decay_style="cosine",
                                    start_wd=0.1, end_wd=0.1, wd_incr_steps=6400, wd_incr_style="constant",
                                    use_checkpoint_opt_param_scheduler=True)
    sched.load_state_dict(dict(SCHEDULER))
    applied_lr = sched.optimizer.param_groups[0]["lr"]     # the rate of iteration 101's update
    sched.step(increment=8)
    next_lr = sched.optimizer.param_groups[0]["lr"]        # after it, for iteration 102

    flags = ["--load", root, "--use-checkpoint-args", "--use-checkpoint-opt_param-scheduler", "--tokenizer-type",
             "NullTokenizer", "--vocab-size", str(VOCAB - 1), "--micro-batch-size", "8", "--global-batch-size", "8",
             "--train-iters", "101", "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
             "--lr-warmup-iters", "8", "--weight-decay", "0.1", "--eval-interval", "0", "--log-interval", "1"]
    run = pretrain(parse_args(flags), data_iterators=lambda run: (itertools.repeat(batch), None))
    return {"history": run.history, "report": run.checkpoints.load_report, "want_loss": want_loss,
            "applied_lr": applied_lr, "next_lr": next_lr, "num_steps": run.scheduler.num_steps,
            "lr_after": run.optimizer.param_groups[0]["lr"]}


def test_resume_from_a_megatron_written_checkpoint_continues_its_loss_and_schedule(tmp_path):
    from tests.unit_tests.dist_utils import run_distributed

    [r] = run_distributed(_megatron_written_resume_body, 1, str(tmp_path))
    [h] = r["history"]
    assert h["iteration"] == 101
    assert abs(h["lm loss"] - r["want_loss"]) < 1e-5, (h["lm loss"], r["want_loss"])
    assert h["lr"] == pytest.approx(r["applied_lr"], rel=1e-12)
    assert r["num_steps"] == 648 and r["lr_after"] == pytest.approx(r["next_lr"], rel=1e-12)
    assert "restored (iteration 100, 640 samples)" in r["report"]
    assert "Megatron-LM's optimizer state is not mapped" in r["report"]
