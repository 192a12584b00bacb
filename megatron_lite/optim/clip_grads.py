"""Global gradient norm across TP/PP/DP and clipping by it.

Every gradient element of the full model must be counted exactly once, although ranks hold
overlapping pieces: a parameter split over TP ranks (`tensor_model_parallel`) is counted on
every TP rank (each holds a distinct piece), a replicated one only on TP rank 0, and the tied
embedding (`shared_embedding`, present on the first and the last stage) only on the first
stage. Data-parallel replicas hold identical gradients, so the sum runs over the
model-parallel group; with the distributed optimizer each DP rank holds a distinct shard and
the sum runs over every rank.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_lite.parallel.data import all_reduce
from megatron_lite.parallel.state import ParallelState


def counts_in_grad_norm(param: torch.nn.Parameter, state: ParallelState) -> bool:
    """Whether this rank's copy of `param` contributes to the global gradient norm."""
    if getattr(param, "shared_embedding", False) and not state.is_first_stage:
        return False
    return getattr(param, "tensor_model_parallel", False) or state.tp_rank == 0


def global_grad_norm(grads: List[torch.Tensor], group: Optional[dist.ProcessGroup],
                     device: torch.device) -> float:
    """L2 norm of `grads` summed over `group`: sqrt(sum over ranks and tensors of ||g||^2), in fp32.

    The caller passes only the gradients this rank counts (see `counts_in_grad_norm`);
    `device` is where the collective runs (the CUDA device with NCCL).
    """
    return global_grad_norm_tensor(grads, group, device).item()


def global_grad_norm_tensor(grads: List[torch.Tensor], group: Optional[dist.ProcessGroup],
                            device: torch.device) -> torch.Tensor:
    """`global_grad_norm` as a 0-dim fp32 tensor on `device`, without waiting for it."""
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    if grads:
        # one multi-tensor kernel for all the per-tensor norms on GPUs; fp32 norms of bf16 grads
        norms = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
        total_sq += (norms * norms).sum().to(device)
    all_reduce(total_sq, group)
    return total_sq.sqrt()


def clip_coefficient(max_norm: float, total_norm):
    """Megatron's rule, max_norm / (total_norm + 1e-6) capped at 1 (1: no clipping). `total_norm`
    is a float, or a 0-dim device tensor, and then so is the result (no host sync)."""
    coeff = max_norm / (total_norm + 1.0e-6)
    return torch.clamp(coeff, max=1.0) if torch.is_tensor(coeff) else min(coeff, 1.0)


def clip_grads_by_total_norm(grads: List[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale `grads` in place by `clip_coefficient` when clipping applies."""
    coeff = clip_coefficient(max_norm, total_norm)
    if coeff < 1.0:
        torch._foreach_mul_(grads, coeff)
