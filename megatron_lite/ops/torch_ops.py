"""Plain-torch forms of the fused ops: the reference every other backend is checked against.

Each op computes in float32 and returns the input's dtype, as the CUDA kernels do, so a
model gives the same numbers (up to rounding order) whichever backend runs. All are
differentiable through autograd; vocab-parallel cross entropy has its own backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Megatron's fill value for masked attention scores: a fully masked row becomes uniform
# instead of NaN, and every backend (apex, Transformer Engine, ours) uses the same value.
MASKED_SCORE = -10000.0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm over the last dim; bias may be None."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(),
                        None if bias is None else bias.float(), eps).to(x.dtype)


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
             rms: bool, norm_fn=None):
    """(x + residual, norm(x + residual)): the residual stream of a pre-norm layer and its
    normalised form; `norm_fn(t, weight, bias, eps, rms)` computes the norm (default: the torch
    forms above)."""
    total = residual + x
    if norm_fn is not None:
        return total, norm_fn(total, weight, bias, eps, rms)
    return total, rms_norm(total, weight, eps) if rms else layer_norm(total, weight, bias, eps)


def check_swiglu_input(x: torch.Tensor) -> None:
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim [gate | up], got {tuple(x.shape)}; "
                         f"fc1 must output 2 * ffn_hidden_size features")


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """x[..., 2f] = [gate | up] -> silu(gate) * up."""
    check_swiglu_input(x)
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """gelu (tanh form) of x + bias; bias may be None."""
    xf = x.float() if bias is None else x.float() + bias.float()
    return F.gelu(xf, approximate="tanh").to(x.dtype)


def check_rotary_input(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    """Validate shapes and return rot_dim."""
    if t.dim() != 4:
        raise ValueError(f"rotary expects t as [seq, batch, heads, head_dim], got shape {tuple(t.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"rotary cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    rot_dim = cos.shape[-1]
    if cos.dim() != 4 or cos.shape[1] != 1 or cos.shape[2] != 1 or cos.shape[0] != t.shape[0]:
        raise ValueError(f"rotary expects cos/sin as [seq={t.shape[0]}, 1, 1, rot_dim], got {tuple(cos.shape)}; "
                         f"slice the table to the sequence length and add the two broadcast dims")
    if rot_dim % 2 or rot_dim > t.shape[-1] or rot_dim == 0:
        raise ValueError(f"rotary rot_dim={rot_dim} must be even, positive and <= head_dim={t.shape[-1]}; "
                         f"check --rotary-percent and --kv-channels")
    return rot_dim


def rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot_dim dims of each head (non-interleaved, rotate_half form).

    t [s, b, heads, d]; cos/sin [s, 1, 1, rot_dim]. Dims past rot_dim pass through.
    """
    rot_dim = check_rotary_input(t, cos, sin)
    tf = t.float()
    t_rot, t_pass = tf[..., :rot_dim], tf[..., rot_dim:]
    x1, x2 = t_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = t_rot * cos.float() + rotated * sin.float()
    return torch.cat((out, t_pass), dim=-1).to(t.dtype)


def split_qkv_rotary(qkv: torch.Tensor, heads_per_group: int, cos: torch.Tensor, sin: torch.Tensor,
                     rotary_fn=rotary):
    """q, k, v of a fused QKV output viewed as [s, rows, heads_per_group + 2, d] (rows = batch x
    query groups, each row hpg query heads, then a key and a value): q [s, rows, hpg, d] and
    k [s, rows, 1, d] rotated by `rotary_fn`, v [s, rows, 1, d] copied; all three contiguous, so
    q viewed as [s, b, groups * hpg, d] needs no copy. The slices go to `rotary_fn` as strided
    views."""
    q, k, v = torch.split(qkv, [heads_per_group, 1, 1], dim=2)
    return rotary_fn(q, cos, sin), rotary_fn(k, cos, sin), v.contiguous()


