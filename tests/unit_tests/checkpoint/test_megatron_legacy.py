"""Megatron-LM's legacy checkpoint format (--ckpt-format torch) against Megatron-Core's own GPTModel.

A checkpoint is written the way Megatron-LM writes one (torch.save of a dict with `args`, the
GPTModel state_dict with its `_extra_state` entries, ...) from Megatron-Core at TP 2; megatron_lite
loads it at TP 1 and at TP 2 x PP 2 and must give Megatron-Core's logits. The reverse: megatron_lite's
writer at TP 2, loaded into Megatron-Core as Megatron-LM's load_checkpoint does (torch.load, then
load_state_dict(strict=True)), gives the same logits, and its args pass check_checkpoint_args.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import types

import pytest
import torch
import torch.distributed as dist

from megatron_lite.checkpoint.formats import megatron_legacy
from megatron_lite.checkpoint.formats.megatron_args import megatron_args_from_config
from megatron_lite.checkpoint.recovery import CheckpointLoadError
from megatron_lite.config import DataConfig, ModelConfig, RunConfig
from megatron_lite.initialize import Progress
from megatron_lite.model.gpt import GPTModel
from megatron_lite.ops import build_ops
from megatron_lite.parallel.random import get_rng_state
from megatron_lite.parallel.state import initialize
from tests.unit_tests.checkpoint.megatron_core_reference import build_core_gpt, core_logits, initialize_core
from tests.unit_tests.dist_utils import run_distributed

VOCAB, PADDED = 250, 256
COMMON = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
              vocab_size=VOCAB, padded_vocab_size=PADDED, make_vocab_size_divisible_by=8, hidden_dropout=0.0,
              attention_dropout=0.0)
MODELS = {
    "llama": ModelConfig(**COMMON, normalization="RMSNorm", swiglu=True, ffn_hidden_size=96,
                         group_query_attention=True, num_query_groups=2, position_embedding_type="rope",
                         add_position_embedding=False, untie_embeddings_and_output_weights=True,
                         add_bias_linear=False),
    "gpt": ModelConfig(**COMMON, ffn_hidden_size=128, bias_gelu_fusion=False),
}
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
SCHEDULER = {"max_lr": 3e-4, "lr_warmup_steps": 64, "num_steps": 640, "lr_decay_style": "cosine",
             "lr_decay_steps": 6400, "min_lr": 3e-5, "start_wd": 0.1, "end_wd": 0.1, "wd_incr_style": "constant",
             "wd_incr_steps": 6400}


def megatron_lm_args(m: ModelConfig, tp: int, pp: int):
    """args as Megatron-LM's parse_args + validate_args leave them (the fields its loaders read)."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_size,
        num_attention_heads=m.num_attention_heads, group_query_attention=m.group_query_attention,
        num_query_groups=m.num_query_groups, kv_channels=m.head_dim, seq_length=m.seq_length,
        max_position_embeddings=m.seq_length, padded_vocab_size=PADDED, make_vocab_size_divisible_by=8,
        normalization=m.normalization, norm_epsilon=m.norm_epsilon, swiglu=m.swiglu,
        position_embedding_type=m.position_embedding_type, add_position_embedding=m.add_position_embedding,
        use_rotary_position_embeddings=m.position_embedding_type == "rope", rotary_base=10000,
        rotary_percent=1.0, untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        add_bias_linear=m.add_bias_linear, add_qkv_bias=False, apply_layernorm_1p=False, qk_layernorm=False,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        data_parallel_size=1, world_size=tp * pp, consumed_train_samples=640, consumed_valid_samples=32,
        tokenizer_type="NullTokenizer", attention_backend=AttnBackend.auto, params_dtype=torch.float32,
        transformer_impl="local", global_batch_size=64, micro_batch_size=2, lr=3e-4)


def run_config(m: ModelConfig) -> RunConfig:
    return RunConfig(model=m, data=DataConfig(tokenizer_type="NullTokenizer"))


def check_checkpoint_args(saved, run_args):
    """Megatron-LM's check_checkpoint_args (megatron/training/checkpointing.py), re-implemented:
    these fields of the saved args must equal the running ones."""
    for name in ("num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
                 "max_position_embeddings", "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size"):
        assert getattr(saved, name) == getattr(run_args, name), name


