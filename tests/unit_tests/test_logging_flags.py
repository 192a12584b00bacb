"""The loop's logging and housekeeping flags, checked on what they print and write."""

from __future__ import annotations

import gc
import glob
import gzip
import json
import math
import re
import struct
import time
from types import SimpleNamespace

import pytest
import torch

import megatron_lite.training as training
from megatron_lite.logging_utils import Timers, check_weight_hash_across_dp_replicas, num_floating_point_operations
from megatron_lite.trainer import Trainer
from tests.unit_tests.dist_utils import run_distributed

FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
         "--eval-interval", "0", "--lr-warmup-iters", "1", "--hidden-dropout", "0", "--attention-dropout", "0"]


def train(*extra, data_iterators=None):
    return Trainer(FLAGS + list(extra)).train(resume_training=False, data_iterators=data_iterators)


def iteration_lines(out: str):
    return [line for line in out.splitlines() if line.startswith(" iteration")]


def field(line: str, name: str) -> str:
    return line.split(f"{name}:")[1].split("|")[0].strip()


def test_consumed_samples_on_each_line_is_that_iterations_count(capsys):
    train("--global-batch-size", "4", "--train-iters", "6", "--log-interval", "2")
    lines = iteration_lines(capsys.readouterr().out)
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [2, 4, 6]
    assert [int(field(line, "consumed samples")) for line in lines] == [8, 16, 24]


def test_consumed_samples_of_gpt_small_example_at_iteration_10_is_80(capsys):
    import os
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    Trainer(["--config", os.path.join(repo, "examples", "gpt_small.yaml"), "--train-iters", "10", "--lr-warmup-iters", "2",
             "--num-layers", "1", "--hidden-size", "32", "--eval-interval", "0"]).train(resume_training=False)
    lines = iteration_lines(capsys.readouterr().out)
    assert [(int(line.split()[1].split("/")[0]), int(field(line, "consumed samples"))) for line in lines] == [(10, 80)]


def test_params_norm_and_num_zeros_are_the_models_after_the_step(capsys):
    run = train("--train-iters", "2", "--log-interval", "1", "--log-params-norm", "--log-num-zeros-in-grad")
    last = iteration_lines(capsys.readouterr().out)[-1]
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in run.module.parameters()))
    assert float(field(last, "params norm")) == pytest.approx(norm, abs=6e-4)
    # the gradients of the last step are still in the buffers; the padded vocabulary rows get none
    zeros = sum(int((m.main_grad() == 0).sum()) for m in run.optimizer.main_params)
    assert zeros >= 32 * (128 - 64)
    assert int(field(last, "num zeros")) == zeros
    # Megatron's order: grad norm, num zeros, params norm
    assert last.index("grad norm") < last.index("num zeros") < last.index("params norm")


def _params_norm_tp(rank, world_size, argv):
    from megatron_lite.arguments import parse_args
    from megatron_lite.initialize import build_run, setup_parallel
    from megatron_lite.logging_utils import params_l2_norm
    cfg = parse_args(argv)
    return params_l2_norm(build_run(cfg, setup_parallel(cfg))).item()


def test_params_norm_counts_each_weight_once_under_tp2():
    from megatron_lite.arguments import parse_args
    from megatron_lite.initialize import build_run, setup_parallel
    from megatron_lite.logging_utils import params_l2_norm
    argv = FLAGS + ["--train-iters", "4", "--vocab-size", "127", "--make-vocab-size-divisible-by", "32"]
    cfg = parse_args(argv)
    single = params_l2_norm(build_run(cfg, setup_parallel(cfg))).item()
    sharded = run_distributed(_params_norm_tp, 2, argv + ["--tensor-model-parallel-size", "2"])
    assert sharded == pytest.approx([single] * 2, rel=1e-5)


