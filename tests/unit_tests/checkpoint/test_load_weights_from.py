"""--load DIR --load-weights-from DIR2: the model weights from DIR2, the training state from DIR.

A module fixture trains test_resume's tiny model for 6 iterations with the distributed optimizer
(so that the fp32 main params are copies, apart from the weights): full checkpoints at 2, 4, 6 in
DIR and weights-only "iteration models" at 3 and 6 in DIR/weights.
"""

import os
import re
import shutil

import pytest
import torch

from megatron_lite.arguments import ConfigError, parse_args, validate
from megatron_lite.checkpoint.io import layout
from megatron_lite.checkpoint.io.integrity import read_metadata
from megatron_lite.checkpoint.io.storage import load_file
from megatron_lite.checkpoint.manager import CheckpointManager
from megatron_lite.checkpoint.recovery import CheckpointLoadError
from megatron_lite.initialize import build_run, setup_parallel
from megatron_lite.parallel.random import preserved_rng
from megatron_lite.training import build_data, pretrain, train
from tests.unit_tests.checkpoint.test_resume import MODEL, _assert_bitwise

FLAGS = MODEL + ["--eval-interval", "0", "--use-distributed-optimizer"]
SHARD = layout.model_shard_path(0, 0)
OPTIMIZER = layout.distrib_optim_shard_path(0, 0, 0)


