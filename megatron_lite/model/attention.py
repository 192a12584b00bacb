"""Self-attention: the fused QKV projection, optional per-head q/k norms, rotary embedding, the core
attention (torch SDPA backends, or explicit scores and softmax), and the output projection.

Tensors are [s, b, ...] outside the core attention and [b, heads, s, d] inside it. With an
inference context (generation, megatron_lite/inference/) each layer keeps the keys and values of the
positions seen so far, and a step computes only its new tokens' queries, keys and values.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_lite.config import ModelConfig
from megatron_lite.model.norms import Norm
from megatron_lite.ops import torch_ops
from megatron_lite.parallel.random import recompute
from megatron_lite.parallel.state import ParallelState
from megatron_lite.parallel.tensor import ColumnParallelLinear, RowParallelLinear

# --attention-backend -> the torch SDPA backends allowed to run it (None: torch chooses). Megatron's
# flash and fused (cuDNN) backends are Transformer Engine's; torch has the same kernels.
SDPA_BACKENDS = {"flash": [SDPBackend.FLASH_ATTENTION],
                 "fused": [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                 "auto": None}
EXPLICIT_BACKENDS = ("unfused", "local")

_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"WARNING: {message}", flush=True)


def sdpa_context(backend: str, device: torch.device, masked: bool = False):
    """The context that restricts torch SDPA to --attention-backend's kernels. The flash, cuDNN and
    memory-efficient kernels are CUDA kernels: CPU tensors run torch's own choice of CPU kernel. Flash
    attention takes no explicit mask (documents masked apart with --reset-attention-mask): such a
    call runs on the fused backend's kernels. Each fallback is said once."""
    allowed = SDPA_BACKENDS[backend]
    if allowed is None:
        return contextlib.nullcontext()
    if device.type != "cuda":
        _warn_once(f"--attention-backend {backend}: its kernels need a CUDA device; {device.type} tensors "
                   f"use torch's default attention kernel")
        return contextlib.nullcontext()
    if backend == "flash" and masked:
        _warn_once("--attention-backend flash: flash attention takes no explicit attention mask; masked "
                   "batches use the cuDNN / memory-efficient kernels (--attention-backend fused)")
        allowed = SDPA_BACKENDS["fused"]
    return sdpa_kernel(allowed)


