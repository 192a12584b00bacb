"""The norm layer (LayerNorm or RMSNorm) that the decoder's norms and --qk-layernorm share."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.model.fp8 import fits_fp8_gemm, quantized_input
from megatron_lite.parallel.state import ParallelState
from megatron_lite.parallel.tensor import set_partition


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dimension (`size`, default the hidden size), through the
    fused-op dispatch. With --apply-layernorm-1p the weight is stored zero-centred (initialised to
    zeros) and applied as 1 + weight, in fp32, as Megatron's LayerNorm1P."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, ops, dtype, size: Optional[int] = None):
        super().__init__()
        size = size or cfg.hidden_size
        self.ops, self.eps, self.rms = ops, cfg.norm_epsilon, cfg.normalization == "RMSNorm"
        self.zero_centred = cfg.apply_layernorm_1p
        init = torch.zeros if self.zero_centred else torch.ones
        self.weight = set_partition(nn.Parameter(init(size, dtype=dtype)), None)
        self.weight.sequence_parallel = state.sequence_parallel
        self.bias = None
        if not self.rms:
            self.bias = set_partition(nn.Parameter(torch.zeros(size, dtype=dtype)), None)
            self.bias.sequence_parallel = state.sequence_parallel
        self.fp8_consumer = None   # the FP8Meta of the FP8 linear this norm feeds (model/fp8.py)

    def effective_weight(self) -> torch.Tensor:
        return self.weight.float() + 1 if self.zero_centred else self.weight

    def forward(self, x):
        """The normed x; cast to FP8 for `fp8_consumer` (a carrier, model/fp8.py) when there is one."""
        weight = self.effective_weight()
        if self.fp8_consumer is not None and fits_fp8_gemm(x):
            fused = self.ops.norm_fp8(x, None, weight, self.bias, self.eps, self.rms, self.fp8_consumer)
            return fused if fused is not None else quantized_input(self._norm(x, weight), self.fp8_consumer)
        return self._norm(x, weight)

    def _norm(self, x, weight):
        if self.rms:
            return self.ops.rms_norm(x, weight, self.eps)
        return self.ops.layer_norm(x, weight, self.bias, self.eps)

    def add_forward(self, delta, residual):
        """(residual + delta, this norm of it): a residual add and the norm after it, in one op."""
        weight = self.effective_weight()
        if self.fp8_consumer is not None and fits_fp8_gemm(delta):
            fused = self.ops.norm_fp8(delta, residual, weight, self.bias, self.eps, self.rms, self.fp8_consumer)
            if fused is not None:
                return fused
            total, normed = self.ops.add_norm(delta, residual, weight, self.bias, self.eps, self.rms)
            return total, quantized_input(normed, self.fp8_consumer)
        return self.ops.add_norm(delta, residual, weight, self.bias, self.eps, self.rms)