def _flags(*extra, iters=6):
    return FLAGS + ["--train-iters", str(iters), *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(DIR with full checkpoints 2, 4, 6; DIR/weights with weights-only 3, 6)."""
    d = str(tmp_path_factory.mktemp("trained"))
    pretrain(parse_args(_flags("--save", d, "--save-interval", "2", "--save-weights-only-interval", "3")))
    return d, os.path.join(d, "weights")


def _restored(*flags, iters=6):
    """A run restored from its checkpoint flags, stopped before its first iteration."""
    cfg = parse_args(_flags(*flags, iters=iters))
    state = setup_parallel(cfg)
    checkpoints = CheckpointManager(cfg, state)
    checkpoints.decide()
    run = build_run(cfg, state)
    run.checkpoints, run.mode = checkpoints, checkpoints.mode
    checkpoints.restore(run)
    return run


def _restored_lines(report):
    """{part: value} of the report's `restored:` block."""
    block = report.split("  restored:\n", 1)[1]
    return dict(re.match(r"    (\S.*?)\s{2,}(\S.*)$", line).groups() for line in block.splitlines())


def _main_params_are_the_weights(run):
    return all(torch.equal(m.main_param.view(-1), m.model_view()) for m in run.optimizer.main_params)


def test_weights_come_from_dir2_and_the_training_state_from_dir(trained):
    d, weights = trained
    run = _restored("--load", d, "--ckpt-step", "4", "--load-weights-from", weights)
    _assert_bitwise(run.module.state_dict(), load_file(weights, 6, SHARD)["model"], "weights")
    saved = load_file(d, 4, OPTIMIZER)
    state = run.optimizer.state_dict()
    for name, entry in state["params"].items():
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            _assert_bitwise(entry[moment], saved["params"][name][moment], f"{name}.{moment}")
        assert not torch.equal(entry["main_param"], saved["params"][name]["main_param"]), name   # not DIR's
    assert _main_params_are_the_weights(run)
    assert run.scheduler.num_steps == load_file(d, 4, SHARD)["opt_param_scheduler"]["num_steps"] == 4 * 8
    assert (run.progress.iteration, run.progress.consumed_train_samples) == (4, 32)


def _hand_assembled(d, weights):
    """DIR's iteration 4 resumed, then DIR2's iteration-6 weights copied into the model and the fp32 main params."""
    run = _restored("--load", d, "--ckpt-step", "4")
    sd = load_file(weights, 6, SHARD)["model"]
    run.module.load_state_dict(sd)
    with torch.no_grad():
        for m in run.optimizer.main_params:
            m.main_param.view(-1).copy_(sd[m.name].view(-1)[m.start:m.end])
    return run


def test_training_continues_from_the_hand_assembled_state(trained):
    d, weights = trained
    run = pretrain(parse_args(_flags("--load", d, "--ckpt-step", "4", "--load-weights-from", weights)))
    reference = _hand_assembled(d, weights)
    with preserved_rng(reference.state.rng):
        train_iter, valid_iter, _ = build_data(reference)
    train(reference, train_iter, valid_iter)
    losses = [h["lm loss"] for h in run.history]
    assert len(losses) == 2 and losses == [h["lm loss"] for h in reference.history]
    _assert_bitwise(run.module.state_dict(), reference.module.state_dict(), "model after 2 iterations")
    plain = pretrain(parse_args(_flags("--load", d, "--ckpt-step", "4")))
    assert [h["lm loss"] for h in plain.history][0] != losses[0]   # the weights did change the run


def test_the_report_says_where_each_part_came_from(trained):
    d, weights = trained
    report = _restored("--load", d, "--ckpt-step", "4", "--load-weights-from", weights).checkpoints.load_report
    lines = _restored_lines(report)
    state_from = f"{d}/iter_0000004 (--load, --ckpt-step 4)"
    assert lines["weights"] == f"loaded from {weights}/iter_0000006 (--load-weights-from, newest intact)"
    assert lines["optimizer"] == f"loaded from {state_from}; fp32 main params from the loaded weights"
    assert lines["lr scheduler"] == f"loaded from {state_from}"
    assert lines["iteration and consumed samples"] == f"restored from {state_from} (iteration 4, 32 samples)"
    assert lines["rng"] == f"restored from {state_from}"
    assert report.startswith(f"checkpoint recovery report for {d}\n")
    survey = report.split(f"  weights from {weights} (--load-weights-from):\n", 1)[1].split("  restored:")[0]
    assert survey.splitlines()[0] == "    tracker latest_checkpointed_iteration.txt names nothing"
    assert re.search(r"^      iter_0000006  weights .* intact, every checksum verified   <- loaded$", survey, re.M)
    assert survey.splitlines()[-1] == "    loading: iter_0000006 (weights), fallback: the newest intact checkpoint"


def test_a_step_picks_the_weights_and_auto_is_the_newest_intact(trained):
    d, weights = trained
    run = _restored("--load", d, "--load-weights-from", weights, "--load-weights-from-step", "3")
    _assert_bitwise(run.module.state_dict(), load_file(weights, 3, SHARD)["model"], "weights")
    assert run.progress.iteration == 6 and _main_params_are_the_weights(run)
    lines = _restored_lines(run.checkpoints.load_report)
    assert lines["weights"] == f"loaded from {weights}/iter_0000003 (--load-weights-from, --load-weights-from-step 3)"
    assert lines["lr scheduler"] == f"loaded from {d}/iter_0000006 (--load, tracker)"
    assert "    loading: iter_0000003 (weights), requested with --load-weights-from-step" in run.checkpoints.load_report
    auto = _restored("--load", d, "--ckpt-step", "auto", "--load-weights-from", weights,
                     "--load-weights-from-step", "auto")
    assert auto.progress.iteration == 6
    _assert_bitwise(auto.module.state_dict(), load_file(weights, 6, SHARD)["model"], "weights")


def test_the_weights_of_a_full_checkpoint(trained):
    d, _ = trained
    run = _restored("--load", d, "--ckpt-step", "2", "--load-weights-from", d, "--load-weights-from-step", "6")
    _assert_bitwise(run.module.state_dict(), load_file(d, 6, SHARD)["model"], "weights")
    saved = load_file(d, 2, OPTIMIZER)["params"]
    assert all(torch.equal(e["exp_avg"], saved[n]["exp_avg"]) for n, e in run.optimizer.state_dict()["params"].items())
    assert _main_params_are_the_weights(run) and run.progress.iteration == 2


def test_a_restart_of_the_same_command_line_does_not_take_the_weights_again(trained, tmp_path):
    """--load and --save the same directory: the checkpoint saved after taking the weights records them,
    so the restart resumes it plainly and ends where an uninterrupted run ends."""
    d, weights = trained
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    for copy in (straight_dir, resumed_dir):
        shutil.copytree(d, copy)

    def command(directory):
        return _flags("--load", directory, "--save", directory, "--load-weights-from", weights,
                      "--load-weights-from-step", "3", "--save-interval", "100", "--override-opt_param-scheduler",
                      "--lr-decay-iters", "20", iters=10)   # a schedule that still trains after iteration 6

    straight = pretrain(parse_args(command(straight_dir)))
    first = pretrain(parse_args(command(resumed_dir) + ["--exit-interval", "8"]))
    second = pretrain(parse_args(command(resumed_dir)))
    assert [h["iteration"] for h in first.history + second.history] == [7, 8, 9, 10]
    assert [h["lm loss"] for h in first.history + second.history] == [h["lm loss"] for h in straight.history]
    at_8 = load_file(resumed_dir, 8, SHARD)["model"]["output_layer.weight"]
    assert not torch.equal(second.module.state_dict()["output_layer.weight"], at_8)   # still training after 8
    _assert_bitwise(second.module.state_dict(), straight.module.state_dict(), "model")
    record = read_metadata(os.path.join(resumed_dir, "iter_0000008"))["weights_from"]
    assert record["checkpoint"] == os.path.join(weights, "iter_0000003")
    assert _restored_lines(second.checkpoints.load_report)["weights"] == (
        f"loaded from {resumed_dir}/iter_0000008 (--load, tracker), which was trained from "
        f"{weights}/iter_0000003's weights already (its metadata.json says so): not taken again")


def _save_at_tp2(rank, world_size, flags):
    pretrain(parse_args(flags))


def test_weights_saved_at_tp2_load_resharded_at_tp1(trained, tmp_path):
    from tests.unit_tests.dist_utils import run_distributed

    d, _ = trained
    tp2 = str(tmp_path / "tp2")
    run_distributed(_save_at_tp2, 2, _flags("--tensor-model-parallel-size", "2", "--save", tp2,
                                            "--save-weights-only-interval", "4", iters=4))
    run = _restored("--load", d, "--load-weights-from", os.path.join(tp2, "weights"))
    reference = _restored("--pretrained-checkpoint", os.path.join(tp2, "weights"), "--save", str(tmp_path / "ref"))
    _assert_bitwise(run.module.state_dict(), reference.module.state_dict(), "resharded weights")
    assert _main_params_are_the_weights(run) and run.progress.iteration == 6
    assert _restored_lines(run.checkpoints.load_report)["weights"] == (
        f"loaded from {tp2}/weights/iter_0000004 (--load-weights-from, newest intact), resharded from TP=2 PP=1")


def test_a_megatron_lm_checkpoint_gives_its_weights(trained, tmp_path):
    d, _ = trained
    megatron = str(tmp_path / "megatron")
    source = pretrain(parse_args(_flags("--ckpt-format", "torch", "--save", megatron, "--save-interval", "4",
                                        iters=4)))
    run = _restored("--load", d, "--load-weights-from", megatron)
    _assert_bitwise(run.module.state_dict(), source.module.state_dict(), "weights")
    lines = _restored_lines(run.checkpoints.load_report)
    assert lines["weights format"] == "Megatron-LM legacy (torch)"
    assert lines["weights"] == f"loaded from {megatron}/iter_0000004 (--load-weights-from, tracker)"


# ----------------------------------------------------------------------------------- errors

def test_a_weights_only_directory_as_load_names_the_fix(trained):
    d, weights = trained
    with pytest.raises(ConfigError, match="^" + re.escape(
            f"{weights} holds only a weights-only checkpoint ({weights}/iter_0000006): it has no optimizer state "
            f"to resume; --load names the full checkpoint whose training state goes with the weights: pass this "
            f"directory as --load-weights-from and a directory of full checkpoints as --load") + "$"):
        _restored("--load", weights, "--load-weights-from", d)


def test_weights_of_another_model_are_an_error_naming_both_directories(trained, tmp_path):
    d, weights = trained
    other = str(tmp_path / "other")
    flags = _flags("--save", other, "--save-weights-only-interval", "4", iters=4)
    flags[flags.index("--hidden-size") + 1] = "48"
    pretrain(parse_args(flags))
    with pytest.raises(ConfigError, match="^" + re.escape(
            f"checkpoint {other}/weights/iter_0000004 (--load-weights-from) was saved with hidden_size=48 (flags "
            f"say 32), ffn_hidden_size=128 (flags say 64), unlike --load's {d}/iter_0000006 and the flags; the "
            f"weights must be of the model whose training state is resumed: pick another --load-weights-from "
            f"directory or --load-weights-from-step") + "$"):
        _restored("--load", d, "--load-weights-from", os.path.join(other, "weights"))


def test_a_missing_step_lists_the_iterations_there_are(trained):
    d, weights = trained
    with pytest.raises(CheckpointLoadError, match="^" + re.escape(
            f"--load-weights-from-step 5: {weights} has no committed checkpoint iter_0000005 (committed "
            f"iterations: 6, 3)") + "$"):
        _restored("--load", d, "--load-weights-from", weights, "--load-weights-from-step", "5")


def test_a_load_directory_without_training_state_is_an_error(trained, tmp_path):
    _, weights = trained
    empty = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match="^" + re.escape(
            f"--load-weights-from {weights}: --load {empty} holds no checkpoint whose training state would go with "
            f"the weights; pass --load a directory of full checkpoints, or --pretrained-checkpoint {weights} to "
            f"start from the weights afresh") + "$"):
        _restored("--load", empty, "--save", empty, "--load-weights-from", weights)