def te_names(model: dict) -> dict:
    """The same state_dict under Transformer Engine spec names (norms fused into the next linear)."""
    out = {}
    for k, v in model.items():
        for te, local in megatron_legacy.TE_NAMES:
            if k.endswith(local):
                k = k[: -len(local)] + te
        out[k] = v
    return out


def write_megatron_file(root, iteration: int, tp_rank: int, args, model: dict) -> None:
    path = os.path.join(root, f"iter_{iteration:07d}", f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model,
                "opt_param_scheduler": SCHEDULER, "num_floating_point_operations_so_far": 12345}, path)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def gathered(out, state) -> torch.Tensor:
    """[s, b, v/TP] logits of every TP rank -> [b, s, true vocab]."""
    if state.tp_size > 1:
        parts = [torch.empty_like(out) for _ in range(state.tp_size)]
        dist.all_gather(parts, out.contiguous(), group=state.tp_group)
        out = torch.cat(parts, dim=-1)
    return out.transpose(0, 1)[..., :VOCAB]


def ml_logits(m: ModelConfig, model_state: dict, state, ops):
    """megatron_lite's logits on the last stage (None elsewhere); stages pass activations by send/recv."""
    model = GPTModel(m, state, ops, init_weights=False)
    model.load_state_dict(model_state, strict=True)
    model.eval()
    if not state.is_first_stage:
        hidden = torch.empty(IDS.shape[1], IDS.shape[0], m.hidden_size)
        dist.recv(hidden, src=state.prev_rank)
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(IDS, torch.arange(IDS.shape[1]).expand_as(IDS))
    if not state.is_last_stage:
        dist.send(out.contiguous(), dst=state.next_rank)
        return None
    return gathered(out, state), model


def _megatron_tp2_body(rank, world_size, root):
    """Megatron-Core at TP 2: write its checkpoints, read them back at TP 2, write ours, load ours into it."""
    state = initialize(2, 1)
    initialize_core(tp=2)
    ops = build_ops(fused_kernels=False)
    results = {}
    for name, m in MODELS.items():
        core = build_core_gpt(m, seed=1)
        want = gathered(core_logits(core, IDS).transpose(0, 1), state)
        sd = core.state_dict()
        extra = sorted(k for k in sd if k.endswith("_extra_state"))
        write_megatron_file(os.path.join(root, name), 100, state.tp_rank, megatron_lm_args(m, 2, 1), sd)
        write_megatron_file(os.path.join(root, name + "_te"), 100, state.tp_rank, megatron_lm_args(m, 2, 1),
                            te_names(sd))
        dist.barrier()
        ckpt = megatron_legacy.open_checkpoint(os.path.join(root, name, "iter_0000100"))
        got, ours = ml_logits(m, ckpt.model_state(m, 2, 1, state.tp_rank, 0), state, ops)
        run = types.SimpleNamespace(
            cfg=run_config(m), state=state, module=ours, progress=Progress(iteration=7, consumed_train_samples=56),
            scheduler=types.SimpleNamespace(state_dict=lambda: dict(SCHEDULER)), mode="pretrain",
            optimizer=types.SimpleNamespace(state_dict=lambda: {"state": {}, "param_groups": []}))
        megatron_legacy.save(run, os.path.join(root, name + "_ours"))
        shard = os.path.join(root, name + "_ours", "iter_0000007", f"mp_rank_{state.tp_rank:02d}", "model_optim_rng.pt")
        saved = torch.load(shard, weights_only=False)   # as Megatron-LM's load_checkpoint reads it
        fresh = build_core_gpt(m, seed=2)
        fresh.load_state_dict(saved["model"], strict=True)
        check_checkpoint_args(saved["args"], megatron_lm_args(m, 2, 1))
        results[name] = {"want": want, "ours_at_tp2": got, "core_from_ours": gathered(
            core_logits(fresh, IDS).transpose(0, 1), state), "extra_state": extra,
            "tracker": open(os.path.join(root, name + "_ours", "latest_checkpointed_iteration.txt")).read(),
            "consumed": saved["args"].consumed_train_samples}
    return results


def _tp2_pp2_body(rank, world_size, root):
    state = initialize(2, 2)
    ops = build_ops(fused_kernels=False)
    out = {}
    for name, m in MODELS.items():
        ckpt = megatron_legacy.open_checkpoint(os.path.join(root, name, "iter_0000100"))
        res = ml_logits(m, ckpt.model_state(m, 2, 2, state.tp_rank, state.pp_rank), state, ops)
        out[name] = res[0] if res else None
    return out