def scaled_masked_softmax(scores: torch.Tensor, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """softmax(scores * scale) over the last dim with mask True positions set to MASKED_SCORE."""
    s = scores.float() * scale
    if mask is not None:
        s = s.masked_fill(mask, MASKED_SCORE)
    return torch.softmax(s, dim=-1).to(scores.dtype)


def check_causal_input(scores: torch.Tensor) -> None:
    if scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"causal softmax needs square scores [..., sq, sk] with sq == sk, got {tuple(scores.shape)}; "
                         f"use scaled_masked_softmax with an explicit mask for other shapes")


def scaled_upper_triang_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax(scores * scale): key j > query i gets probability exactly 0."""
    check_causal_input(scores)
    sq = scores.shape[-1]
    causal = torch.ones(sq, sq, dtype=torch.bool, device=scores.device).triu_(1)
    return torch.softmax((scores.float() * scale).masked_fill(causal, float("-inf")), dim=-1).to(scores.dtype)


def tp_world(group: Optional[dist.ProcessGroup]) -> int:
    """Ranks sharing the vocabulary; None means this process holds all of it."""
    return 1 if group is None else dist.get_world_size(group)


def check_cross_entropy_input(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() < 2 or logits.shape[:-1] != target.shape:
        raise ValueError(f"cross entropy expects logits [..., v_local] and target [...] with matching leading dims, "
                         f"got logits {tuple(logits.shape)} and target {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross entropy target must hold integer token ids, got {target.dtype}")


def local_target(target: torch.Tensor, vocab_start: int, v_local: int):
    """(index into this shard clamped to 0 where outside, mask of ids outside this shard)."""
    outside = (target < vocab_start) | (target >= vocab_start + v_local)
    idx = (target - vocab_start).masked_fill(outside, 0).long()
    return idx, outside


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's vocab-parallel cross entropy: three all-reduces, softmax-minus-onehot backward.

    The softmax is recomputed in backward from the saved logits and per-token log-sum-exp,
    so no float32 copy of the logits outlives the forward.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        multi = tp_world(group) > 1
        lf = logits.float()
        logits_max = lf.max(dim=-1).values
        if multi:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = lf - logits_max.unsqueeze(-1)
        idx, outside = local_target(target, vocab_start, logits.shape[-1])
        predicted = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        sum_exp = shifted.exp().sum(dim=-1)
        if multi:
            dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        log_sum_exp = sum_exp.log()
        ctx.save_for_backward(logits, idx, outside, logits_max + log_sum_exp)
        return log_sum_exp - predicted

    @staticmethod
    def backward(ctx, grad_loss):
        logits, idx, outside, lse = ctx.saved_tensors
        grad = (logits.float() - lse.unsqueeze(-1)).exp_()
        grad.scatter_add_(-1, idx.unsqueeze(-1), (~outside).float().neg().unsqueeze(-1))
        grad.mul_(grad_loss.float().unsqueeze(-1))
        return grad.to(logits.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 tp_group: Optional[dist.ProcessGroup], inplace_backward: bool = False) -> torch.Tensor:
    """Per-token loss [s, b] (float32) from this rank's vocab shard logits [s, b, v_local].

    `inplace_backward=True` allows a backend to write the logits' gradient over the logits (one
    logits-sized buffer less; the caller must not read the logits after the backward, nor run
    the backward twice). This torch form computes in fp32 and ignores it."""
    check_cross_entropy_input(logits, target)
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, tp_group)


TORCH_OPS = {
    "rms_norm": rms_norm,
    "layer_norm": layer_norm,
    "swiglu": swiglu,
    "bias_gelu": bias_gelu,
    "rotary": rotary,
    "scaled_masked_softmax": scaled_masked_softmax,
    "scaled_upper_triang_softmax": scaled_upper_triang_softmax,
    "vocab_parallel_cross_entropy": vocab_parallel_cross_entropy,
}