def test_flops_formula_of_a_dense_gpt():
    model = SimpleNamespace(hidden_size=64, seq_length=16, num_layers=2, head_dim=16, num_attention_heads=4,
                            query_groups=4, swiglu=False, ffn_size=256, padded_vocab_size=128, vocab_size=100)
    # per token: 6 * 2 * (64 * (64 + 128) + 64 * 64 + 2 * 64 * 256) + 6 * 64 * 128 = 638976, x 16 tokens;
    # attention scores: 16^2 * 2 layers * 6 * 64 = 196608
    assert num_floating_point_operations(model, 1) == 638976 * 16 + 196608
    assert num_floating_point_operations(model, 3) == 3 * (638976 * 16 + 196608)
    swiglu = SimpleNamespace(**{**model.__dict__, "swiglu": True, "query_groups": 2})
    # the MLP's three matmuls (gate, up, down) and GQA's smaller k/v projections
    assert num_floating_point_operations(swiglu, 1) == 16 * (6 * 2 * (64 * (64 + 64) + 64 * 64 + 3 * 64 * 256)
                                                             + 6 * 64 * 128) + 196608


class MicrosecondMark:
    """A StepMark whose clock advances one microsecond per mark (one per step)."""
    made = 0

    def __init__(self, device):
        self.n = MicrosecondMark.made
        MicrosecondMark.made += 1

    def wait(self):
        pass

    def seconds_until(self, later):
        return (later.n - self.n) * 1e-6


def test_throughput_is_flops_per_second_per_gpu(capsys, monkeypatch):
    monkeypatch.setattr(training, "StepMark", MicrosecondMark)
    run = train("--train-iters", "2", "--log-interval", "1", "--log-throughput")
    line = iteration_lines(capsys.readouterr().out)[-1]
    expected = num_floating_point_operations(run.cfg.model, 2) / (1e-6 * 1e12 * 1)
    assert float(field(line, "throughput per GPU (TFLOP/s/GPU)")) == pytest.approx(expected, abs=0.05)
    assert line.index("elapsed time per iteration") < line.index("throughput per GPU") < line.index("learning rate")
    assert run.progress.floating_point_operations_so_far == 2 * num_floating_point_operations(run.cfg.model, 2)


def test_timers_block_formats_min_max_per_iteration_in_ms():
    timers = Timers(2, "minmax", torch.device("cpu"))
    times = {"forward-backward": [0.010, 0.030], "optimizer": [0.0, 0.004]}
    assert timers.format(times, 2) == ("(min, max) time across ranks (ms):\n"
                                       "    forward-backward ...............................: (5.00, 15.00)\n"
                                       "    optimizer ......................................: (2.00, 2.00)")
    timers.log_option = "max"
    assert timers.format(times, 2).splitlines()[1].endswith(": 15.00")
    timers.log_option = "all"
    assert timers.format(times, 2).splitlines() == ["times across ranks (ms):", "  forward-backward:",
                                                    "     rank  0: 5.00", "     rank  1: 15.00", "  optimizer:",
                                                    "     rank  1: 2.00"]


@pytest.mark.parametrize("level,option,header,names", [
    (0, "minmax", None, []),
    (1, "minmax", "(min, max) time across ranks (ms):", ["forward-backward", "all-grads-sync", "optimizer"]),
    (2, "max", "max time across ranks (ms):", ["forward-backward", "all-grads-sync", "optimizer", "batch-generator"]),
])
def test_timing_log_level_prints_its_timers_after_each_log_line(capsys, level, option, header, names):
    train("--train-iters", "4", "--log-interval", "2", "--timing-log-level", str(level),
          "--timing-log-option", option)
    lines = capsys.readouterr().out.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(" iteration")]
    assert len(starts) == 2
    if header is None:
        assert not any("time across ranks" in line for line in lines)
        return
    for i in starts:
        assert lines[i + 1] == header
        block = lines[i + 2:i + 2 + len(names)]
        assert [line.split()[0] for line in block] == names
        values = [float(v) for line in block for v in re.findall(r"\d+\.\d+", line.split(":")[-1])]
        assert all(v > 0 for v in values)


