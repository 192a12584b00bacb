"""Megatron-LM's saved `args` (the argparse.Namespace in its checkpoints) and megatron_lite's config.

Most flags share a name, so a field takes the attribute of the same name. The exceptions:
older Megatron-LM wrote `layernorm_epsilon` (now `norm_epsilon`), its `attention_backend` is an
enum (its name is our choice string), and `transformer_impl` is how layers run, not what they
hold, so it stays the running config's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum

from megatron_lite.config import SECTIONS, RunConfig

CONFIG_SECTIONS = ("model", "data", "train", "optimizer", "parallel")
RUNTIME_FIELDS = {"transformer_impl", "distributed_backend", "fused_kernels"}
RENAMED = {"norm_epsilon": ("norm_epsilon", "layernorm_epsilon")}

MODE_ARG = "megatron_lite_mode"   # in args: the mode of the megatron_lite run that wrote it


def _plain(value):
    """A saved value as megatron_lite's config holds it (enums by name, tuples as lists)."""
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, tuple):
        return list(value)
    return value


def config_from_megatron_args(args) -> dict:
    """{"model": {...}, "data": {...}, "train": {...}, "optimizer": {...}, "parallel": {...}} with
    megatron_lite's field names, for every field `args` holds a value of."""
    out = {}
    for section in CONFIG_SECTIONS:
        values = {}
        for f in dataclasses.fields(SECTIONS[section]):
            if f.name in RUNTIME_FIELDS:
                continue
            for name in RENAMED.get(f.name, (f.name,)):
                if hasattr(args, name):
                    values[f.name] = _plain(getattr(args, name))
                    break
        out[section] = values
    model = out["model"]
    if model.get("position_embedding_type") == "rope":
        model["add_position_embedding"] = False
    if not model.get("group_query_attention"):
        model["num_query_groups"] = None
    return out


def megatron_args_from_config(cfg: RunConfig, state) -> argparse.Namespace:
    """The args Megatron-LM's load code reads (check_checkpoint_args, load_args_from_checkpoint,
    model building): every field of the run's config under its Megatron-LM name, plus the
    derived ones Megatron computes in validate_args. `state` is the run's ParallelState."""
    values = {}
    for section in SECTIONS:
        values.update({k: _plain(v) for k, v in dataclasses.asdict(getattr(cfg, section)).items()})
    m = cfg.model
    values.update(
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.head_dim,
        num_query_groups=m.query_groups,
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        add_position_embedding=m.position_embedding_type == "learned_absolute",
        use_rotary_position_embeddings=m.position_embedding_type == "rope",
        layernorm_epsilon=m.norm_epsilon,
        tensor_model_parallel_size=state.tp_size,
        pipeline_model_parallel_size=state.pp_size,
        data_parallel_size=state.dp_size,
        world_size=state.tp_size * state.pp_size * state.dp_size,
        virtual_pipeline_model_parallel_size=None,
        context_parallel_size=1,
        expert_model_parallel_size=1,
        num_experts=None,
        data_parallel_random_init=False,
        fp16=bool(getattr(cfg.optimizer, "fp16", False)),
        bf16=bool(getattr(cfg.optimizer, "bf16", False)),
        use_legacy_models=False,
        use_mcore_models=True,
        transformer_impl="local",
        ckpt_format="torch",
        ckpt_convert_format=None,
        rank=0,
    )
    return argparse.Namespace(**values)


def metadata_from_megatron(fmt: str, iteration, args, saved: dict, **holds) -> dict:
    """The SourceCheckpoint metadata of a Megatron-LM checkpoint: config, layout and progress from
    its args (the data-parallel size as Megatron derives it when args lack it), the flops count from
    the saved dict (`saved`: the legacy file or the torch_dist common state), and `holds`
    (has_optimizer, has_rng, distributed_optimizer) as the reader found them."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    dp = getattr(args, "data_parallel_size", None) or getattr(args, "world_size", tp * pp) // (tp * pp)
    return {
        "format": fmt, "iteration": iteration, "mode": getattr(args, MODE_ARG, "pretrain"),
        "config": config_from_megatron_args(args), "parallel": {"tp": tp, "pp": pp, "dp": dp},
        "progress": {"iteration": iteration if isinstance(iteration, int) else 0,
                     "consumed_train_samples": getattr(args, "consumed_train_samples", 0),
                     "consumed_valid_samples": getattr(args, "consumed_valid_samples", 0),
                     "floating_point_operations_so_far": saved.get("num_floating_point_operations_so_far", 0)},
        **holds}
