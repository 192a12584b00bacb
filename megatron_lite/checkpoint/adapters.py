"""LoRA runs' checkpoints: the adapters only, naming the base checkpoint they adapt.

An adapter checkpoint is a megatron_lite checkpoint like any other (layout, checksums, modes,
fallback, retention, best) whose model files and tensor index hold only the adapters
(`sharding.rank_params` of a LoRA config lists only them) and whose optimizer state is the
adapters' (the base is frozen). Its metadata.json adds

    "lora": {"rank", "alpha", "dropout", "target_modules"}
    "base": {"dir": absolute path, "iteration", "format", "checksum": "sha256:..."}

Loading one loads the base checkpoint it names first, once its checksum is found unchanged.
The checksum of a megatron_lite base is the SHA-256 of its metadata.json, which holds the CRC-32
of every file (each checked when the base loads); of a Megatron-LM base, which has no
checksums, the SHA-256 of every file's relative path and bytes.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict

import torch

from megatron_lite.arguments import ConfigError
from megatron_lite.checkpoint.formats import OWN_FORMAT
from megatron_lite.checkpoint.io.layout import METADATA_FILENAME, iteration_dir_name
from megatron_lite.checkpoint.recovery import CheckpointLoadError, bytes_on_disk, choose_checkpoint
from megatron_lite.config import ModelConfig
from megatron_lite.model.lora import base_config, is_adapter, lora_settings

_CHUNK = 8 << 20


def _sha256_files(root: str, paths) -> str:
    digest = hashlib.sha256()
    for rel in paths:
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def checkpoint_checksum(iter_dir: str, fmt: str) -> str:
    """The checksum an adapter checkpoint records of its base (see the module docstring)."""
    if fmt == OWN_FORMAT:
        return _sha256_files(iter_dir, [METADATA_FILENAME])
    files = sorted(os.path.relpath(os.path.join(d, n), iter_dir) for d, _, names in os.walk(iter_dir) for n in names)
    return _sha256_files(iter_dir, files)


def base_record(load_dir: str, iter_dir: str, iteration, fmt: str) -> dict:
    return {"dir": os.path.abspath(load_dir), "iteration": iteration, "format": fmt,
            "checksum": checkpoint_checksum(iter_dir, fmt)}


def describe_base(base: dict) -> str:
    return os.path.join(base["dir"], iteration_dir_name(base["iteration"]))


def check_adapter_checkpoint(model_cfg: ModelConfig, metadata: dict, iter_dir: str) -> None:
    """An adapter checkpoint loads only into a run with the same adapters."""
    saved = metadata["lora"]
    flags = (f"--lora-rank {saved['rank']} --lora-alpha {saved['alpha']} --lora-target-modules "
             f"{' '.join(saved['target_modules'])}")
    if not model_cfg.lora_rank:
        raise ConfigError(f"{iter_dir} holds only LoRA adapters (of the base {describe_base(metadata['base'])}): "
                          f"pass {flags} to load them, or merge them into the base with "
                          f"`python -m megatron_lite.tools.convert --merge-lora`")
    mine = lora_settings(model_cfg)
    diffs = [f"{k}={saved[k]} (flags say {mine[k]})" for k in ("rank", "alpha", "target_modules") if saved[k] != mine[k]]
    if diffs:
        raise ConfigError(f"{iter_dir} holds LoRA adapters with " + ", ".join(diffs) + f"; pass {flags}")


def check_base_unchanged(base: dict, found_iter_dir: str, iter_dir: str) -> None:
    now = checkpoint_checksum(found_iter_dir, base["format"])
    if now != base["checksum"]:
        raise ConfigError(f"the base checkpoint {describe_base(base)} changed since the adapters in {iter_dir} were "
                          f"saved (checksum {base['checksum'][:19]}..., now {now[:19]}...): the adapters were "
                          f"trained on other weights; restore that base checkpoint, or start a new LoRA run "
                          f"from this one with --finetune")


def load_base_weights(module: torch.nn.Module, source, model_cfg: ModelConfig, tp: int, pp: int, tp_rank: int,
                      pp_rank: int) -> None:
    """The frozen base weights of a LoRA model from `source` (any format, resharded as needed);
    the adapters are left as they are."""
    local = source.model_state(base_config(model_cfg), tp, pp, tp_rank, pp_rank)
    own = module.state_dict()
    local = {k: v.to(own[k].dtype) if k in own else v for k, v in local.items()}
    missing, unexpected = module.load_state_dict(local, strict=False)
    missing = [k for k in missing if not is_adapter(k)]
    if missing or unexpected:
        raise ConfigError(f"{source.iter_dir} does not hold the base model of this LoRA model (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}); fix the model flags")


def restore_lora_weights(run, decision, open_checkpoint) -> tuple:
    """A LoRA run's weights: the frozen base, then the adapters; (report line, base record, base bytes).
    From an adapter checkpoint the base is the checkpoint it names (checked unchanged); from any other
    checkpoint, that checkpoint is the base and the adapters start fresh. `open_checkpoint(dir, plan)`
    gives (metadata, reader) of a chosen checkpoint."""
    d, s, module = decision, run.state, run.module
    layout_of = (s.tp_size, s.pp_size, s.tp_rank, s.pp_rank)
    if not d.metadata.get("lora"):
        load_base_weights(module, d.source, run.cfg.model, *layout_of)
        base = base_record(d.load_dir, d.plan.iter_dir, d.plan.iteration, d.source.format)
        return f"base loaded, LoRA adapters fresh (rank {run.cfg.model.lora_rank})", base, bytes_on_disk(d.plan.iter_dir)
    check_adapter_checkpoint(run.cfg.model, d.metadata, d.plan.iter_dir)
    base = d.metadata["base"]
    try:
        plan = choose_checkpoint(base["dir"], base["iteration"], s, allow_weights_only=True)
    except CheckpointLoadError as e:
        raise ConfigError(f"the base checkpoint of {d.plan.iter_dir} cannot be loaded: {e}") from None
    check_base_unchanged(base, plan.iter_dir, d.plan.iter_dir)
    load_base_weights(module, open_checkpoint(base["dir"], plan)[1], run.cfg.model, *layout_of)
    own = module.state_dict()
    local = {k: v.to(own[k].dtype) if k in own else v for k, v in d.source.model_state(run.cfg.model, *layout_of).items()}
    missing, unexpected = module.load_state_dict(local, strict=False)
    if unexpected or any(is_adapter(k) for k in missing):
        raise ConfigError(f"{d.plan.iter_dir} does not hold this model's LoRA adapters; fix the --lora-* flags")
    saved = d.metadata.get("parallel", {})
    resharded = "" if (saved.get("tp"), saved.get("pp")) == (s.tp_size, s.pp_size) else \
        f", resharded from TP={saved.get('tp')} PP={saved.get('pp')}"
    return (f"LoRA adapters loaded{resharded}, base from {describe_base(base)} (checksum unchanged)", base,
            bytes_on_disk(plan.iter_dir))


def adapter_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """What an adapter checkpoint's model file holds: the adapters' state_dict entries."""
    return {k: v for k, v in module.state_dict().items() if is_adapter(k)}
