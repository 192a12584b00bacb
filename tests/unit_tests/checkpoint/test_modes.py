"""The load modes of DESIGN.md's table, and damaged checkpoints in a real run.

One process, in-process runs of a tiny Llama-style model with dropout on. A module fixture
trains the "checkpoint trained for 5 iterations" that every mode starts from.
"""

import os
import shutil

import pytest
import torch

from megatron_lite.arguments import ConfigError, parse_args
from megatron_lite.checkpoint.decision import check_model_config, decide_load
from megatron_lite.checkpoint.manager import CheckpointManager
from megatron_lite.checkpoint.recovery import CheckpointLoadError
from megatron_lite.checkpoint.io.storage import load_file
from megatron_lite.initialize import build_run, setup_parallel
from megatron_lite.training import build_data, pretrain
from tests.unit_tests.checkpoint.test_resume import MODEL, _assert_bitwise, _state

BASE = MODEL + ["--eval-interval", "0"]


def _flags(*extra, iters=6):
    return BASE + ["--train-iters", str(iters), *extra]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A checkpoint trained for 5 iterations (iteration 3 and 5 saved)."""
    d = str(tmp_path_factory.mktemp("pretrained"))
    run = pretrain(parse_args(_flags("--save", d, "--save-interval", "3", iters=5)))
    return d, _state(run), run.progress.consumed_train_samples


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


def _moments(opt_state):
    return {k: v.get("exp_avg") for k, v in opt_state["params"].items()}


def test_finetune_loads_weights_and_starts_fresh(pretrained, tmp_path):
    ckpt, trained, _ = pretrained
    run = _restored("--load", ckpt, "--save", str(tmp_path / "ft"), "--finetune", "--no-load-optim")
    _assert_bitwise(run.module.state_dict(), trained["model"], "weights")
    assert run.progress.iteration == 0 and run.progress.consumed_train_samples == 0
    assert all(m is None or torch.count_nonzero(m) == 0 for m in _moments(run.optimizer.state_dict()).values())
    assert run.scheduler.num_steps == 0 and run.scheduler.get_lr() == 0.0   # a fresh warmup from lr 0
    assert "reset to 0 (finetune mode)" in run.checkpoints.load_report


def test_further_train_keeps_optimizer_and_schedule_resets_samples(pretrained, tmp_path):
    ckpt, trained, consumed = pretrained
    run = _restored("--load", ckpt, "--save", str(tmp_path / "ft"), "--reset-sample-stat")
    _assert_bitwise(run.module.state_dict(), trained["model"], "weights")
    _assert_bitwise(run.optimizer.state_dict()["params"], trained["optimizer"]["params"], "optimizer")
    assert run.scheduler.num_steps == consumed              # the schedule continues where it was
    assert run.progress.iteration == 0 and run.progress.consumed_train_samples == 0   # new data from sample 0


def test_further_train_with_new_schedule(pretrained, tmp_path):
    ckpt, trained, _ = pretrained
    run = _restored("--load", ckpt, "--save", str(tmp_path / "ft"), "--reset-sample-stat", "--no-load-lr-scheduler")
    _assert_bitwise(run.optimizer.state_dict()["params"], trained["optimizer"]["params"], "optimizer")
    assert run.scheduler.num_steps == 0 and run.scheduler.get_lr() == 0.0
    assert [g["lr"] for g in run.optimizer.param_groups] == [0.0, 0.0]   # what the first step will use
    assert "fresh (--no-load-lr-scheduler)" in run.checkpoints.load_report


def test_pretrained_checkpoint_loads_weights_only(pretrained, tmp_path):
    ckpt, trained, _ = pretrained
    run = _restored("--pretrained-checkpoint", ckpt, "--save", str(tmp_path / "new"))
    _assert_bitwise(run.module.state_dict(), trained["model"], "weights")
    assert run.progress.iteration == 0 and run.scheduler.num_steps == 0
    assert all(m is None or torch.count_nonzero(m) == 0 for m in _moments(run.optimizer.state_dict()).values())


MODES = {
    "finetune": ["--finetune", "--no-load-optim"],
    "further-train": ["--reset-sample-stat"],
    "further-train-new-schedule": ["--reset-sample-stat", "--no-load-lr-scheduler"],
    "pretrained-checkpoint": [],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_interrupted_mode_run_restarts_bitwise(mode, pretrained, tmp_path):
    """The same command line twice (interrupted, then restarted) equals one uninterrupted run."""
    ckpt = pretrained[0]
    source = ["--pretrained-checkpoint", ckpt] if mode == "pretrained-checkpoint" else ["--load", ckpt]

    def command(save):
        return _flags(*source, *MODES[mode], "--save", save, "--save-interval", "2")

    straight = _state(pretrain(parse_args(command(str(tmp_path / "straight")))))
    own = str(tmp_path / "own")
    first = pretrain(parse_args(command(own) + ["--exit-interval", "3"]))
    second = pretrain(parse_args(command(own)))
    assert second.checkpoints.loaded_dir == own and second.checkpoints.loaded_iteration == 3   # saved on exit, resumed plainly
    assert "mode                            resume" in second.checkpoints.load_report
    resumed = _state(second)
    assert _state(first)["history"] + resumed["history"] == straight["history"]
    _assert_bitwise(resumed["model"], straight["model"], "model")
    _assert_bitwise(resumed["optimizer"], straight["optimizer"], "optimizer")


def test_changed_architecture_names_each_field_and_the_fix(pretrained):
    flags = _flags("--load", pretrained[0], iters=5)
    flags[flags.index("--hidden-size") + 1] = "48"
    cfg = parse_args(flags + ["--num-query-groups", "4"])
    state = setup_parallel(cfg)
    # SwiGLU's default MLP size is Megatron's int((4 * h * 2 / 3) / 64) * 64: 64 at h=32, 128 at h=48
    with pytest.raises(ConfigError, match=r"hidden_size=32 \(flags say 48\), ffn_hidden_size=64 \(flags say 128\), "
                                          r"num_query_groups=2 \(flags say 4\);"
                                          r" pass --use-checkpoint-args"):
        check_model_config(cfg, decide_load(cfg, state))
    # --use-checkpoint-args keeps what the flags set, as Megatron's _set_arg(force=False) does
    explicit = parse_args(flags + ["--num-query-groups", "4", "--use-checkpoint-args"])
    with pytest.raises(ConfigError, match=r"hidden_size=32 \(flags say 48\), num_query_groups=2 \(flags say 4\); "
                                          r"drop those flags"):
        check_model_config(explicit, decide_load(explicit, state))


_ARCHITECTURE_FLAGS = {"--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--normalization",
                       "--position-embedding-type", "--num-query-groups"}
_BARE_FLAGS = {"--swiglu", "--group-query-attention", "--untie-embeddings-and-output-weights"}


def _without_architecture(flags):
    out, skip = [], False
    for i, f in enumerate(flags):
        if skip:
            skip = False
        elif f in _ARCHITECTURE_FLAGS:
            skip = True
        elif f not in _BARE_FLAGS:
            out.append(f)
    return out


def test_use_checkpoint_args_fills_only_the_fields_the_flags_leave_unset(pretrained, tmp_path):
    flags = _without_architecture(_flags("--load", pretrained[0], "--save", str(tmp_path / "again"),
                                           "--use-checkpoint-opt_param-scheduler", iters=7))
    shapes = []

    def recorded_data(run):
        train_iter, valid_iter, _ = build_data(run)
        return (shapes.append(b["tokens"].shape) or b for b in train_iter), valid_iter

    run = pretrain(parse_args(flags + ["--use-checkpoint-args", "--seq-length", "8"]), data_iterators=recorded_data)
    m = run.cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_query_groups) == (4, 32, 64, 2)
    assert (m.normalization, m.swiglu, m.position_embedding_type) == ("RMSNorm", True, "rope")
    assert m.untie_embeddings_and_output_weights and m.seq_length == 8
    assert run.progress.iteration == 7 and "mode                            resume" in run.checkpoints.load_report
    assert shapes == [(2, 8)] * 8   # 2 iterations of 4 microbatches at the explicit 8, not the saved 16


def test_checkpoint_value_that_fails_validation_is_a_config_error(tmp_path):
    one_layer = str(tmp_path / "one_layer")
    flags = _flags("--save", one_layer, "--save-interval", "4", iters=4)
    flags[flags.index("--num-layers") + 1] = "1"
    pretrain(parse_args(flags))
    flags = _without_architecture(_flags("--load", one_layer, iters=6))
    cfg = parse_args(flags + ["--use-checkpoint-args", "--recompute-granularity", "full", "--recompute-method",
                              "block", "--recompute-num-layers", "2"])
    state = setup_parallel(cfg)   # at the default 2 layers the flags are valid
    with pytest.raises(ConfigError, match=r"--recompute-num-layers between 1 and the 1 layers of a pipeline stage "
                                          r"\(--use-checkpoint-args took num_layers, .* from .*iter_0000004\)$"):
        check_model_config(cfg, decide_load(cfg, state))


def test_load_directory_that_does_not_exist_is_an_error(tmp_path):
    missing = str(tmp_path / "no_such_dir")
    cfg = parse_args(_flags("--load", missing))
    with pytest.raises(ConfigError, match=r"--load .*no_such_dir: no such directory; check the path"):
        decide_load(cfg, setup_parallel(cfg))
    first_run = parse_args(_flags("--load", missing, "--save", missing))   # the first start of a restartable job
    assert decide_load(first_run, setup_parallel(first_run)).action == "none"


# ----------------------------------------------------------------------------------- integrity

def _damage(ckpt_dir, how):
    newest = os.path.join(ckpt_dir, "iter_0000005")
    shard = os.path.join(newest, "mp_rank_00_000", "model_optim_rng.pt")
    if how == "truncate":
        size = os.path.getsize(shard)
        with open(shard, "r+b") as f:
            f.truncate(size // 2)
    elif how == "flip-byte":
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x01]))
    elif how == "no-rename":   # a save that died before its rename: still under the temporary name
        os.rename(newest, newest + ".tmp")
        with open(os.path.join(ckpt_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("3")
    return newest


@pytest.mark.parametrize("how,why", [("truncate", "truncated"), ("flip-byte", "checksum"), ("no-rename", "incomplete")])
def test_damaged_newest_checkpoint_falls_back_and_deletes_nothing(how, why, pretrained, tmp_path):
    ckpt = str(tmp_path / "ck")
    shutil.copytree(pretrained[0], ckpt)
    before = sorted(os.listdir(ckpt))
    _damage(ckpt, how)
    after_damage = sorted(os.listdir(ckpt))
    run = _restored("--load", ckpt, iters=5)
    assert run.checkpoints.loaded_iteration == 3
    report = run.checkpoints.load_report
    assert "iter_0000003" in report.split("loading:")[1]
    assert why in report.lower(), report
    assert sorted(os.listdir(ckpt)) == after_damage and len(after_damage) == len(before)


def test_ckpt_step_on_a_damaged_checkpoint_is_an_error(pretrained, tmp_path):
    ckpt = str(tmp_path / "ck")
    shutil.copytree(pretrained[0], ckpt)
    _damage(ckpt, "flip-byte")
    with pytest.raises(CheckpointLoadError, match="iter_0000005.*failed its checks"):
        _restored("--load", ckpt, "--ckpt-step", "5", iters=5)
    assert _restored("--load", ckpt, "--ckpt-step", "3", iters=5).checkpoints.loaded_iteration == 3


def test_plain_resume_from_weights_only_checkpoint_is_an_error(tmp_path):
    d = str(tmp_path / "run")
    pretrain(parse_args(_flags("--save", d, "--save-weights-only-interval", "2", iters=4)))
    weights = os.path.join(d, "weights")
    assert os.listdir(weights)
    with pytest.raises(ConfigError, match="no optimizer state"):
        _restored("--load", weights)
    run = _restored("--pretrained-checkpoint", weights, "--save", str(tmp_path / "new"))
    assert run.checkpoints.loaded_iteration == 4
    assert torch.equal(load_file(weights, 4, "mp_rank_00_000/model_optim_rng.pt")["model"]["embedding.word_embeddings.weight"],
                       run.module.state_dict()["embedding.word_embeddings.weight"])


# ------------------------------------------------------------------------------- other layouts

def _layout_run(rank, world_size, flags):
    run = pretrain(parse_args(flags))
    return {"losses": [h["lm loss"] for h in run.history], "report": run.checkpoints.load_report}


def test_checkpoint_loads_resharded_at_another_layout(pretrained, tmp_path):
    """Saved at TP1 x PP1 and fine-tuned at TP2 x PP2: the weights are resharded on load, and the
    first loss (no dropout, same data) is the single-process finetune's."""
    from tests.unit_tests.dist_utils import run_distributed

    flags = _flags("--load", pretrained[0], "--finetune", "--no-load-optim", "--hidden-dropout", "0",
                   "--attention-dropout", "0", "--lr-warmup-iters", "1", iters=2)
    single = _layout_run(0, 1, flags + ["--save", str(tmp_path / "one")])
    results = run_distributed(_layout_run, 4, flags + ["--tensor-model-parallel-size", "2",
                                                       "--pipeline-model-parallel-size", "2"])
    for r in results:
        assert "loaded, resharded from TP=1 PP=1" in r["report"]
        assert abs(r["losses"][0] - single["losses"][0]) <= 1e-5 * abs(single["losses"][0])


