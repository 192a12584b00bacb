"""Megatron-Core's torch_dist format against Megatron-Core's own dist_checkpointing and GPTModel.

Megatron-Core at TP 2 saves with `dist_checkpointing.save(model.sharded_state_dict(), dir)` plus the
common state Megatron-LM's training adds; megatron_lite loads it at TP 1 and TP 2 x PP 2 and must give
Megatron-Core's logits. The reverse: megatron_lite's writer at TP 2, read by
`dist_checkpointing.load` into Megatron-Core's GPTModel at TP 1, gives the same logits.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
import torch.distributed as dist

from megatron_lite.checkpoint.formats import megatron_legacy, torch_dist
from megatron_lite.config import DataConfig, ModelConfig, RunConfig
from megatron_lite.initialize import Progress
from megatron_lite.model.gpt import GPTModel
from megatron_lite.ops import build_ops
from megatron_lite.checkpoint.reshard.sharding import skeleton_state
from megatron_lite.parallel.random import get_rng_state
from megatron_lite.parallel.state import initialize
from tests.unit_tests.checkpoint.megatron_core_reference import build_core_gpt, core_logits, initialize_core
from tests.unit_tests.checkpoint.test_megatron_legacy import (IDS, MODELS, SCHEDULER, gathered, megatron_lm_args,
                                                              ml_logits)
from tests.unit_tests.dist_utils import run_distributed

ITER = "iter_0000100"


def _core_setup(tp: int) -> None:
    torch.cuda.synchronize = lambda *a: None      # DCP's writer in Megatron-Core syncs CUDA before writing
    initialize_core(tp=tp)


def _core_from_dir(m: ModelConfig, iter_dir: str, state):
    """Megatron-Core's GPTModel at this process's TP, loaded with dist_checkpointing.load; its logits."""
    from megatron.core import dist_checkpointing

    core = build_core_gpt(m, seed=3)
    sharded = {"model": core.sharded_state_dict(metadata={"singleton_local_shards": False})}
    loaded = dist_checkpointing.load(sharded, iter_dir)
    assert loaded["iteration"] == 7 and loaded["args"].consumed_train_samples == 56
    core.load_state_dict(loaded["model"], strict=True)
    return gathered(core_logits(core, IDS).transpose(0, 1), state)


def _megatron_tp2_body(rank, world_size, root):
    """Megatron-Core at TP 2 saves torch_dist; megatron_lite reads it at TP 2 and saves its own."""
    from megatron.core import dist_checkpointing

    state = initialize(2, 1)
    _core_setup(2)
    ops = build_ops(fused_kernels=False)
    results = {}
    for name, m in MODELS.items():
        core = build_core_gpt(m, seed=1)
        want = gathered(core_logits(core, IDS).transpose(0, 1), state)
        iter_dir = os.path.join(root, name, ITER)
        if rank == 0:
            os.makedirs(iter_dir)
        dist.barrier()
        dist_checkpointing.save({"model": core.sharded_state_dict(metadata={"singleton_local_shards": False}),
                                 "args": megatron_lm_args(m, 2, 1), "checkpoint_version": 3.0, "iteration": 100,
                                 "opt_param_scheduler": SCHEDULER, "num_floating_point_operations_so_far": 12345},
                                iter_dir)
        if rank == 0:
            with open(os.path.join(root, name, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("100")
        dist.barrier()
        ckpt = torch_dist.open_checkpoint(iter_dir)
        got, ours = ml_logits(m, ckpt.model_state(m, 2, 1, state.tp_rank, 0), state, ops)
        rng_torch = get_rng_state(state.rng)["torch"]
        torch_dist.save(_run(m, state, ours), os.path.join(root, name + "_ours"))
        results[name] = {"want": want, "ours_at_tp2": got, "rng_torch": rng_torch,
                         "core_at_tp2_from_ours": _core_from_dir(m, os.path.join(root, name + "_ours",
                                                                                 "iter_0000007"), state)}
    return results


def _core_tp1_body(rank, world_size, root):
    state = initialize(1, 1)
    _core_setup(1)
    return {(name, ours): _core_from_dir(m, os.path.join(root, name + ours, "iter_0000007"), state)
            for name, m in MODELS.items() for ours in ("_ours", "_ours_tp2_pp2")}


def _run(m: ModelConfig, state, module):
    """The parts of a Run that torch_dist.save reads."""
    return types.SimpleNamespace(
        cfg=RunConfig(model=m, data=DataConfig(tokenizer_type="NullTokenizer")), state=state, module=module,
        progress=Progress(iteration=7, consumed_train_samples=56), mode="pretrain",
        scheduler=types.SimpleNamespace(state_dict=lambda: dict(SCHEDULER)))


def _tp2_pp2_body(rank, world_size, root):
    state = initialize(2, 2)
    ops = build_ops(fused_kernels=False)
    out = {}
    for name, m in MODELS.items():
        ckpt = torch_dist.open_checkpoint(os.path.join(root, name, ITER))
        stage = ckpt.model_state(m, 2, 2, state.tp_rank, state.pp_rank)
        res = ml_logits(m, stage, state, ops)
        out[name] = res[0] if res else None
        model = GPTModel(m, state, ops, init_weights=False)
        model.load_state_dict(stage, strict=True)
        torch_dist.save(_run(m, state, model), os.path.join(root, name + "_ours_tp2_pp2"))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("torch_dist"))
    return root, run_distributed(_megatron_tp2_body, 2, root)[0]


@pytest.fixture(scope="module")
def tp2_pp2(checkpoints):
    """Logits of megatron_lite at TP 2 x PP 2 on Megatron-Core's checkpoint (it also saves ours there)."""
    return run_distributed(_tp2_pp2_body, 4, checkpoints[0])[2]    # rank of (tp_rank 0, last stage)


