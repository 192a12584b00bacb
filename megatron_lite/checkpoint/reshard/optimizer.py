"""Optimizer state at another TP/PP/DP layout, or across a --use-distributed-optimizer switch.

Every per-parameter optimizer tensor (Adam's moments, SGD's momentum, the fp32 main param)
has its parameter's shape, so the parameter's global tensor index reshards it as well:
1. source side, each rank file's state is brought to "full local" form: the tensor of the
   parameter's local (TP-split) shape; ZeRO-1 shards of the DP ranks of one (tp, pp) are
   concatenated along the flattened parameter first;
2. `sharding.reshard_rank_tensors` cuts this rank's pieces of the new layout out of those;
3. with the distributed optimizer, this rank keeps its flat [start, end) range of each.
Scalars (the step count), hyperparameters and the loss scaler are the same everywhere.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional

import torch

from megatron_lite.checkpoint.io import layout
from megatron_lite.checkpoint.reshard.sharding import reshard_rank_tensors
from megatron_lite.checkpoint.io.storage import load_file

TENSOR_STATES = ("exp_avg", "exp_avg_sq", "momentum_buffer", "main_param")


class _SourceOptimizerState:
    """Reads the optimizer tensors of a checkpoint by (rank file, parameter key, state name)."""

    def __init__(self, load_dir: str, iteration, metadata: dict):
        self.load_dir, self.iteration = load_dir, iteration
        self.zero1 = bool(metadata.get("distributed_optimizer"))
        self.dp = metadata["parallel"].get("dp", 1)
        self._cache: Dict[str, dict] = {}
        self.shapes = {(p["file"], p["key"]): tuple(p["shape"])
                       for entry in metadata["tensors"].values() for p in entry["pieces"]}

    def _load(self, relpath: str) -> dict:
        if relpath not in self._cache:
            if len(self._cache) > 2 * self.dp:   # keep memory to about one (tp, pp) rank's files
                self._cache.clear()
            self._cache[relpath] = load_file(self.load_dir, self.iteration, relpath)
        return self._cache[relpath]

    def any_state_dict(self) -> dict:
        """One rank's optimizer state dict: hyperparameters, loss scaler, step counts."""
        tp, pp = 0, 0
        if self.zero1:
            return self._load(layout.distrib_optim_shard_path(tp, pp, 0))
        return self._load(layout.model_shard_path(tp, pp))["optimizer"]

    def read(self, file: str, key: str, state: str) -> torch.Tensor:
        shape = self.shapes[(file, key)]
        if not self.zero1:
            return self._load(file)["optimizer"]["params"][key][state]
        shard_dir = os.path.dirname(file)
        pieces = []
        for dp_rank in range(self.dp):
            sd = self._load(os.path.join(shard_dir + f"_{dp_rank:03d}", layout.DISTRIB_OPTIM_FILENAME))
            start, end = sd["shard_ranges"].get(key, (0, 0))
            if end > start:
                pieces.append((start, sd["params"][key][state].reshape(-1)))
        flat = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])])
        if flat.numel() != math.prod(shape):
            raise ValueError(f"distributed-optimizer shards of {key} in {shard_dir} cover {flat.numel()} of "
                             f"{math.prod(shape)} elements: the checkpoint is incomplete")
        return flat.view(shape)


def reshard_optimizer_state(run, load_dir: str, iteration, metadata: dict) -> dict:
    """This rank's optimizer state dict for the run's layout, from a checkpoint saved at another."""
    source = _SourceOptimizerState(load_dir, iteration, metadata)
    saved = source.any_state_dict()
    target = run.optimizer.state_dict()            # names, shard ranges and the state keys this run has
    sample = next(iter(saved["params"].values()))
    tensor_states = [s for s in TENSOR_STATES if s in sample]
    s = run.state
    local: Dict[str, Dict[str, torch.Tensor]] = {}
    for state_name in tensor_states:
        def read_piece(file, key, _state=state_name):
            return source.read(file, key, _state)
        for key, tensor in reshard_rank_tensors(metadata["tensors"], read_piece, run.cfg.model,
                                                s.tp_size, s.pp_size, s.tp_rank, s.pp_rank):
            local.setdefault(key, {})[state_name] = tensor
    scalars = {k: v for k, v in sample.items() if k not in TENSOR_STATES}
    ranges: Optional[dict] = target.get("shard_ranges")
    params = {}
    for name, wanted in target["params"].items():
        entry = dict(scalars)
        for state_name in tensor_states:
            if state_name == "main_param" and "main_param" not in wanted:
                continue   # this run keeps no fp32 copy (fp32 model without ZeRO-1)
            t = local[name][state_name].float()
            if ranges is not None:
                start, end = ranges[name]
                t = t.reshape(-1)[start:end].clone()
            entry[state_name] = t
        if "main_param" in wanted and "main_param" not in entry:
            # the source kept no fp32 copy (an fp32 model): its weights, already loaded, are the copy
            entry["main_param"] = wanted["main_param"].detach().clone()
        params[name] = entry
    out = {"optimizer": saved["optimizer"], "param_groups": saved["param_groups"],
           "grad_scaler": saved["grad_scaler"], "params": params}
    if ranges is not None:
        out["shard_ranges"] = ranges
    return out
