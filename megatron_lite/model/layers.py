"""The transformer layer: rotary embedding tables, MLP, and the layer itself (norms.py, attention.py
hold the other parts).

Activations are [s, b, h]. Layers get parallel linears and a ParallelState; the only
communication is inside those linears. Dropout on tensors that are split across TP ranks
(attention heads; everything under sequence parallelism) runs under the RNG tracker's fork.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.model.attention import SelfAttention
from megatron_lite.model.fp8 import fits_fp8_gemm, quantized_input
from megatron_lite.model.norms import Norm
from megatron_lite.model.recompute import discard_until_backward
from megatron_lite.parallel.random import recompute
from megatron_lite.parallel.state import ParallelState
from megatron_lite.parallel.tensor import ColumnParallelLinear, RowParallelLinear

__all__ = ["MLP", "Norm", "RotaryEmbedding", "SelfAttention", "TransformerLayer", "rotary_inv_freq"]


def _selective(cfg: ModelConfig, module: str) -> bool:
    """Whether --recompute-granularity selective recomputes `module` (a --recompute-modules name)."""
    return cfg.recompute_granularity == "selective" and module in cfg.recompute_modules


def rotary_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq[i] = base^(-2i / rot_dim); with Llama-3.1 scaling, low frequencies are divided
    by `factor` and the band between them is interpolated (low_freq_factor 1, high 4,
    original context 8192, as in Megatron and Hugging Face)."""
    rot_dim = int(cfg.head_dim * cfg.rotary_percent)
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    if cfg.use_rope_scaling:
        factor, low, high, old_ctx = cfg.rope_scaling_factor, 1.0, 4.0, 8192
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(is_mid, mid, scaled)
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables [s, 1, 1, rot_dim] for positions 0..s-1: the angles repeated as two halves
    ([a0..a_n, a0..a_n], rotate-half RoPE) or, with --rotary-interleaved, pairwise ([a0, a0, a1, a1, ...]).

    The values are rounded to the activations' dtype (as Megatron and Hugging Face apply them)
    but held in fp32, the rotary ops' compute type, and computed once per (length, device,
    dtype): every layer of every step reuses them without a cast."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(cfg), persistent=False)
        self.interleaved = cfg.rotary_interleaved
        self._tables = {}

    def forward(self, seq_len: int, device, dtype):
        key = (seq_len, torch.device(device), dtype)
        if key not in self._tables:
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(device))
            emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat([freqs, freqs], dim=-1)
            emb = emb[:, None, None, :]
            self._tables[key] = (emb.cos().to(dtype).float(), emb.sin().to(dtype).float())
        return self._tables[key]


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (--squared-relu)."""
    return F.relu(x).pow(2)


class MLP(nn.Module):
    """fc1 (column-parallel; [gate; up] per rank with SwiGLU) -> activation -> fc2.

    The activation, as in Megatron-Core: SwiGLU; squared ReLU; or GeLU, which with
    --bias-gelu-fusion (the default) is the fused bias-GeLU in its tanh approximation (Hugging Face's
    gelu_new) and with --no-bias-gelu-fusion (implied by --disable-bias-linear) the exact erf GeLU of
    x + bias (F.gelu). With selective recompute of "mlp" the whole MLP keeps only its input."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, ops, dtype):
        super().__init__()
        self.ops, self.state, self.swiglu = ops, state, cfg.swiglu
        self.squared_relu, self.bias_gelu_fusion = cfg.squared_relu, cfg.bias_gelu_fusion
        self.recompute_activation = _selective(cfg, "mlp_act")
        self.recompute_mlp = _selective(cfg, "mlp")
        self.fp8_consumer = None   # fc2's FP8Meta when the activation is cast for it (model/fp8.py)
        ffn = cfg.ffn_size
        self.linear_fc1 = ColumnParallelLinear(cfg.hidden_size, 2 * ffn if cfg.swiglu else ffn, state,
                                               bias=cfg.add_bias_linear, skip_bias_add=True,
                                               partition_chunks=2 if cfg.swiglu else 1, dtype=dtype)
        self.linear_fc2 = RowParallelLinear(ffn, cfg.hidden_size, state, bias=cfg.add_bias_linear,
                                            skip_bias_add=True, dtype=dtype)

    def _activation(self, h, bias):
        if self.fp8_consumer is not None and fits_fp8_gemm(h):   # cast to FP8 for fc2 (model/fp8.py)
            fused = self.ops.activation_fp8(h, bias, self._activation_kind(), self.fp8_consumer)
            return fused if fused is not None else quantized_input(self._plain_activation(h, bias), self.fp8_consumer)
        return self._plain_activation(h, bias)

    def _plain_activation(self, h, bias):
        if self.swiglu:
            return self.ops.swiglu(h if bias is None else h + bias)
        if self.squared_relu or not self.bias_gelu_fusion:
            h = h if bias is None else h + bias
            return squared_relu(h) if self.squared_relu else F.gelu(h)
        return self.ops.bias_gelu(h, bias)

    def _activation_kind(self) -> str:
        if self.swiglu:
            return "swiglu"
        if self.squared_relu:
            return "squared_relu"
        return "bias_gelu" if self.bias_gelu_fusion else "gelu"

    def _forward(self, x):
        h, bias = self.linear_fc1(x)
        act = self._activation(h, bias)
        out = self.linear_fc2(act)
        if self.recompute_activation:   # fc2 keeps `act` for its weight gradient: recomputed there
            discard_until_backward(act, out[0], lambda: self._activation(h, bias))
        return out

    def forward(self, x):
        """(fc2's output, fc2's bias or None): the bias is left to the residual add."""
        if self.recompute_mlp and self.training and torch.is_grad_enabled():
            return recompute(lambda t: self._forward(t)[0], self.state.rng, x), self.linear_fc2.bias
        return self._forward(x)


