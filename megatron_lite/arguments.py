"""Megatron-LM-compatible command line (and `--config run.yaml`) -> RunConfig.

Flags are generated from the config dataclasses, so a field and its flag cannot drift
apart. YAML keys are the flag names with or without the dashes (`tensor-model-parallel-size`
or `tensor_model_parallel_size`), flat or nested under the section names; command-line
flags override the file. Unknown flags and keys are errors. `validate` checks the
combinations that cannot work before any process group exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import List, Optional, Sequence

from megatron_lite.config import SECTIONS, SELECTIVE_RECOMPUTE_MODULES, RunConfig


class ConfigError(ValueError):
    """A flag value or combination that cannot work; the message names the fix."""


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(tp):
    if isinstance(tp, str):
        tp = eval(tp, {"Optional": Optional, "List": List}, {})  # config.py uses postponed annotations
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) in (list, List):
        return list, typing.get_args(tp)[0]
    return tp, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="megatron_lite: Megatron-style GPT/Llama training", allow_abbrev=False,
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", dest="__config", metavar="RUN.YAML",
                        help="YAML file of flags (same names); the command line overrides it")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            if f.name == "padded_vocab_size":
                continue
            names = [_flag_name(f), *f.metadata.get("aliases", ())]
            dest = f"{section}.{f.name}"
            tp, elem = _base_type(f.type)
            help_ = f.metadata.get("help", "")
            if tp is bool:
                action = "store_false" if f.metadata.get("store_false") else "store_true"
                group.add_argument(*names, dest=dest, action=action, help=help_)
            elif tp is list:
                group.add_argument(*names, dest=dest, nargs=f.metadata.get("nargs") or "*", type=elem, metavar=f.name.upper(),
                                   help=help_)
            else:
                group.add_argument(*names, dest=dest, type=tp, choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else f.name.upper(),
                                   help=help_)
    return parser


def _yaml_overrides(path: str, parser: argparse.ArgumentParser) -> dict:
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    flat = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({k: v for k, v in value.items()})
        else:
            flat[key] = value
    by_name = {}
    for action in parser._actions:
        for opt in action.option_strings:
            by_name[opt.lstrip("-").replace("-", "_")] = action
        if action.dest and "." in action.dest:
            by_name.setdefault(action.dest.split(".", 1)[1], action)
    out = {}
    for key, value in flat.items():
        action = by_name.get(str(key).replace("-", "_"))
        if action is None:
            raise ConfigError(f"{path}: unknown key '{key}'; use the flag names of `pretrain_gpt.py --help`")
        if isinstance(action, argparse._StoreFalseAction) and str(key).replace("-", "_").startswith(
                ("no_", "disable_")):
            value = not value
        out[action.dest] = value
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """Parse Megatron-style flags (and an optional --config YAML) into a RunConfig."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv if argv is not None else sys.argv[1:]))
    values = {}
    config_path = ns.pop("__config", None)
    if config_path:
        values.update(_yaml_overrides(config_path, parser))
    values.update(ns)
    cfg = RunConfig()
    for dest, value in values.items():
        section, name = dest.split(".", 1)
        setattr(getattr(cfg, section), name, value)
    return cfg


