"""megatron_lite's own format as a reader: what the manager loads from a checkpoint that
recovery.choose_checkpoint verified (metadata.json, checksums, fallback past damage).

Per (tp, pp) rank, `mp_rank_TT_PPP/model_optim_rng.pt` (written by DP rank 0) holds
    {"format_version", "iteration", "mode", "model": stage state_dict, "progress": counters,
     "opt_param_scheduler", "optimizer" (without the distributed optimizer),
     "rng_state": [one per DP rank], "fp8_state": FP8 delayed-scaling state (model/fp8.py)}
(`manager.shard_contents` builds it), and with the distributed optimizer
`mp_rank_TT_PPP_DDD/distrib_optim.pt` comes from every DP rank. metadata.json carries the run's
config, the layout, the mode, the progress and the global tensor index.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megatron_lite.arguments import ConfigError
from megatron_lite.checkpoint.formats import OWN_FORMAT, SourceCheckpoint
from megatron_lite.checkpoint.io import layout
from megatron_lite.checkpoint.io.storage import load_file
from megatron_lite.config import ModelConfig
from megatron_lite.parallel.state import ParallelState


class OwnCheckpoint(SourceCheckpoint):
    """A chosen megatron_lite checkpoint. The files that choosing it verified and kept in memory
    (`plan.verified_files`) travel with it and are loaded without being read again."""
    format = OWN_FORMAT

    def __init__(self, load_dir: str, plan, metadata: dict):
        self.load_dir, self.plan, self.metadata = load_dir, plan, metadata
        self.iter_dir, self.iteration = plan.iter_dir, plan.iteration
        self._shards: Dict[Tuple[int, int], dict] = {}

    def _same_layout(self, tp: int, pp: int) -> bool:
        p = self.metadata.get("parallel", {})
        return p.get("tp") == tp and p.get("pp") == pp

    def _shard(self, tp_rank: int, pp_rank: int) -> dict:
        """One model_optim_rng.pt, read from disk (or taken from the verified buffers) once."""
        if (tp_rank, pp_rank) not in self._shards:
            self._shards[tp_rank, pp_rank] = load_file(self.load_dir, self.iteration,
                                                       layout.model_shard_path(tp_rank, pp_rank),
                                                       verified=self.plan.verified_files)
        return self._shards[tp_rank, pp_rank]

    def _any_shard(self) -> dict:
        """A file already read, else rank (0, 0)'s: the counters and the schedule are in every file."""
        return next(iter(self._shards.values())) if self._shards else self._shard(0, 0)

    def release(self) -> None:
        """Drop the CPU copies once everything is restored."""
        self._shards.clear()

    def model_state(self, model_cfg: ModelConfig, tp: int, pp: int, tp_rank: int,
                    pp_rank: int) -> Dict[str, torch.Tensor]:
        if self._same_layout(tp, pp):
            return self._shard(tp_rank, pp_rank)["model"]
        from megatron_lite.checkpoint.reshard.sharding import open_piece_reader, reshard_rank_state

        return reshard_rank_state(self.metadata["tensors"], open_piece_reader(self.iter_dir), model_cfg, tp, pp,
                                  tp_rank, pp_rank)

    def scheduler_state(self) -> Tuple[Optional[dict], str]:
        return self._any_shard()["opt_param_scheduler"], "loaded"

    def optimizer_state(self, run) -> Tuple[Optional[dict], str]:
        """The saved optimizer state, resharded when the layout (or the ZeRO-1 setting) changed."""
        meta, state = self.metadata, run.state
        if not meta.get("has_optimizer", True):
            raise ConfigError(f"{self.iter_dir} was saved with --no-save-optim; pass --no-load-optim")
        zero1 = run.cfg.parallel.use_distributed_optimizer
        saved = meta["parallel"]
        unchanged = (self._same_layout(state.tp_size, state.pp_size)
                     and zero1 == meta.get("distributed_optimizer", False)
                     and (not zero1 or saved.get("dp") == state.dp_size))
        if unchanged:
            if zero1:
                path = layout.distrib_optim_shard_path(state.tp_rank, state.pp_rank, state.dp_rank)
                return load_file(self.load_dir, self.iteration, path, verified=self.plan.verified_files), "loaded"
            return self._shard(state.tp_rank, state.pp_rank)["optimizer"], "loaded"
        from megatron_lite.checkpoint.reshard.optimizer import reshard_optimizer_state

        was = "ZeRO-1" if meta.get("distributed_optimizer") else "replicated"
        return (reshard_optimizer_state(run, self.load_dir, self.iteration, meta),
                f"loaded, resharded from TP={saved['tp']} PP={saved['pp']} DP={saved.get('dp')} ({was})")

    def rng_state(self, state: ParallelState) -> Tuple[Optional[dict], str]:
        saved_rng = self._any_shard().get("rng_state")
        if saved_rng is None:
            return None, "saved with --no-save-rng"
        if len(saved_rng) == state.dp_size and self._same_layout(state.tp_size, state.pp_size):
            return self._shard(state.tp_rank, state.pp_rank)["rng_state"][state.dp_rank], "restored"
        p = self.metadata["parallel"]
        return None, (f"saved at TP={p['tp']} PP={p['pp']} DP={p.get('dp')}: per-rank generators do not carry "
                      f"over to another layout")

    def fp8_state(self, state: ParallelState) -> Tuple[Optional[dict], Optional[str]]:
        """Every stage's entries (held alike by its TP ranks): global names find this rank's layers
        whatever the layout they were saved at."""
        from megatron_lite.model.fp8 import merge_saved

        if self._same_layout(state.tp_size, state.pp_size):
            return self._shard(state.tp_rank, state.pp_rank).get("fp8_state"), None
        return merge_saved([self._shard(0, p).get("fp8_state") for p in range(self.metadata["parallel"]["pp"])]), None