def _resume_elsewhere(rank, world_size, flags, ck):
    run = pretrain(parse_args(flags + ["--save", ck + f"-{world_size}", "--load", ck]))
    return {"losses": [h["lm loss"] for h in run.history], "report": run.checkpoints.load_report,
            "first": run.progress.iteration}


@pytest.mark.parametrize("saved_with", ["replicated", "zero1"])
def test_resume_at_another_layout_reshards_optimizer_state(saved_with, tmp_path):
    """Stopped at TP1 (one process), resumed at TP2 x DP2 with ZeRO-1: the continued losses equal
    the uninterrupted single-process run's, which they do not with a fresh optimizer."""
    from tests.unit_tests.dist_utils import run_distributed

    flags = _flags("--hidden-dropout", "0", "--attention-dropout", "0", "--global-batch-size", "8", iters=6)
    straight = [h["lm loss"] for h in pretrain(parse_args(flags)).history]
    ck = str(tmp_path / "ck")
    zero1 = ["--use-distributed-optimizer"] if saved_with == "zero1" else []
    pretrain(parse_args(flags + zero1 + ["--save", ck, "--exit-interval", "3"]))
    results = run_distributed(_resume_elsewhere, 4, flags + ["--tensor-model-parallel-size", "2",
                                                             "--use-distributed-optimizer"], ck)
    for r in results:
        assert r["first"] == 6 and "optimizer                       loaded, resharded from TP=1" in r["report"]
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(straight[3:]), rtol=1e-5, atol=0)