def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: round up to a multiple of make_vocab_size_divisible_by * TP."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def validate(cfg: RunConfig, world_size: int) -> RunConfig:
    """Check combinations once, before any process group is made; fill derived defaults."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optimizer
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}; "
                          f"launch a multiple of {tp * pp} processes or change the parallel sizes")
    dp = world_size // (tp * pp)
    if m.num_attention_heads % tp:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"--tensor-model-parallel-size {tp}; pick a TP size that divides the heads")
    if m.group_query_attention:
        if not m.num_query_groups:
            raise ConfigError("--group-query-attention needs --num-query-groups")
        if m.num_attention_heads % m.num_query_groups:
            raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                              f"--num-query-groups {m.num_query_groups}")
    if m.query_groups % tp:
        raise ConfigError(f"--num-query-groups {m.query_groups} is not divisible by "
                          f"--tensor-model-parallel-size {tp}; pick a TP size that divides the query groups")
    if m.num_layers % pp:
        raise ConfigError(f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size "
                          f"{pp}; pick a PP size that divides the layers")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                          f"{m.num_attention_heads}; set --kv-channels or change the sizes")
    if m.position_embedding_type == "rope" and (m.head_dim * m.rotary_percent) % 2:
        raise ConfigError("the rotated part of the head dimension must be even; change --rotary-percent")
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                          f"{t.micro_batch_size} x data-parallel size {dp}; change one of them")
    if t.train_iters is not None and t.train_samples is not None:
        raise ConfigError("give --train-iters or --train-samples, not both")
    if t.train_iters is None and t.train_samples is None:
        raise ConfigError("give --train-iters N (or --train-samples N)")
    if o.bf16 and o.fp16:
        raise ConfigError("--bf16 and --fp16 are exclusive; pick one")
    if (o.exp_avg_dtype, o.exp_avg_sq_dtype) != ("fp32", "fp32"):
        if not o.use_precision_aware_optimizer:
            raise ConfigError("--exp-avg-dtype / --exp-avg-sq-dtype other than fp32 need "
                              "--use-precision-aware-optimizer")
        if o.optimizer != "adam":
            raise ConfigError(f"--exp-avg-dtype / --exp-avg-sq-dtype apply to --optimizer adam, not {o.optimizer}")
    if o.main_grads_dtype != "fp32":
        if not o.use_precision_aware_optimizer:
            raise ConfigError("--main-grads-dtype bf16 needs --use-precision-aware-optimizer")
        if not o.bf16:
            raise ConfigError("--main-grads-dtype bf16 applies to --bf16 training (the gradients are the bf16 "
                              "weights' own dtype); add --bf16 or drop the flag")
        if o.optimizer != "adam":
            raise ConfigError(f"--main-grads-dtype bf16 applies to --optimizer adam, not {o.optimizer}")
    if m.recompute_granularity == "full":
        m.recompute_activations = True
    if m.recompute_modules and m.recompute_granularity != "selective":
        raise ConfigError("--recompute-modules needs --recompute-granularity selective")
    if m.recompute_granularity == "selective":
        if m.recompute_activations:
            raise ConfigError("--recompute-activations recomputes whole layers; it does not combine with "
                              "--recompute-granularity selective (drop one of them)")
        unknown = sorted(set(m.recompute_modules) - set(SELECTIVE_RECOMPUTE_MODULES))
        if unknown or not m.recompute_modules:
            raise ConfigError(f"--recompute-modules takes {' '.join(SELECTIVE_RECOMPUTE_MODULES)}"
                              + (f", not {' '.join(unknown)}" if unknown else " (none given)")
                              + "; attention runs in SDPA, which keeps no score matrix (no core_attn)")
    if p.sequence_parallel and tp == 1:
        p.sequence_parallel = False
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.position_embedding_type == "learned_absolute" and m.seq_length > m.max_position_embeddings:
        raise ConfigError(f"--seq-length {m.seq_length} exceeds --max-position-embeddings "
                          f"{m.max_position_embeddings}")
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = 4 * m.hidden_size
    if m.ffn_hidden_size % tp:
        raise ConfigError(f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by TP {tp}")
    c = cfg.checkpoint
    if c.finetune and c.reset_sample_stat:
        raise ConfigError("--finetune and --reset-sample-stat are different modes; pick one")
    if c.finetune and not c.load and not c.pretrained_checkpoint:
        raise ConfigError("--finetune needs --load DIR (the checkpoint to start from)")
    if c.save_interval is not None and c.save_interval <= 0:
        raise ConfigError("--save-interval must be positive")
    if (c.save_interval or c.save_weights_only_interval) and not c.save:
        raise ConfigError("--save-interval needs --save DIR")
    return cfg


def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
