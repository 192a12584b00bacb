"""Checkpoint formats: what a reader gives the CheckpointManager, and how a format is found.

megatron_lite's own format (metadata.json with the global tensor index, checksums, fallback to
an older intact iteration) is the default and lives in the manager's io/ and recovery code.
Megatron-LM's formats are plug-ins, each a module with:

    detect(iter_dir) -> bool                      does this iteration directory hold this format
    open_checkpoint(iter_dir) -> SourceCheckpoint what the manager loads from
    save(run, save_dir) -> None                   collective: write the run's state at its iteration

`SourceCheckpoint` is the reader half: the manager asks it for the same things whatever the
format, so the load modes, the recovery report and the resharding are the same for all.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Dict, List, Optional, Tuple

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.parallel.state import ParallelState

OWN_FORMAT = "megatron_lite"
MEGATRON_FORMATS = ("torch", "torch_dist")


class SourceCheckpoint:
    """One iteration of a checkpoint written in another format, read on demand.

    `metadata` has the shape of megatron_lite's metadata.json where the format can say it:
        {"format": "torch", "iteration": 100, "mode": "pretrain",
         "config": {"model": {...ModelConfig fields...}, "data": {tokenizer fields},
                    "train": {...}, "optimizer": {...}},
         "parallel": {"tp": 2, "pp": 1, "dp": 4},
         "progress": {"iteration", "consumed_train_samples", "consumed_valid_samples",
                      "floating_point_operations_so_far"},
         "has_optimizer": bool, "has_rng": bool, "distributed_optimizer": bool}
    """
    format: str = ""
    iter_dir: str = ""
    iteration: object = None
    metadata: dict = {}

    def model_state(self, model_cfg: ModelConfig, tp: int, pp: int, tp_rank: int,
                    pp_rank: int) -> Dict[str, torch.Tensor]:
        """Rank (tp_rank, pp_rank)'s stage state_dict of a TP x PP model, resharded from whatever
        layout the checkpoint was saved at."""
        raise NotImplementedError

    def scheduler_state(self) -> Tuple[Optional[dict], str]:
        """Megatron's opt_param_scheduler state_dict (the keys ours reads), or None and why not."""
        raise NotImplementedError

    def optimizer_state(self, run) -> Tuple[Optional[dict], str]:
        """A state_dict for `run.optimizer.load_state_dict`, or None and why it cannot be had."""
        raise NotImplementedError

    def rng_state(self, state: ParallelState) -> Tuple[Optional[dict], str]:
        """This rank's generators in `parallel.random.set_rng_state`'s format, or None and why not."""
        raise NotImplementedError

    def fp8_state(self, state: ParallelState) -> Tuple[Optional[dict], Optional[str]]:
        """The FP8 delayed-scaling state of this rank's layers ({"recipe", "linears": {global name:
        ...}}, model/fp8.py), or None and why not (None: the checkpoint simply has none)."""
        return None, (f"{FORMAT_NAMES.get(self.format, self.format)} checkpoints keep FP8 scaling in Transformer "
                      f"Engine's _extra_state, which megatron_lite does not read")


FORMAT_NAMES = {OWN_FORMAT: "megatron_lite", "torch": "Megatron-LM legacy (torch)",
                "torch_dist": "Megatron-Core distributed (torch_dist)"}


def format_module(name: str):
    """The reader/writer module of a Megatron-LM format."""
    if name == "torch":
        from megatron_lite.checkpoint.formats import megatron_legacy as module
    elif name == "torch_dist":
        from megatron_lite.checkpoint.formats import torch_dist as module
    else:
        raise ValueError(f"{name} is not a Megatron-LM checkpoint format (one of {', '.join(MEGATRON_FORMATS)})")
    return module


def _legacy_shards(iter_dir: str) -> List[str]:
    return sorted(os.path.join(iter_dir, d, "model_optim_rng.pt") for d in os.listdir(iter_dir)
                  if d.startswith("mp_rank_") and os.path.isfile(os.path.join(iter_dir, d, "model_optim_rng.pt")))


def pickle_names(path: str) -> bytes:
    """The pickle stream of a torch zip file (key names and class names, no tensor data), unpickled by nobody."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return z.read(name) if name else b""
    except (OSError, zipfile.BadZipFile):
        return b""


def detect_format(iter_dir: str) -> str:
    """The format of one iteration directory. A directory in none of Megatron-LM's formats counts as
    megatron_lite's, so that its own checks say what is wrong with it. Megatron-LM's legacy files are
    told from megatron_lite's (same names) by the keys in their pickle: `checkpoint_version`, and no
    `format_version`; Megatron-Core's metadata.json by its `sharded_backend`."""
    if not os.path.isdir(iter_dir):
        return OWN_FORMAT
    if os.path.isfile(os.path.join(iter_dir, "metadata.json")):
        try:
            with open(os.path.join(iter_dir, "metadata.json"), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError):
            return OWN_FORMAT   # damaged: megatron_lite's own checks say how
        return "torch_dist" if isinstance(meta, dict) and "sharded_backend" in meta else OWN_FORMAT
    shards = _legacy_shards(iter_dir)
    if shards:
        names = pickle_names(shards[0])
        if b"checkpoint_version" in names and b"format_version" not in names:
            return "torch"
    return OWN_FORMAT


def foreign_problems(name: str, iter_dir: str) -> List[str]:
    """What is missing from a Megatron-LM checkpoint (these formats carry no checksums to verify)."""
    if name == "torch":
        shards = _legacy_shards(iter_dir)
        if not shards:
            return ["no mp_rank_*/model_optim_rng.pt"]
        return [f"{os.path.relpath(p, iter_dir)} is not a readable torch file" for p in shards if not pickle_names(p)]
    if not os.path.isfile(os.path.join(iter_dir, ".metadata")):   # the common state may be inside or in common.pt
        return ["no .metadata (torch.distributed.checkpoint's index of the *.distcp files)"]
    return [] if any(n.endswith(".distcp") for n in os.listdir(iter_dir)) else ["no *.distcp files"]


def describe_contents(iter_dir: str, limit: int = 8) -> str:
    """`a, b, c and 4 more` of a directory, for messages about what was found instead of a checkpoint."""
    try:
        names = sorted(os.listdir(iter_dir))
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if not names:
        return "nothing (empty)"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