def rotate_interleaved(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs: dims (2i, 2i+1) rotate by angle i; cos/sin [s, 1, 1, rot_dim] hold
    each angle twice in a row ([c0, c0, c1, c1, ...]). Dims past rot_dim pass through."""
    rot_dim = torch_ops.check_rotary_input(t, cos, sin)
    tf = t.float()
    t_rot, t_pass = tf[..., :rot_dim], tf[..., rot_dim:]
    x_even, x_odd = t_rot[..., 0::2], t_rot[..., 1::2]
    rotated = torch.stack((-x_odd, x_even), dim=-1).flatten(-2)
    out = t_rot * cos + rotated * sin
    return torch.cat((out, t_pass), dim=-1).to(t.dtype)


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over [b, heads, s, d] (causal, or `attention_mask` True = masked),
    with dropout on the probabilities.

    SDPA backends (flash, fused, auto) compute the softmax in fp32 inside the kernel. The explicit
    backends (unfused, local) are Megatron's DotProductAttention: scores in the input dtype, then its
    FusedScaleMaskSoftmax: with --apply-query-key-layer-scaling the scores are divided by the layer
    number and multiplied back inside the fp32 softmax (keeps fp16 scores in range);
    --attention-softmax-in-fp32 makes the mask and softmax of bf16/fp16 scores fp32; with
    --masked-softmax-fusion (default) bf16/fp16 scores go through the fused scale-mask-softmax op
    (fp32 inside), otherwise the softmax is plain torch. Masked scores are Megatron's -10000."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, ops, layer_number: int):
        super().__init__()
        self.cfg, self.state, self.ops = cfg, state, ops
        self.heads_per_group = cfg.num_attention_heads // cfg.query_groups
        self.explicit = cfg.attention_backend in EXPLICIT_BACKENDS
        self.coeff = layer_number if cfg.apply_query_key_layer_scaling else None
        self.softmax_scale = 1.0 / math.sqrt(cfg.head_dim) / (self.coeff or 1)

    def forward(self, q, k, v, attention_mask: Optional[torch.Tensor] = None):
        p = self.cfg.attention_dropout if self.training else 0.0
        # heads are split over TP ranks, so their dropout masks must differ: tracker fork
        fork = self.state.rng.fork() if p > 0 else contextlib.nullcontext()
        if self.explicit:
            return self._explicit(q, k, v, attention_mask, p, fork)
        gqa = self.heads_per_group > 1
        with fork, sdpa_context(self.cfg.attention_backend, q.device, attention_mask is not None):
            # grouped-query attention inside SDPA: each k/v head serves heads_per_group query heads
            # without materialising copies of k and v
            if attention_mask is None:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=p, enable_gqa=gqa)

    def _explicit(self, q, k, v, attention_mask, p, fork):
        if self.heads_per_group > 1:   # query head j uses group j // heads_per_group
            k = k.repeat_interleave(self.heads_per_group, dim=1)
            v = v.repeat_interleave(self.heads_per_group, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.softmax_scale       # [b, heads, s, s]
        probs = self.scale_mask_softmax(scores, attention_mask)
        if p > 0:
            with fork:
                probs = F.dropout(probs, p=p, training=True)
        return torch.matmul(probs, v)

    def scale_mask_softmax(self, scores, attention_mask):
        """Megatron's FusedScaleMaskSoftmax on scores that are already scaled by softmax_scale."""
        low_precision = scores.dtype in (torch.float16, torch.bfloat16)
        scale = float(self.coeff or 1)
        if self.cfg.masked_softmax_fusion and low_precision:
            if attention_mask is None:
                return self.ops.scaled_upper_triang_softmax(scores, scale)
            return self.ops.scaled_masked_softmax(scores, attention_mask, scale)
        x = scores.float() if low_precision and self.cfg.attention_softmax_in_fp32 else scores
        if self.coeff is not None:
            x = x * scale
        if attention_mask is None:
            sq, sk = x.shape[-2:]
            attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu_(1)
        probs = torch.softmax(x.masked_fill(attention_mask, torch_ops.MASKED_SCORE), dim=-1)
        return probs.to(scores.dtype)


class SelfAttention(nn.Module):
    """Fused QKV projection laid out per query group ([q heads of g, k_g, v_g] for each g), optional
    q/k norms (--qk-layernorm, before the rotary embedding, as in Megatron-Core), rotary embedding,
    core attention and the row-parallel output projection."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, ops, dtype, layer_number: int = 1):
        super().__init__()
        self.cfg, self.state, self.ops = cfg, state, ops
        self.layer_number = layer_number
        d, groups = cfg.head_dim, cfg.query_groups
        self.heads_per_group = cfg.num_attention_heads // groups
        self.local_groups = groups // state.tp_size
        self.recompute_core = cfg.recompute_granularity == "selective" and "core_attn" in cfg.recompute_modules
        qkv_size = groups * (self.heads_per_group + 2) * d
        self.linear_qkv = ColumnParallelLinear(cfg.hidden_size, qkv_size, state,
                                               bias=cfg.add_bias_linear or cfg.add_qkv_bias, dtype=dtype)
        if cfg.qk_layernorm:
            # replicated over TP while each rank sees only its heads: the gradient is summed over TP
            # (the `sequence_parallel` mark is what finalize_model_grads all-reduces)
            self.q_layernorm = Norm(cfg, state, ops, dtype, size=d)
            self.k_layernorm = Norm(cfg, state, ops, dtype, size=d)
            for p in (*self.q_layernorm.parameters(), *self.k_layernorm.parameters()):
                p.sequence_parallel = state.tp_size > 1
        self.core_attention = CoreAttention(cfg, state, ops, layer_number)
        self.linear_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, state,
                                             bias=cfg.add_bias_linear, skip_bias_add=True, dtype=dtype)

    def _rotate(self, t, cos, sin):
        """One rotary embedding: interleaved pairs in torch, else the fused op (--apply-rope-fusion)
        or plain torch (--no-rope-fusion); the same numbers either way."""
        if self.cfg.rotary_interleaved:
            return rotate_interleaved(t, cos, sin)
        return self.ops.rotary(t, cos, sin) if self.cfg.apply_rope_fusion else torch_ops.rotary(t, cos, sin)

    def _split(self, qkv, rotary):
        """q [s, rows, hpg, d], k and v [s, rows, 1, d] of qkv viewed as [s, rows, hpg + 2, d]."""
        hpg = self.heads_per_group
        plain_rope = self.cfg.rotary_interleaved or self.cfg.qk_layernorm
        if rotary is not None and not plain_rope:
            # contiguous q, k, v (so q as [s, b, heads, d] is a view); attention keeps v for its
            # backward, and as a view it would keep the whole QKV output alive
            if self.cfg.apply_rope_fusion:
                return self.ops.split_qkv_rotary(qkv, hpg, *rotary)
            return torch_ops.split_qkv_rotary(qkv, hpg, *rotary)
        # one split (its backward is one concatenation; slicing would zero-fill a full-size
        # gradient per slice and add them up)
        q, k, v = torch.split(qkv, [hpg, 1, 1], dim=2)
        if self.cfg.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rotary is not None:
            q, k = self._rotate(q, *rotary), self._rotate(k, *rotary)
        return q, k, v

    def forward(self, x, rotary=None, attention_mask: Optional[torch.Tensor] = None, inference_context=None):
        qkv = self.linear_qkv(x)                                   # [s, b, groups_local * (hpg + 2) * d]
        s, b = qkv.shape[:2]
        d, hpg, ng = self.cfg.head_dim, self.heads_per_group, self.local_groups
        # rows of (batch, query group), each [hpg query heads, k, v]
        q, k, v = self._split(qkv.view(s, b * ng, hpg + 2, d), rotary)
        q = q.reshape(s, b, ng * hpg, d)
        k, v = k.reshape(s, b, ng, d), v.reshape(s, b, ng, d)
        if inference_context is not None:
            k, v = inference_context.update_kv(self.layer_number, k, v)   # [offset + s, b, ng, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))      # [b, heads, s, d]
        if self.recompute_core and self.training and torch.is_grad_enabled():
            ctx = recompute(lambda *qkv_: self.core_attention(*qkv_, attention_mask), self.state.rng, q, k, v)
        else:
            ctx = self.core_attention(q, k, v, attention_mask)
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, -1)            # [s, b, heads_local * d]
        return self.linear_proj(ctx)