@pytest.fixture(scope="module")
def megatron_checkpoints(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("megatron_legacy"))
    return root, run_distributed(_megatron_tp2_body, 2, root)[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_megatron_checkpoint_loads_at_tp1_with_megatron_core_logits(megatron_checkpoints, name):
    root, results = megatron_checkpoints
    want = results[name]["want"]
    assert want.abs().max().item() > 1e-2    # the comparison below is not one of near-zero numbers
    state, ops = initialize(1, 1), build_ops(fused_kernels=False)
    for variant in (name, name + "_te"):   # Transformer Engine names and _extra_state map onto ours
        found = megatron_legacy.find_iteration(os.path.join(root, variant))
        assert found[0] == 100
        ckpt = megatron_legacy.open_checkpoint(found[1])
        got, _ = ml_logits(MODELS[name], ckpt.model_state(MODELS[name], 1, 1, 0, 0), state, ops)
        assert (got - want).abs().max().item() < 1e-5, variant
    assert (results[name]["ours_at_tp2"] - want).abs().max().item() < 1e-5
    assert ckpt.metadata["parallel"] == {"tp": 2, "pp": 1, "dp": 1}
    assert ckpt.metadata["progress"] == {"iteration": 100, "consumed_train_samples": 640,
                                         "consumed_valid_samples": 32, "floating_point_operations_so_far": 12345}
    model_cfg = ModelConfig(**{**ckpt.metadata["config"]["model"], "vocab_size": VOCAB})
    for field in ("normalization", "swiglu", "num_query_groups", "ffn_hidden_size", "position_embedding_type",
                  "untie_embeddings_and_output_weights", "add_bias_linear", "padded_vocab_size"):
        assert getattr(model_cfg, field) == getattr(MODELS[name], field), field
    assert ckpt.scheduler_state()[0]["num_steps"] == 640


def test_megatron_checkpoint_loads_at_tp2_pp2_with_megatron_core_logits(megatron_checkpoints):
    root, results = megatron_checkpoints
    last = run_distributed(_tp2_pp2_body, 4, root)[2]    # rank of (tp_rank 0, last stage)
    for name in MODELS:
        assert (last[name] - results[name]["want"]).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("name", list(MODELS))
def test_our_checkpoint_loads_strictly_into_megatron_core(megatron_checkpoints, name):
    _, results = megatron_checkpoints
    r = results[name]
    assert r["extra_state"], "Megatron-Core's local spec has _extra_state entries; the writer must add them"
    assert (r["core_from_ours"] - r["want"]).abs().max().item() < 1e-5
    assert r["tracker"] == "7" and r["consumed"] == 56


def test_loader_refuses_a_class_megatron_does_not_save(tmp_path):
    args = argparse.Namespace(num_layers=2, data_path=pathlib.PurePosixPath("/data"))
    path = tmp_path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1, "model": {}}, path)
    with pytest.raises(CheckpointLoadError, match="PurePosixPath"):
        megatron_legacy.open_checkpoint(str(tmp_path / "iter_0000001"))


def test_written_args_describe_the_run():
    m = MODELS["llama"]
    state = types.SimpleNamespace(tp_size=2, pp_size=1, dp_size=4)
    args = megatron_args_from_config(run_config(m), state)
    check_checkpoint_args(args, megatron_lm_args(m, 2, 1))
    assert (args.num_query_groups, args.ffn_hidden_size, args.add_position_embedding, args.world_size) == \
        (2, 96, False, 8)


def test_rng_state_survives_megatron_layout(tmp_path):
    tracker = initialize(1, 1).rng
    ours = get_rng_state(tracker)
    path = tmp_path / "rng.pt"
    torch.save({"rng_state": [megatron_legacy.rng_to_megatron(ours)]}, path)
    back = megatron_legacy.rng_from_megatron(megatron_legacy.load_file(str(path))["rng_state"][0])
    assert torch.equal(back["torch"], ours["torch"])
    assert torch.equal(back["python"]["keys"], ours["python"]["keys"])
    assert torch.equal(back["numpy"]["keys"], ours["numpy"]["keys"])
    assert back["numpy"]["pos"] == ours["numpy"]["pos"]
    assert back["tracker"].keys() == ours["tracker"].keys()