def _scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_under_megatrons_tags(tmp_path, monkeypatch):
    from torch.utils import tensorboard
    queues = []
    real = tensorboard.SummaryWriter

    def writer(*args, **kwargs):
        queues.append(kwargs["max_queue"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tensorboard, "SummaryWriter", writer)
    run = train("--train-iters", "4", "--log-interval", "2", "--tensorboard-dir", str(tmp_path),
                "--tensorboard-log-interval", "2", "--tensorboard-queue-size", "7", "--log-timers-to-tensorboard",
                "--timing-log-level", "1", "--log-validation-ppl-to-tensorboard", "--log-memory-to-tensorboard",
                "--eval-interval", "2", "--eval-iters", "1", "--log-params-norm")
    assert queues == [7]
    scalars = _scalars(tmp_path)
    losses = {h["iteration"]: h["lm loss"] for h in run.history}
    assert [s for s, _ in scalars["lm loss"]] == [2, 4]
    assert [v for _, v in scalars["lm loss"]] == pytest.approx([losses[2], losses[4]], rel=1e-6)
    assert [s for s, _ in scalars["lm loss vs samples"]] == [4, 8]
    assert [v for _, v in scalars["batch-size"]] == [2.0, 2.0]
    for tag in ("learning-rate", "loss-scale", "grad-norm", "params-norm", "iteration-time",
                "forward-backward-time", "optimizer-time", "lm loss validation", "lm loss validation ppl"):
        assert [s for s, _ in scalars[tag]] == [2, 4], tag
    ppl = scalars["lm loss validation ppl"]
    assert [v for _, v in ppl] == pytest.approx([math.exp(v) for _, v in scalars["lm loss validation"]], rel=1e-5)
    memory = {tag for tag in scalars if tag.startswith("mem-")}
    if run.state.device.type == "cuda":
        assert memory == {"mem-reserved-bytes", "mem-allocated-bytes", "mem-max-allocated-bytes",
                          "mem-allocated-count"}
    else:
        assert memory == set()   # no CUDA memory statistics on a CPU


def test_no_log_loss_scale_to_tensorboard_leaves_it_out(tmp_path):
    train("--train-iters", "2", "--tensorboard-dir", str(tmp_path), "--no-log-loss-scale-to-tensorboard")
    scalars = _scalars(tmp_path)
    assert "lm loss" in scalars and "loss-scale" not in scalars and "iteration-time" not in scalars
    assert "samples vs steps" not in scalars   # a W&B-only series


def _wandb_records(path):
    """The records of a .wandb file: a 7-byte header, then LevelDB log blocks of 32 KiB whose
    chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) hold protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_logged_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))   # no ~/.netrc login: offline
    run = train("--train-iters", "2", "--log-interval", "1", "--wandb-project", "p", "--wandb-exp-name", "e",
                "--wandb-save-dir", str(tmp_path / "wb"))
    files = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    deadline = time.time() + 60   # the W&B service finishes writing the file after finish() returns
    while time.time() < deadline and not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(files[0])):
        time.sleep(0.2)
    logged = {}
    for record in _wandb_records(files[0]):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                logged.setdefault(key, {})[items["_step"]] = value
    assert logged["lm loss"] == pytest.approx({h["iteration"]: h["lm loss"] for h in run.history})
    assert logged["learning-rate"] == pytest.approx({h["iteration"]: h["lr"] for h in run.history})
    assert logged["samples vs steps"] == {1: 2, 2: 4}
    assert {"grad-norm", "loss-scale", "batch-size"} <= set(logged)


def test_profile_writes_a_trace_of_the_chosen_iterations(tmp_path):
    train("--train-iters", "3", "--profile", "--profile-step-start", "1", "--profile-step-end", "2",
          "--tensorboard-dir", str(tmp_path))
    with gzip.open(tmp_path / "torch_profile" / "rank-0.json.gz", "rt") as f:
        trace = json.load(f)
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("aten::")}
    assert "aten::mm" in steps or "aten::addmm" in steps


def test_profile_ranks_without_this_rank_writes_no_trace(tmp_path):
    train("--train-iters", "3", "--profile", "--profile-step-start", "1", "--profile-step-end", "2",
          "--profile-ranks", "1", "--tensorboard-dir", str(tmp_path))
    assert not (tmp_path / "torch_profile").exists()


def _recording_iterators(seen):
    def make(run):
        def recorded(batches):
            for batch in batches:
                seen.append(gc.isenabled())
                yield batch
        train_iter, valid_iter, _ = training.build_data(run)
        return recorded(train_iter), recorded(valid_iter)
    return make


@pytest.mark.parametrize("eval_flag,expected", [
    ([], [2, 2, 2, 0, 2, 2, 0, 2]),                  # start, it 2, around eval 3, it 4, around eval 6, it 6
    (["--no-manual-gc-eval"], [2, 2, 2, 2]),
])
def test_manual_gc_disables_the_collector_and_collects_at_megatrons_points(monkeypatch, eval_flag, expected):
    calls, seen = [], []
    real_collect = gc.collect

    def collect(generation=2):
        calls.append(generation)
        return real_collect(generation)

    monkeypatch.setattr(training.gc, "collect", collect)
    assert gc.isenabled()
    train("--train-iters", "6", "--manual-gc", "--manual-gc-interval", "2", "--eval-interval", "3",
          "--eval-iters", "1", *eval_flag, data_iterators=_recording_iterators(seen))
    assert calls == expected
    assert seen and not any(seen)      # off while the loop runs
    assert gc.isenabled()              # and back on after it


def test_empty_unused_memory_level_empties_the_cache_at_its_points(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    for level, calls in ((0, 0), (1, 1), (2, 2)):
        emptied.clear()
        run = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(empty_unused_memory_level=level)),
                              state=SimpleNamespace(device=torch.device("cuda")))
        training.empty_unused_memory(run, 1)
        training.empty_unused_memory(run, 2)
        assert len(emptied) == calls
    cpu = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(empty_unused_memory_level=2)),
                          state=SimpleNamespace(device=torch.device("cpu")))
    emptied.clear()
    training.empty_unused_memory(cpu, 1)
    assert emptied == []


def _hash_check(rank, world_size):
    import torch.distributed as dist
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    check_weight_hash_across_dp_replicas(module, dist.group.WORLD, rank, 5, torch.device("cpu"))
    if rank == 1:
        with torch.no_grad():
            module[1].bias[0] += 1e-7
    try:
        check_weight_hash_across_dp_replicas(module, dist.group.WORLD, rank, 6, torch.device("cpu"))
    except RuntimeError as e:
        return str(e)
    return None


def test_weight_hash_check_passes_for_equal_replicas_and_names_a_tampered_one():
    errors = run_distributed(_hash_check, 2)
    for error in errors:
        assert error is not None
        assert "weights differ across data-parallel replicas after iteration 6" in error
        assert "1.bias on DP ranks [1]" in error and "0.weight" not in error


def test_weight_hash_check_runs_at_start_and_every_interval(capsys):
    train("--train-iters", "4", "--check-weight-hash-across-dp-replicas-interval", "2")
    out = capsys.readouterr().out
    assert re.findall(r">>> Weight hashes match after (\d+) iterations", out) == ["0", "2", "4"]


def test_wandb_project_without_a_run_name_is_refused_at_start_up():
    from megatron_lite.arguments import ConfigError, parse_args, validate
    with pytest.raises(ConfigError, match="--wandb-project needs --wandb-exp-name"):
        validate(parse_args(FLAGS + ["--train-iters", "2", "--wandb-project", "p"]), 1)
