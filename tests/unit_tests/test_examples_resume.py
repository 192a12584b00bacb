"""examples/resume/ run as written (two gloo processes on CPU, tiny model, few iterations).

pretrain.sh stopped by SIGTERM and started again logs the very iterations of an uninterrupted
run; finetune.sh starts at iteration 0 from pretrain.sh's checkpoint and, stopped by Ctrl-C
(SIGINT), continues with finetune_resume.sh from its own checkpoints to the uninterrupted
finetune's log; further_train.sh restarts the iteration count, continues the pretraining LR
schedule, stops at EXIT_INTERVAL and continues with further_train_resume.sh; load_weights_from.sh
resumes a pretraining checkpoint with an iteration model's weights, and stopped and run again logs
what it logs uninterrupted.
The runs are shared between the tests: each script starts torch, so each run costs seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from megatron_lite.tools import compare_logs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples", "resume")
PRETRAIN_ITERS = 24     # SIGTERM comes after iteration 2: the run must still be going then
FINETUNE_ITERS = 8
RUN_TIMEOUT_S = 600     # a hung run is killed rather than hanging the test session

pytestmark = pytest.mark.slow


def script_env(runs_dir, **settings) -> dict:
    """The scripts' settings for one run directory; torchrun from this interpreter's environment."""
    env = dict(os.environ)
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if os.path.exists(os.path.join(bin_dir, "torchrun")):
        env["TORCHRUN"] = os.path.join(bin_dir, "torchrun")
    env.pop("EXIT_INTERVAL", None)
    env.update(RUNS_DIR=str(runs_dir), NPROC="2", TP="1", PP="1", EVAL_INTERVAL="0")
    env.update({k: str(v) for k, v in settings.items()})
    return env


def run_script(name: str, env: dict, stop_after_iteration=None, sig=signal.SIGTERM, args=()) -> SimpleNamespace:
    """Run examples/resume/NAME with `args` (flags appended to pretrain_gpt.py's); with
    `stop_after_iteration`, send `sig` to the script's process group (as Ctrl-C or `kill` would)
    once that iteration's log line appears."""
    proc = subprocess.Popen([os.path.join(EXAMPLES, name), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(RUN_TIMEOUT_S, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            parsed = compare_logs.parse_line(line)
            if stop_after_iteration is not None and parsed and parsed[0] == stop_after_iteration:
                os.killpg(proc.pid, sig)
                stop_after_iteration = None
        status = proc.wait()
    finally:
        watchdog.cancel()
    output = "".join(lines)
    return SimpleNamespace(status=status, output=output, iterations=_iterations(output))


def _iterations(text: str) -> list:
    return [parsed[0] for parsed in map(compare_logs.parse_line, text.splitlines()) if parsed]


def tracker(ckpt_dir) -> int:
    with open(os.path.join(ckpt_dir, "latest_checkpointed_iteration.txt")) as fh:
        return int(fh.read().strip())


def recorded_mode(ckpt_dir, iteration: int) -> str:
    with open(os.path.join(ckpt_dir, f"iter_{iteration:07d}", "metadata.json")) as fh:
        return json.load(fh)["mode"]


def compare(log_a, log_b):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = compare_logs.main([str(log_a), str(log_b), "--quiet"])
    return status, out.getvalue().splitlines()


def _assert_ok(run):
    """A script that failed is a failure, never an expected one (pytest.fail is not an AssertionError)."""
    if run.status != 0:
        pytest.fail(f"script exited {run.status}:\n{run.output[-4000:]}")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("examples_resume")


@pytest.fixture(scope="module")
def pretrain(root):
    """An uninterrupted pretrain.sh; another stopped by SIGTERM after iteration 2, then started again."""
    settings = dict(TRAIN_ITERS=PRETRAIN_ITERS, SAVE_INTERVAL=8)
    straight = run_script("pretrain.sh", script_env(root / "straight", **settings))
    interrupted = run_script("pretrain.sh", script_env(root / "resumed", **settings), stop_after_iteration=2)
    resumed = run_script("pretrain.sh", script_env(root / "resumed", **settings))
    return SimpleNamespace(straight=straight, interrupted=interrupted, resumed=resumed)


@pytest.fixture(scope="module")
def finetune(root, pretrain):
    """finetune.sh stopped by SIGINT after iteration 2, then finetune_resume.sh; both from the
    uninterrupted pretrain's checkpoint."""
    _assert_ok(pretrain.straight)
    env = script_env(root / "resumed", TRAIN_ITERS=FINETUNE_ITERS, SAVE_INTERVAL=4,
                     PRETRAIN_CKPT=root / "straight" / "pretrain")
    first = run_script("finetune.sh", env, stop_after_iteration=2, sig=signal.SIGINT)
    resumed = run_script("finetune_resume.sh", env)
    return SimpleNamespace(first=first, resumed=resumed, env=env)


def test_pretrain_script_trains_from_scratch_and_saves_every_interval(root, pretrain):
    _assert_ok(pretrain.straight)
    assert pretrain.straight.iterations == list(range(1, PRETRAIN_ITERS + 1))
    assert sorted(os.listdir(root / "straight" / "pretrain")) == [
        "iter_0000008", "iter_0000016", "iter_0000024", "latest_checkpointed_iteration.txt"]
    assert (root / "straight" / "logs" / "pretrain.log").read_text().count(" iteration ") >= PRETRAIN_ITERS


def test_sigterm_saves_a_checkpoint_and_exits_0(root, pretrain):
    run = pretrain.interrupted
    _assert_ok(run)
    stopped_at = run.iterations[-1]
    assert 2 <= stopped_at < PRETRAIN_ITERS
    assert f"exiting at iteration {stopped_at} on a signal" in run.output
    assert f"saved checkpoint at iteration {stopped_at} to {root / 'resumed' / 'pretrain'}" in run.output
    assert (root / "resumed" / "pretrain" / f"iter_{stopped_at:07d}").is_dir()


def test_restarted_pretrain_logs_what_the_uninterrupted_run_logged(root, pretrain):
    _assert_ok(pretrain.resumed)
    stopped_at = pretrain.interrupted.iterations[-1]
    assert pretrain.resumed.iterations == list(range(stopped_at + 1, PRETRAIN_ITERS + 1))
    status, out = compare(root / "straight" / "logs" / "pretrain.log", root / "resumed" / "logs" / "pretrain.log")
    assert (status, out[-1]) == (0, f"MATCH: iterations 1-{PRETRAIN_ITERS} identical (lr, loss)")


def test_finetune_starts_at_iteration_0_from_the_pretrained_checkpoint(root, finetune):
    run = finetune.first
    _assert_ok(run)
    stopped_at = run.iterations[-1]
    assert run.iterations == list(range(1, stopped_at + 1)) and stopped_at < FINETUNE_ITERS
    assert f"checkpoint recovery report for {root / 'straight' / 'pretrain'}" in run.output
    assert f"iter_{PRETRAIN_ITERS:07d}" in run.output
    assert f"exiting at iteration {stopped_at} on a signal" in run.output
    assert recorded_mode(root / "resumed" / "finetune", stopped_at) == "finetune"


def test_finetune_resume_continues_from_its_own_checkpoint(root, finetune):
    run = finetune.resumed
    _assert_ok(run)
    stopped_at = finetune.first.iterations[-1]
    assert f"checkpoint recovery report for {root / 'resumed' / 'finetune'}" in run.output
    assert run.iterations == list(range(stopped_at + 1, FINETUNE_ITERS + 1))
    assert tracker(root / "resumed" / "finetune") == FINETUNE_ITERS
    log = compare_logs.parse_log(str(root / "resumed" / "logs" / "finetune.log"))
    assert sorted(log.values) == list(range(1, FINETUNE_ITERS + 1)) and log.repeated == []


def test_finetune_stopped_by_ctrl_c_and_resumed_matches_an_uninterrupted_finetune(root, finetune):
    straight = run_script("finetune.sh", dict(finetune.env, RUNS_DIR=str(root / "straight")))
    _assert_ok(straight)
    status, out = compare(root / "straight" / "logs" / "finetune.log", root / "resumed" / "logs" / "finetune.log")
    assert (status, out[-1]) == (0, f"MATCH: iterations 1-{FINETUNE_ITERS} identical (lr, loss)")


@pytest.fixture(scope="module")
def further_train(root, pretrain):
    """further_train.sh stopped by EXIT_INTERVAL=3, then further_train_resume.sh."""
    _assert_ok(pretrain.straight)
    settings = dict(TRAIN_ITERS=FINETUNE_ITERS, SAVE_INTERVAL=4, PRETRAIN_CKPT=root / "straight" / "pretrain")
    first = run_script("further_train.sh", script_env(root / "resumed", EXIT_INTERVAL=3, **settings))
    resumed = run_script("further_train_resume.sh", script_env(root / "resumed", **settings))
    return SimpleNamespace(first=first, resumed=resumed)


def _next_pretrain_lr(ckpt_dir, iteration: int) -> str:
    """The learning rate the pretraining schedule saved at `iteration` gives next, as logged."""
    import torch

    from megatron_lite.config import RunConfig
    from megatron_lite.optim import build_scheduler

    iter_dir = os.path.join(ckpt_dir, f"iter_{iteration:07d}")
    with open(os.path.join(iter_dir, "metadata.json")) as fh:
        cfg = RunConfig.from_dict(json.load(fh)["config"])
    saved = torch.load(os.path.join(iter_dir, "mp_rank_00_000", "model_optim_rng.pt"), weights_only=True)
    scheduler = build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0), cfg.optimizer,
                                cfg.train)
    scheduler.load_state_dict(saved["opt_param_scheduler"])
    return f"{scheduler.get_lr():.6E}"


def test_further_train_restarts_at_iteration_0_and_continues_the_lr_schedule(root, further_train):
    run = further_train.first
    _assert_ok(run)
    assert run.iterations == [1, 2, 3] and "exiting at iteration 3 (--exit-interval 3)" in run.output
    assert recorded_mode(root / "resumed" / "further_train", 3) == "further-train"
    first_line = next(line for line in run.output.splitlines() if compare_logs.parse_line(line))
    assert compare_logs.parse_line(first_line)[1]["lr"] == _next_pretrain_lr(root / "straight" / "pretrain",
                                                                             PRETRAIN_ITERS)


def test_further_train_resume_continues_from_its_own_checkpoint(root, further_train):
    run = further_train.resumed
    _assert_ok(run)
    assert f"checkpoint recovery report for {root / 'resumed' / 'further_train'}" in run.output
    assert run.iterations == list(range(4, FINETUNE_ITERS + 1))
    assert tracker(root / "resumed" / "further_train") == FINETUNE_ITERS


@pytest.mark.parametrize("script, directory", [("finetune_resume.sh", "finetune"),
                                               ("further_train_resume.sh", "further_train")])
def test_a_resume_script_with_nothing_to_resume_says_to_start_first(tmp_path, script, directory):
    run = run_script(script, script_env(tmp_path))
    assert run.status == 2
    assert f"{tmp_path / directory} holds no" in run.output
    assert f"start with {script.replace('_resume', '')}" in run.output


@pytest.fixture(scope="module")
def load_weights_from(root):
    """pretrain.sh for 8 iterations writing iteration models (weights-only at 4 and 8); then
    load_weights_from.sh with the weights of 4 to iteration 12, uninterrupted, and stopped by
    EXIT_INTERVAL=10 then run again."""
    pretrained = run_script("pretrain.sh", script_env(root / "iteration_models", TRAIN_ITERS=8, SAVE_INTERVAL=8),
                            args=["--save-weights-only-interval", "4"])
    _assert_ok(pretrained)
    settings = dict(TRAIN_ITERS=12, SAVE_INTERVAL=100, WEIGHTS_STEP=4,
                    PRETRAIN_CKPT=root / "iteration_models" / "pretrain")
    straight = run_script("load_weights_from.sh", script_env(root / "weights_straight", **settings))
    first = run_script("load_weights_from.sh", script_env(root / "weights_resumed", EXIT_INTERVAL=10, **settings))
    again = run_script("load_weights_from.sh", script_env(root / "weights_resumed", **settings))
    return SimpleNamespace(straight=straight, first=first, again=again, ckpt=settings["PRETRAIN_CKPT"])


def test_load_weights_from_resumes_the_training_state_with_the_iteration_models_weights(load_weights_from):
    run, ckpt = load_weights_from.straight, load_weights_from.ckpt
    _assert_ok(run)
    assert run.iterations == list(range(9, 13))
    assert f"loaded from {ckpt / 'weights'}/iter_0000004 (--load-weights-from, --load-weights-from-step 4)" in run.output
    assert f"loaded from {ckpt}/iter_0000008 (--load, tracker); fp32 main params from the loaded weights" in run.output
    first_line = next(line for line in run.output.splitlines() if compare_logs.parse_line(line))
    assert compare_logs.parse_line(first_line)[1]["lr"] == _next_pretrain_lr(ckpt, 8)   # the schedule goes on


def test_load_weights_from_stopped_and_run_again_matches_the_uninterrupted_run(root, load_weights_from):
    first, again = load_weights_from.first, load_weights_from.again
    _assert_ok(first)
    _assert_ok(again)
    assert first.iterations == [9, 10] and again.iterations == [11, 12]
    assert f"which was trained from {load_weights_from.ckpt / 'weights'}/iter_0000004's weights already" in again.output
    status, out = compare(root / "weights_straight" / "logs" / "load_weights_from.log",
                          root / "weights_resumed" / "logs" / "load_weights_from.log")
    assert (status, out[-1]) == (0, "MATCH: iterations 9-12 identical (lr, loss)")


def test_load_weights_from_without_iteration_models_says_how_to_make_them(tmp_path):
    run = run_script("load_weights_from.sh", script_env(tmp_path))
    assert run.status == 2
    assert (f"needs a full checkpoint in {tmp_path / 'pretrain'} and iteration models in "
            f"{tmp_path / 'pretrain' / 'weights'}; start with pretrain.sh --save-weights-only-interval N") in run.output


@pytest.fixture(scope="module")
def lora(root, pretrain):
    """lora.sh on the uninterrupted pretrain's checkpoint: uninterrupted, and stopped by SIGTERM after
    iteration 3 then run again; lora_export.sh on the uninterrupted one."""
    _assert_ok(pretrain.straight)
    settings = dict(TRAIN_ITERS=8, SAVE_INTERVAL=4, PRETRAIN_CKPT=root / "straight" / "pretrain")
    straight = run_script("lora.sh", script_env(root / "lora_straight", **settings))
    first = run_script("lora.sh", script_env(root / "lora_resumed", **settings), stop_after_iteration=3)
    again = run_script("lora.sh", script_env(root / "lora_resumed", **settings))
    export = run_script("lora_export.sh", script_env(root / "lora_straight", PYTHON=sys.executable, **settings))
    return SimpleNamespace(straight=straight, first=first, again=again, export=export, settings=settings)


def test_lora_script_saves_adapters_only_and_resumes_them_to_the_uninterrupted_log(root, lora):
    for run in (lora.straight, lora.first, lora.again):
        _assert_ok(run)
    with open(root / "lora_straight" / "lora" / "iter_0000008" / "metadata.json") as fh:
        meta = json.load(fh)
    assert meta["lora"]["rank"] == 8 and all(".adapter.lora_" in name for name in meta["tensors"])
    assert meta["base"]["dir"] == str(lora.settings["PRETRAIN_CKPT"])
    assert "% of the base checkpoint's" in lora.straight.output
    assert "LoRA adapters loaded, base from" in lora.again.output
    status, out = compare(root / "lora_straight" / "logs" / "lora.log", root / "lora_resumed" / "logs" / "lora.log")
    assert (status, out[-1]) == (0, "MATCH: iterations 1-8 identical (lr, loss)")


def test_lora_export_script_writes_peft_and_merged_models_and_a_sample(root, lora):
    _assert_ok(lora.export)
    out = root / "lora_straight" / "lora_export"
    assert sorted(os.listdir(out / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.path.isfile(out / "merged" / "config.json") and os.path.isfile(out / "base_hf" / "config.json")
    assert lora.export.output.rstrip().splitlines()[-1].startswith("The checkpoint")
