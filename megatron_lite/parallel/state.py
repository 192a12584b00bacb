"""ParallelState: the tensor-, pipeline- and data-parallel groups of one process.

Ranks are laid out as Megatron does, tensor-parallel fastest, then data-parallel, then
pipeline-parallel:  rank = pp_rank * (DP * TP) + dp_rank * TP + tp_rank;
with --use-tp-pp-dp-mapping pipeline before data:  rank = dp_rank * (PP * TP) + pp_rank * TP + tp_rank.
The object is built once by `initialize` and passed to whatever needs a group; there are
no module-level group globals.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_lite.parallel.random import RNGStatesTracker


@dataclass
class ParallelState:
    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Optional[dist.ProcessGroup]
    pp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    mp_group: Optional[dist.ProcessGroup]          # TP x PP: one model replica
    embedding_group: Optional[dist.ProcessGroup]   # first and last stage (tied embeddings)
    pp_ranks: List[int]                            # global ranks of my pipeline, stage order
    tp_ranks: List[int]
    dp_ranks: List[int]
    device: torch.device
    sequence_parallel: bool = False
    rng: Optional[RNGStatesTracker] = None             # the model-parallel RNG tracker of this rank
    tp_pp_dp_mapping: bool = False                     # rank order TP, PP, DP instead of TP, DP, PP

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def next_rank(self) -> int:
        return self.pp_ranks[self.pp_rank + 1]

    @property
    def prev_rank(self) -> int:
        return self.pp_ranks[self.pp_rank - 1]

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def rank_of(self, tp: int, dp: int, pp: int) -> int:
        return rank_of(tp, dp, pp, self.tp_size, self.dp_size, self.pp_size, self.tp_pp_dp_mapping)


def rank_of(tp: int, dp: int, pp: int, tp_size: int, dp_size: int, pp_size: int, tp_pp_dp_mapping: bool) -> int:
    """The global rank of the process at (tp, dp, pp): TP fastest, then DP, then PP (Megatron's
    default order tp-dp-pp), or TP, then PP, then DP (--use-tp-pp-dp-mapping)."""
    if tp_pp_dp_mapping:
        return dp * pp_size * tp_size + pp * tp_size + tp
    return pp * dp_size * tp_size + dp * tp_size + tp


def _layout(world_size: int, tp: int, pp: int, tp_pp_dp_mapping: bool = False):
    dp = world_size // (tp * pp)

    def r(t, d, p):
        return rank_of(t, d, p, tp, dp, pp, tp_pp_dp_mapping)
    tp_groups = [[r(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_groups = [[r(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_groups = [[r(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
    mp_groups = [[r(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)]
    return dp, tp_groups, dp_groups, pp_groups, mp_groups


def init_distributed(backend: Optional[str] = None, timeout_minutes: int = 10) -> None:
    """Join the default process group from torchrun's env:// variables (or a single process)."""
    if dist.is_initialized():
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def initialize(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
               sequence_parallel: bool = False, use_tp_pp_dp_mapping: bool = False) -> ParallelState:
    """Build every group. All ranks must call this, in the same order (new_group is collective)."""
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    else:
        world_size, rank = 1, 0
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if world_size % (tp * pp) != 0:
        raise ValueError(f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}; "
                         f"change --tensor-model-parallel-size/--pipeline-model-parallel-size or the process count")
    dp, tp_groups, dp_groups, pp_groups, mp_groups = _layout(world_size, tp, pp, use_tp_pp_dp_mapping)

    def mine(groups):
        chosen_group, chosen_ranks = None, None
        for ranks in groups:
            g = dist.new_group(ranks) if dist.is_initialized() else None
            if rank in ranks:
                chosen_group, chosen_ranks = g, ranks
        return chosen_group, chosen_ranks

    tp_group, tp_ranks = mine(tp_groups)
    dp_group, dp_ranks = mine(dp_groups)
    pp_group, pp_ranks = mine(pp_groups)
    mp_group, _ = mine(mp_groups)
    embedding_groups = [sorted({r[0], r[-1]}) for r in pp_groups]
    embedding_group, _ = mine(embedding_groups)

    if dist.is_initialized() and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    elif torch.cuda.is_available() and not dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return ParallelState(
        world_size=world_size, rank=rank, tp_size=tp, pp_size=pp, dp_size=dp,
        tp_rank=tp_ranks.index(rank), pp_rank=pp_ranks.index(rank), dp_rank=dp_ranks.index(rank),
        tp_group=tp_group, pp_group=pp_group, dp_group=dp_group, mp_group=mp_group,
        embedding_group=embedding_group, pp_ranks=pp_ranks, tp_ranks=tp_ranks, dp_ranks=dp_ranks,
        device=device, sequence_parallel=sequence_parallel and tp > 1, rng=RNGStatesTracker(device),
        tp_pp_dp_mapping=use_tp_pp_dp_mapping)
