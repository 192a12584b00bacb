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

from typing import Dict, Optional, Tuple

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