@pytest.mark.parametrize("flags, message", [
    (["--load-weights-from", "w"], "--load-weights-from needs --load DIR (the checkpoint whose optimizer, LR "
                                   "schedule, iteration and RNG go with the weights); for the weights alone use "
                                   "--pretrained-checkpoint"),
    (["--load", "d", "--load-weights-from", "w", "--finetune"],
     "--load-weights-from keeps --load's training state, which --finetune resets; to finetune those weights pass "
     "their directory as --load (or --pretrained-checkpoint) instead"),
    (["--load", "d", "--load-weights-from", "w", "--pretrained-checkpoint", "p"],
     "--load-weights-from and --pretrained-checkpoint both name where the weights come from; pick one "
     "(--load-weights-from: with --load's training state; --pretrained-checkpoint: fresh)"),
    (["--load", "d", "--load-weights-from-step", "3"],
     "--load-weights-from-step needs --load-weights-from DIR (the directory it picks an iteration of)"),
    (["--load", "d", "--load-weights-from", "w", "--load-weights-from-step", "latest"],
     "--load-weights-from-step latest: give an iteration number, `best` or `auto` (the latest intact)"),
    (["--load", "d", "--save", "d", "--load-weights-from", "w", "--ckpt-format", "torch"],
     "--load-weights-from: only megatron_lite checkpoints record which weights they were trained from, so that a "
     "restart does not take them again; save with --ckpt-format megatron_lite (not torch)"),
], ids=["without-load", "with-finetune", "with-pretrained-checkpoint", "step-alone", "bad-step", "torch-saves"])
def test_combinations_that_cannot_work_are_refused(flags, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        validate(parse_args(_flags(*flags)), 1)
