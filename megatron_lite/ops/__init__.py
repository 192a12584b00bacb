"""Fused ops around the matrix products (norms, activations, rotary, softmax, cross entropy).

    ops = build_ops_for(cfg.model, device)     # or build_ops(fused_kernels=..., transformer_impl=..., ...)
    log(ops.describe())
    y = ops.rms_norm(x, weight, eps)

Each op is chosen once per run from Transformer Engine, apex, megatron_lite's CUDA kernels
(csrc/cuda) or plain torch; see dispatch.py for the order and torch_ops.py for the reference
semantics that every backend reproduces.
"""

from megatron_lite.ops.dispatch import OP_NAMES, FusedOps, build_ops, build_ops_for, self_check
from megatron_lite.ops.torch_ops import TORCH_OPS

__all__ = ["FusedOps", "build_ops", "build_ops_for", "self_check", "OP_NAMES", "TORCH_OPS"]
