"""The transformer layer's parts: norms, rotary embedding, attention, MLP.

Activations are [s, b, h]. Layers get parallel linears and a ParallelState; the only
communication is inside those linears. Dropout on tensors that are split across TP ranks
(attention heads; everything under sequence parallelism) runs under the RNG tracker's fork.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.model.recompute import discard_until_backward
from megatron_lite.parallel.state import ParallelState
from megatron_lite.parallel.tensor import ColumnParallelLinear, RowParallelLinear, set_partition


def _selective(cfg: ModelConfig, module: str) -> bool:
    """Whether --recompute-granularity selective recomputes `module` (a --recompute-modules name)."""
    return cfg.recompute_granularity == "selective" and module in cfg.recompute_modules


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the hidden dimension, through the fused-op dispatch."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, ops, dtype):
        super().__init__()
        self.ops, self.eps, self.rms = ops, cfg.norm_epsilon, cfg.normalization == "RMSNorm"
        self.weight = set_partition(nn.Parameter(torch.ones(cfg.hidden_size, dtype=dtype)), None)
        self.weight.sequence_parallel = state.sequence_parallel
        self.bias = None
        if not self.rms:
            self.bias = set_partition(nn.Parameter(torch.zeros(cfg.hidden_size, dtype=dtype)), None)
            self.bias.sequence_parallel = state.sequence_parallel

    def forward(self, x):
        if self.rms:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)

    def add_forward(self, delta, residual):
        """(residual + delta, this norm of it): a residual add and the norm after it, in one op."""
        return self.ops.add_norm(delta, residual, self.weight, self.bias, self.eps, self.rms)


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
    """cos/sin tables [s, 1, 1, rot_dim] for positions 0..s-1 (non-interleaved halves).

    The values are rounded to the activations' dtype (as Megatron and Hugging Face apply them)
    but held in fp32, the rotary ops' compute type, and computed once per (length, device,
    dtype): every layer of every step reuses them without a cast."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(cfg), persistent=False)
        self._tables = {}

    def forward(self, seq_len: int, device, dtype):
        key = (seq_len, torch.device(device), dtype)
        if key not in self._tables:
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(device))
            emb = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
            self._tables[key] = (emb.cos().to(dtype).float(), emb.sin().to(dtype).float())
        return self._tables[key]


class SelfAttention(nn.Module):
    """Fused QKV projection laid out per query group ([q heads of g, k_g, v_g] for each g),
    torch SDPA (causal, grouped-query), and the row-parallel output projection."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, ops, dtype):
        super().__init__()
        self.cfg, self.state, self.ops = cfg, state, ops
        d, groups = cfg.head_dim, cfg.query_groups
        self.heads_per_group = cfg.num_attention_heads // groups
        self.local_groups = groups // state.tp_size
        qkv_size = groups * (self.heads_per_group + 2) * d
        self.linear_qkv = ColumnParallelLinear(cfg.hidden_size, qkv_size, state,
                                               bias=cfg.add_bias_linear or cfg.add_qkv_bias, dtype=dtype)
        self.linear_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, state,
                                             bias=cfg.add_bias_linear, skip_bias_add=True, dtype=dtype)

    def forward(self, x, rotary=None, attention_mask: Optional[torch.Tensor] = None):
        qkv = self.linear_qkv(x)                                   # [s, b, groups_local * (hpg + 2) * d]
        s, b = qkv.shape[:2]
        d, hpg, ng = self.cfg.head_dim, self.heads_per_group, self.local_groups
        # rows of (batch, query group), each [hpg query heads, k, v]: q, k and v are 4-D strided
        # slices that the rotary kernels read in place
        qkv = qkv.view(s, b * ng, hpg + 2, d)
        if rotary is not None:
            # contiguous q, k, v (so q as [s, b, heads, d] is a view); attention keeps v for its
            # backward, and as a view it would keep the whole QKV output alive
            q, k, v = self.ops.split_qkv_rotary(qkv, hpg, *rotary)
        else:
            # one split (its backward is one concatenation; slicing would zero-fill a
            # full-size gradient per slice and add them up)
            q, k, v = torch.split(qkv, [hpg, 1, 1], dim=2)
        q = q.reshape(s, b, ng * hpg, d)
        k, v = k.reshape(s, b, ng, d), v.reshape(s, b, ng, d)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))      # [b, heads, s, d]
        p = self.cfg.attention_dropout if self.training else 0.0
        # heads are split over TP ranks, so their dropout masks must differ: tracker fork
        fork = self.state.rng.fork() if p > 0 else contextlib.nullcontext()
        with fork:
            # grouped-query attention inside SDPA: each k/v head serves hpg query heads
            # without materialising hpg copies of k and v
            if attention_mask is None:
                ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=hpg > 1)
            else:
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=p,
                                                     enable_gqa=hpg > 1)
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, -1)            # [s, b, heads_local * d]
        return self.linear_proj(ctx)


class MLP(nn.Module):
    """fc1 (column-parallel; [gate; up] per rank with SwiGLU) -> GeLU(tanh) or SwiGLU -> fc2."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, ops, dtype):
        super().__init__()
        self.ops, self.swiglu = ops, cfg.swiglu
        self.recompute_activation = _selective(cfg, "mlp_act")
        ffn = cfg.ffn_size
        self.linear_fc1 = ColumnParallelLinear(cfg.hidden_size, 2 * ffn if cfg.swiglu else ffn, state,
                                               bias=cfg.add_bias_linear, skip_bias_add=True,
                                               partition_chunks=2 if cfg.swiglu else 1, dtype=dtype)
        self.linear_fc2 = RowParallelLinear(ffn, cfg.hidden_size, state, bias=cfg.add_bias_linear,
                                            skip_bias_add=True, dtype=dtype)

    def _activation(self, h, bias):
        if self.swiglu:
            return self.ops.swiglu(h if bias is None else h + bias)
        return self.ops.bias_gelu(h, bias)

    def forward(self, x):
        h, bias = self.linear_fc1(x)
        if self.swiglu and bias is not None:
            h, bias = h + bias, None
        act = self._activation(h, bias)
        out = self.linear_fc2(act)
        if self.recompute_activation:   # fc2 keeps `act` for its weight gradient: recomputed there
            discard_until_backward(act, out[0], lambda: self._activation(h, bias))
        return out


class TransformerLayer(nn.Module):
    """Pre-norm block: x + drop(attn(norm(x))) then x + drop(mlp(norm(x))).

    `forward_deferred` leaves each residual add to the norm that follows it (Norm.add_forward: one
    kernel for both with the CUDA ops): it takes the input as (x, pending) with the add x + pending
    not yet done, and returns its output the same way, for the next layer's input norm or the
    final norm to finish. `forward` is the plain tensor-in, tensor-out form."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, ops, dtype):
        super().__init__()
        self.cfg, self.state = cfg, state
        self.recompute_norms = _selective(cfg, "layernorm")
        self.input_layernorm = Norm(cfg, state, ops, dtype)
        self.self_attention = SelfAttention(cfg, state, ops, dtype)
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

    def forward_deferred(self, x, pending=None, rotary=None, attention_mask=None):
        """The layer on x + pending; returns (y, y_pending), its output being y + y_pending."""
        x, attn = self._norm_then(self.input_layernorm, x, pending, self.self_attention, rotary, attention_mask)
        x, mlp = self._norm_then(self.pre_mlp_layernorm, x, self._bias_dropout(attn), self.mlp)
        return x, self._bias_dropout(mlp)

    def forward(self, x, rotary=None, attention_mask=None):
        x, pending = self.forward_deferred(x, None, rotary, attention_mask)
        return x + pending