class TransformerLayer(nn.Module):
    """Pre-norm block: x + drop(attn(norm(x))) then x + drop(mlp(norm(x))); `layer_number` counts
    the model's layers from 1 (--apply-query-key-layer-scaling divides by it).

    `forward_deferred` leaves each residual add to the norm that follows it (Norm.add_forward: one
    kernel for both with the CUDA ops): it takes the input as (x, pending) with the add x + pending
    not yet done, and returns its output the same way, for the next layer's input norm or the
    final norm to finish. `forward` is the plain tensor-in, tensor-out form."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, ops, dtype, layer_number: int = 1):
        super().__init__()
        self.cfg, self.state = cfg, state
        self.recompute_norms = _selective(cfg, "layernorm")
        self.input_layernorm = Norm(cfg, state, ops, dtype)
        self.self_attention = SelfAttention(cfg, state, ops, dtype, layer_number)
        self.pre_mlp_layernorm = Norm(cfg, state, ops, dtype)
        self.mlp = MLP(cfg, state, ops, dtype)

    def _bias_dropout(self, out_and_bias):
        """drop(out + bias): what the residual add adds."""
        out, bias = out_and_bias
        if bias is not None:
            out = out + bias
        p = self.cfg.hidden_dropout if self.training else 0.0
        if p > 0:
            # under sequence parallelism each rank holds different tokens: different masks
            fork = self.state.rng.fork() if self.state.sequence_parallel else contextlib.nullcontext()
            with fork:
                out = F.dropout(out, p=p, training=True)
        return out

    def _norm_then(self, norm, x, pending, block, *args):
        """(x + pending, block(norm(x + pending), *args)), the add fused into the norm (no add
        without `pending`); with selective "layernorm" recompute the norm's output is freed after
        the block's forward and recomputed when the backward reaches the block's output."""
        if pending is None:
            normed = norm(x)
        else:
            x, normed = norm.add_forward(pending, x)
        out = block(normed, *args)
        if self.recompute_norms:
            discard_until_backward(normed, out[0], lambda: norm(x))
        return x, out

    def forward_deferred(self, x, pending=None, rotary=None, attention_mask=None, inference_context=None):
        """The layer on x + pending; returns (y, y_pending), its output being y + y_pending.
        `inference_context` (generation) holds the keys and values of the earlier positions."""
        x, attn = self._norm_then(self.input_layernorm, x, pending, self.self_attention, rotary, attention_mask,
                                  inference_context)
        x, mlp = self._norm_then(self.pre_mlp_layernorm, x, self._bias_dropout(attn), self.mlp)
        return x, self._bias_dropout(mlp)

    def forward(self, x, rotary=None, attention_mask=None, inference_context=None):
        x, pending = self.forward_deferred(x, None, rotary, attention_mask, inference_context)
        return x + pending
