"""Selective recomputation without keeping the output (`--recompute-granularity selective`).

A cheap op's output (a norm's, the MLP activation's) is usually saved twice over: the op keeps its
input for its own backward, and the next linear layer keeps the output for its weight gradient.
`discard_until_backward` frees the output's memory once its consumers have run their forward
and refills it, by running the op again, when the backward reaches the consumers' output: the
same values in the same memory the saved tensors point to, so nothing else changes. This is
Megatron-Core's output-discarding checkpoint ("layernorm", "moe_act" in its --recompute-modules).
"""

from __future__ import annotations

from typing import Callable

import torch


def discard_until_backward(output: torch.Tensor, hook_tensor: torch.Tensor,
                           recompute: Callable[[], torch.Tensor]) -> None:
    """Free `output`'s memory now; when the gradient of `hook_tensor` (computed from `output`
    by layers whose backward needs it) has been computed, write `recompute()` back into it.

    `recompute` must return the same values `output` held (a deterministic op of inputs that its
    own backward keeps anyway). Does nothing outside training (no graph) or when `output` does not
    own its whole storage (a view: freeing the storage would free other tensors' data).
    """
    if not (torch.is_grad_enabled() and hook_tensor.requires_grad):
        return
    storage = output.untyped_storage()
    nbytes = output.numel() * output.element_size()
    if output.storage_offset() != 0 or storage.nbytes() != nbytes or not output.is_contiguous():
        return
    shape, dtype, device = output.shape, output.dtype, output.device
    storage.resize_(0)

    def refill(grad: torch.Tensor) -> None:
        if storage.nbytes():   # refilled already (a second backward through a retained graph)
            return
        with torch.no_grad():
            value = recompute()
            storage.resize_(nbytes)
            torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape).copy_(value)

    hook_tensor.register_hook(refill)