def _close(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(MODELS))
def test_megatron_core_torch_dist_loads_at_tp1_with_its_logits(checkpoints, name):
    root, results = checkpoints
    m, want = MODELS[name], results[name]["want"]
    found = megatron_legacy.find_iteration(os.path.join(root, name))
    assert found[0] == 100 and torch_dist.detect(found[1])
    ckpt = torch_dist.open_checkpoint(found[1])
    got, _ = ml_logits(m, ckpt.model_state(m, 1, 1, 0, 0), initialize(1, 1), build_ops(fused_kernels=False))
    assert _close(got, want) < 1e-5
    assert _close(results[name]["ours_at_tp2"], want) < 1e-5
    assert ckpt.metadata["parallel"] == {"tp": 2, "pp": 1, "dp": 1}
    assert ckpt.metadata["progress"] == {"iteration": 100, "consumed_train_samples": 640,
                                         "consumed_valid_samples": 32, "floating_point_operations_so_far": 12345}
    assert ckpt.scheduler_state()[0]["num_steps"] == 640
    assert ckpt.optimizer_state(None)[0] is None


def test_megatron_core_torch_dist_loads_at_tp2_pp2_with_its_logits(checkpoints, tp2_pp2):
    _, results = checkpoints
    for name in MODELS:
        assert _close(tp2_pp2[name], results[name]["want"]) < 1e-5, name


def test_our_torch_dist_from_tp2_and_tp2_pp2_loads_into_megatron_core_at_tp2_and_tp1(checkpoints, tp2_pp2):
    root, results = checkpoints
    at_tp1 = run_distributed(_core_tp1_body, 1, root)[0]
    for name in MODELS:
        want = results[name]["want"]
        assert _close(results[name]["core_at_tp2_from_ours"], want) < 1e-5, name
        assert _close(at_tp1[name, "_ours"], want) < 1e-5, name
        assert _close(at_tp1[name, "_ours_tp2_pp2"], want) < 1e-5, name
        assert open(os.path.join(root, name + "_ours", "latest_checkpointed_iteration.txt")).read().strip() == "7"
        ckpt = torch_dist.open_checkpoint(os.path.join(root, name + "_ours", "iter_0000007"))
        assert ckpt.metadata["progress"]["consumed_train_samples"] == 56
        rng, _ = ckpt.rng_state(skeleton_state(2, 1, 0, 0))
        assert torch.equal(rng["torch"], results[name]["rng_torch"])
        assert ckpt.rng_state(skeleton_state(1, 1, 0, 0))[0] is None


def test_detect_tells_torch_dist_from_megatron_lite_and_legacy(checkpoints, tmp_path):
    root, _ = checkpoints
    assert torch_dist.detect(os.path.join(root, "llama", ITER))
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "metadata.json").write_text(json.dumps({"config": {}, "tensors": {}, "parallel": {"tp": 1}}))
    legacy = tmp_path / "legacy" / "mp_rank_00"
    legacy.mkdir(parents=True)
    torch.save({"args": None}, legacy / "model_optim_rng.pt")
    assert not torch_dist.detect(str(ours))
    assert not torch_dist.detect(str(legacy.parent))
    assert not megatron_legacy.detect(os.path.join(root, "llama", ITER))
