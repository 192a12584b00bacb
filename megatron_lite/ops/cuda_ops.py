"""megatron_lite's CUDA kernels (csrc/cuda) as differentiable ops with the torch_ops semantics.

Each op reshapes to the 2-D / 4-D layout its kernel takes and wraps forward and backward in an
autograd.Function. Inputs a kernel does not take (a dtype mix it was not built for, a row
longer than its register budget) go to the torch form of the same op.

Some kernels have several launch designs, picked by an integer `variant` (each documented at its
kernel in csrc/cuda); CudaOps uses DEFAULT_VARIANTS unless given others, so that one benchmark
run can time every design (bench/kernels.py) and the faster becomes the default here.

For an FP8 linear under delayed scaling (model/fp8.py), the norm and activation forwards write
their output in FP8 themselves (norm_fp8, activation_fp8) and hand it on as a carrier; cast_fp8
is the cast with its amax in one kernel.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron_lite.ops import torch_ops
from megatron_lite.ops.cuda_build import load_extension

# Longest row the row kernels (norms, softmax) take: 512 threads x 4 vectors of 16 bytes when
# the row is 16-byte aligned, 512 x 16 elements otherwise (csrc/cuda/common.cuh, row_shape).
ROW_THREADS = 512

# Kernel launch variant per entry point that has several, and how many it has. The defaults are
# the faster of each in bench/kernels.py (docs/PERFORMANCE.md, "Measurements behind defaults").
DEFAULT_VARIANTS = {"norm_bwd": 1, "swiglu_fwd": 1, "bias_gelu_fwd": 1, "xent_fwd": 0, "rotary": 1}
VARIANT_COUNTS = {"norm_bwd": 2, "swiglu_fwd": 3, "bias_gelu_fwd": 3, "xent_fwd": 2, "rotary": 2}


def row_fits(cols: int, *tensors: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
    """Whether a row kernel takes rows of `cols` elements of these tensors (the first sets the
    vector width), as the kernel decides it: vectorised only when every tensor, and the mask
    broadcast to the first tensor's shape, is 16-byte aligned row by row."""
    vec = 16 // tensors[0].element_size()
    aligned = cols % vec == 0 and all(t.data_ptr() % (vec * t.element_size()) == 0 for t in tensors)
    if mask is not None:
        m = mask.expand(tensors[0].shape)
        aligned = aligned and m.stride(-1) == 1 and m.data_ptr() % vec == 0 and all(
            st % vec == 0 for st in m.stride()[:-1])
    return cols <= ROW_THREADS * 16 or (aligned and cols <= ROW_THREADS * 4 * vec)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FP8Output(NamedTuple):
    """An FP8 output of a forward kernel: saturate(y * scale) in `dtype`, and max|y| folded into
    `amax` (None: not recorded); scale and amax are one-element float32 tensors on the device."""
    scale: torch.Tensor
    amax: Optional[torch.Tensor]
    dtype: torch.dtype

    def fits(self, t: torch.Tensor) -> bool:
        """Whether the kernels take this output for input t (what csrc/cuda/fp8.cuh checks, so that
        no kernel raises)."""
        def scalar_ok(s):
            return s.dtype == torch.float32 and s.numel() == 1 and s.device == t.device

        return (t.is_cuda and t.dtype in KERNEL_DTYPES and self.dtype in FP8_DTYPES and scalar_ok(self.scale)
                and (self.amax is None or scalar_ok(self.amax)))


def _fp8_kwargs(fp8: Optional[FP8Output]) -> dict:
    return {} if fp8 is None else {"out_dtype": fp8.dtype, "scale": fp8.scale, "amax": fp8.amax}


def _carrier_outputs(ctx, like: torch.Tensor, y: torch.Tensor):
    """(carrier, y) for a forward that wrote y in FP8: the carrier (zero-strided, y's shape, `like`'s
    dtype) stands in for y to autograd, its gradient is y's; y itself is not differentiable."""
    ctx.mark_non_differentiable(y)
    ctx.set_materialize_grads(False)  # no zeros of y's size for y's gradient, which never comes
    return like.new_zeros(1).expand(y.shape), y


class _Norm(torch.autograd.Function):
    """norm(x); with `fp8` (an FP8Output) the kernel writes it in FP8: (carrier, y_fp8)."""

    @staticmethod
    def forward(ctx, ext, x, weight, bias, eps, rms, bwd_variant, fp8):
        x2 = as_rows(x)
        y, mean, rstd, _ = ext.norm_fwd(x2, weight.contiguous(), None if bias is None else bias.contiguous(), eps,
                                        rms, **_fp8_kwargs(fp8))
        ctx.ext, ctx.rms, ctx.has_bias, ctx.bwd_variant = ext, rms, bias is not None, bwd_variant
        ctx.save_for_backward(x2, weight, mean, rstd)
        return y.view(x.shape) if fp8 is None else _carrier_outputs(ctx, x, y.view(x.shape))

    @staticmethod
    def backward(ctx, dy, *_):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = ctx.ext.norm_bwd(as_rows(dy), x2, weight.contiguous(), mean, rstd, ctx.rms, ctx.has_bias,
                                              variant=ctx.bwd_variant)
        return None, dx.view(dy.shape), dweight, dbias, None, None, None, None


class _AddNorm(torch.autograd.Function):
    """(x + residual, norm(x + residual)) in one pass over the rows: the residual stream of a
    pre-norm layer and the next block's input. The backward adds the sum's own gradient (from the
    later residual add) to the norm's input gradient in the same kernel; x and residual get that
    one tensor. With `fp8` the norm is written in FP8: (x + residual, carrier, y_fp8)."""

    @staticmethod
    def forward(ctx, ext, x, residual, weight, bias, eps, rms, bwd_variant, fp8):
        y, mean, rstd, total = ext.norm_fwd(as_rows(x), weight.contiguous(),
                                            None if bias is None else bias.contiguous(), eps, rms,
                                            residual=as_rows(residual), **_fp8_kwargs(fp8))
        ctx.ext, ctx.rms, ctx.has_bias, ctx.bwd_variant = ext, rms, bias is not None, bwd_variant
        ctx.save_for_backward(total, weight, mean, rstd)
        if fp8 is None:
            return total.view(x.shape), y.view(x.shape)
        return (total.view(x.shape),) + _carrier_outputs(ctx, x, y.view(x.shape))

    @staticmethod
    def backward(ctx, dtotal, dy, *_):
        total, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(total)
        dx, dweight, dbias = ctx.ext.norm_bwd(as_rows(dy), total, weight.contiguous(), mean, rstd, ctx.rms,
                                              ctx.has_bias, variant=ctx.bwd_variant,
                                              dresidual=None if dtotal is None else as_rows(dtotal))
        dx = dx.view(dy.shape)
        return None, dx, dx, dweight, dbias, None, None, None, None


class _SwiGLU(torch.autograd.Function):
    """swiglu(x); with `fp8` written in FP8: (carrier, y_fp8)."""

    @staticmethod
    def forward(ctx, ext, x, fwd_variant, fp8):
        x2 = as_rows(x)
        ctx.ext = ext
        ctx.save_for_backward(x2)
        y = ext.swiglu_fwd(x2, variant=fwd_variant, **_fp8_kwargs(fp8)).view(*x.shape[:-1], x.shape[-1] // 2)
        return y if fp8 is None else _carrier_outputs(ctx, x, y)

    @staticmethod
    def backward(ctx, dy, *_):
        (x2,) = ctx.saved_tensors
        dx = ctx.ext.swiglu_bwd(as_rows(dy), x2)
        return None, dx.view(*dy.shape[:-1], dy.shape[-1] * 2), None, None


class _BiasGeLU(torch.autograd.Function):
    """gelu_tanh(x + bias); with `fp8` written in FP8: (carrier, y_fp8)."""

    @staticmethod
    def forward(ctx, ext, x, bias, fwd_variant, fp8):
        x2 = as_rows(x)
        bias = None if bias is None else bias.contiguous()
        ctx.ext = ext
        ctx.save_for_backward(x2, bias)
        y = ext.bias_gelu_fwd(x2, bias, variant=fwd_variant, **_fp8_kwargs(fp8)).view(x.shape)
        return y if fp8 is None else _carrier_outputs(ctx, x, y)

    @staticmethod
    def backward(ctx, dy, *_):
        x2, bias = ctx.saved_tensors
        dx, dbias = ctx.ext.bias_gelu_bwd(as_rows(dy), x2, bias)
        return None, dx.view(dy.shape), dbias, None, None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, t, cos2, sin2, variant):
        ctx.ext, ctx.variant = ext, variant
        ctx.save_for_backward(cos2, sin2)
        return ext.rotary(_last_dim_contiguous(t), cos2, sin2, False, variant=variant)

    @staticmethod
    def backward(ctx, dy):
        cos2, sin2 = ctx.saved_tensors
        dt = ctx.ext.rotary(_last_dim_contiguous(dy), cos2, sin2, True, variant=ctx.variant)
        return None, dt, None, None, None


class _SplitQKVRotary(torch.autograd.Function):
    """q, k and v of a fused QKV output viewed as [s, rows, hpg + 2, d] (rows = batch x query
    groups; per row hpg query heads, a key and a value): q and k rotated and v copied, each
    straight from its strided slice into a contiguous tensor. The backward writes the three
    gradients into one buffer of the input's shape: no per-slice gradient and no concatenation."""

    @staticmethod
    def forward(ctx, ext, qkv, cos2, sin2, hpg, variant):
        ctx.ext, ctx.variant, ctx.hpg, ctx.shape, ctx.dtype = ext, variant, hpg, qkv.shape, qkv.dtype
        ctx.save_for_backward(cos2, sin2)
        q = ext.rotary(qkv[:, :, :hpg], cos2, sin2, False, variant=variant)
        k = ext.rotary(qkv[:, :, hpg:hpg + 1], cos2, sin2, False, variant=variant)
        v = ext.copy_heads(qkv[:, :, hpg + 1:], variant=variant)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos2, sin2 = ctx.saved_tensors
        ext, hpg, variant = ctx.ext, ctx.hpg, ctx.variant
        dqkv = torch.empty(ctx.shape, dtype=ctx.dtype, device=cos2.device)
        for grad, part, rotated in ((dq, slice(0, hpg), True), (dk, slice(hpg, hpg + 1), True),
                                    (dv, slice(hpg + 1, hpg + 2), False)):
            out = dqkv[:, :, part]
            if grad is None:
                out.zero_()
            elif rotated:
                ext.rotary(_last_dim_contiguous(grad), cos2, sin2, True, variant=variant, out=out)
            else:
                ext.copy_heads(_last_dim_contiguous(grad), out=out, variant=variant)
        return None, dqkv, None, None, None, None


class _MaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, scores, mask, scale):
        probs = ext.scaled_masked_softmax_fwd(scores.contiguous(), mask, scale)
        ctx.ext, ctx.scale = ext, scale
        ctx.save_for_backward(probs, mask)
        return probs

    @staticmethod
    def backward(ctx, dy):
        probs, mask = ctx.saved_tensors
        return None, ctx.ext.scaled_masked_softmax_bwd(dy.contiguous(), probs, mask, ctx.scale), None, None


class _CausalSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, scores, scale):
        probs = ext.scaled_upper_triang_softmax_fwd(scores.contiguous(), scale)
        ctx.ext, ctx.scale = ext, scale
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, dy):
        (probs,) = ctx.saved_tensors
        return None, ctx.ext.scaled_upper_triang_softmax_bwd(dy.contiguous(), probs, ctx.scale), None


def combine_shard_stats(gathered: torch.Tensor):
    """Per-token (log-sum-exp, target logit) over the whole vocabulary from every shard's
    (max m_r, sum exp(x - m_r) s_r, target logit t_r), stacked [shards, 3, tokens]:
    lse = M + log(sum_r s_r exp(m_r - M)) with M = max_r m_r; t_r is non-zero on one shard only.
    """
    shard_max, shard_sum, shard_target = gathered.unbind(1)
    global_max = shard_max.max(dim=0).values
    lse = global_max + (shard_sum * torch.exp(shard_max - global_max)).sum(dim=0).log()
    return lse, shard_target.sum(dim=0)


def merge_shard_stats(stats: torch.Tensor, group: Optional[dist.ProcessGroup]):
    """combine_shard_stats over the tensor-parallel ranks: one all-gather of [3, tokens] each."""
    world = torch_ops.tp_world(group)
    if world == 1:
        return combine_shard_stats(stats.unsqueeze(0))
    gathered = torch.empty((world, *stats.shape), dtype=stats.dtype, device=stats.device)
    dist.all_gather_into_tensor(gathered, stats.contiguous(), group=group)
    return combine_shard_stats(gathered)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, logits, target, vocab_start, group, fwd_variant, inplace_backward):
        logits2, target1 = as_rows(logits), target.reshape(-1).long().contiguous()
        stats = ext.vocab_parallel_xent_fwd(logits2, target1, vocab_start, variant=fwd_variant)
        lse, target_logit = merge_shard_stats(stats, group)
        ctx.ext, ctx.vocab_start, ctx.inplace = ext, vocab_start, inplace_backward
        ctx.save_for_backward(logits2, target1, lse)
        return (lse - target_logit).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits2, target1, lse = ctx.saved_tensors
        grad = ctx.ext.vocab_parallel_xent_bwd(logits2, target1, ctx.vocab_start, lse,
                                               grad_loss.reshape(-1).float().contiguous(), inplace=ctx.inplace)
        return None, grad.view(*grad_loss.shape, logits2.shape[-1]), None, None, None, None, None


class CudaOps:
    """The ops on the compiled kernels; each falls back to torch_ops for inputs its kernel does not take.

    `variants` overrides DEFAULT_VARIANTS for some entry points, e.g. {"norm_bwd": 1}.
    """

    def __init__(self, ext, variants: Optional[Dict[str, int]] = None):
        self.ext = ext
        self.variants = dict(DEFAULT_VARIANTS)
        for name, v in (variants or {}).items():
            if name not in VARIANT_COUNTS:
                raise ValueError(f"no kernel variants for {name!r}; the kernels with variants are "
                                 f"{sorted(VARIANT_COUNTS)}")
            if not 0 <= v < VARIANT_COUNTS[name]:
                raise ValueError(f"{name} has variants 0..{VARIANT_COUNTS[name] - 1}, got {v}")
            self.variants[name] = v

    @staticmethod
    def _norm_fits(x, weight, bias) -> bool:
        """Whether the norm kernels take these tensors (else the torch forms run)."""
        weight_ok = weight.dtype in (x.dtype, torch.float32) and (bias is None or bias.dtype == weight.dtype)
        return weight_ok and x.dtype != torch.float64 and row_fits(x.shape[-1], x, weight)

    def _norm(self, x, weight, bias, eps, rms):
        fallback = torch_ops.rms_norm if rms else torch_ops.layer_norm
        if not self._norm_fits(x, weight, bias):
            return fallback(x, weight, eps) if rms else fallback(x, weight, bias, eps)
        return _Norm.apply(self.ext, x, weight, bias, eps, rms, self.variants["norm_bwd"], None)

    def add_norm(self, x, residual, weight, bias, eps, rms):
        """(x + residual, norm(x + residual)), see FusedOps.add_norm; one kernel each way."""
        if not self._norm_fits(x, weight, bias) or residual.shape != x.shape or residual.dtype != x.dtype:
            return torch_ops.add_norm(x, residual, weight, bias, eps, rms, self._norm)
        return _AddNorm.apply(self.ext, x, residual, weight, bias, eps, rms, self.variants["norm_bwd"], None)

    def rms_norm(self, x, weight, eps):
        return self._norm(x, weight, None, eps, True)

    def layer_norm(self, x, weight, bias, eps):
        return self._norm(x, weight, bias, eps, False)

    def swiglu(self, x):
        torch_ops.check_swiglu_input(x)
        if x.dtype == torch.float64:
            return torch_ops.swiglu(x)
        return _SwiGLU.apply(self.ext, x, self.variants["swiglu_fwd"], None)

    def bias_gelu(self, x, bias):
        if x.dtype == torch.float64 or (bias is not None and bias.dtype != x.dtype):
            return torch_ops.bias_gelu(x, bias)
        return _BiasGeLU.apply(self.ext, x, bias, self.variants["bias_gelu_fwd"], None)

    @staticmethod
    def _fp8_input(meta, t: torch.Tensor) -> Optional[FP8Output]:
        """The FP8 output a producer of `meta`'s linear writes for input t: None under tensorwise
        scaling (its scale needs the finished tensor) or where the kernels do not take t."""
        scales = meta.input_scale()
        if scales is None:
            return None
        fp8 = FP8Output(scales[0], scales[1], meta.recipe.forward_dtype)
        return fp8 if fp8.fits(t) else None

    @staticmethod
    def _carrier(carrier: torch.Tensor, y: torch.Tensor, meta) -> torch.Tensor:
        carrier.fp8_payload = (y, meta.input_scale_inv())
        return carrier

    def norm_fp8(self, x, residual, weight, bias, eps, rms, meta):
        """The norm of x (of x + residual) written in FP8 by the norm kernel for the FP8 linear
        `meta`, as a carrier (model/fp8.py); with `residual`, (x + residual, carrier) as add_norm.
        None where the norm kernel does not take the inputs or under tensorwise scaling."""
        fp8 = self._fp8_input(meta, x)
        if fp8 is None or not self._norm_fits(x, weight, bias):
            return None
        variant = self.variants["norm_bwd"]
        if residual is None:
            carrier, y = _Norm.apply(self.ext, x, weight, bias, eps, rms, variant, fp8)
            return self._carrier(carrier, y, meta)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            return None
        total, carrier, y = _AddNorm.apply(self.ext, x, residual, weight, bias, eps, rms, variant, fp8)
        return total, self._carrier(carrier, y, meta)

    def activation_fp8(self, h, bias, kind, meta):
        """The MLP activation `kind` ("swiglu": of h + bias, the add in torch as MLP does it;
        "bias_gelu") written in FP8 by its kernel for the FP8 linear `meta`, as a carrier; None for
        another kind, inputs the kernel does not take, or tensorwise scaling."""
        fp8 = self._fp8_input(meta, h) if kind in ("swiglu", "bias_gelu") else None
        if fp8 is None:
            return None
        if kind == "swiglu":
            torch_ops.check_swiglu_input(h)
            x = h if bias is None else h + bias
            if not fp8.fits(x):
                return None
            carrier, y = _SwiGLU.apply(self.ext, x, self.variants["swiglu_fwd"], fp8)
        else:
            if bias is not None and bias.dtype != h.dtype:
                return None
            carrier, y = _BiasGeLU.apply(self.ext, h, bias, self.variants["bias_gelu_fwd"], fp8)
        return self._carrier(carrier, y, meta)

    def cast_fp8(self, t, scale, amax, dtype):
        """saturate(t * scale) in `dtype` (rounded to nearest even, as model/fp8.py's cast_to_fp8),
        and amax = max(amax, max|t|) when an amax slot is given, in one kernel; None for inputs the
        kernel does not take (the torch form then runs)."""
        if not FP8Output(scale, amax, dtype).fits(t):
            return None
        return self.ext.cast_fp8(t.contiguous(), scale, amax, dtype)

    def rotary(self, t, cos, sin):
        rot_dim = torch_ops.check_rotary_input(t, cos, sin)
        if t.dtype == torch.float64:
            return torch_ops.rotary(t, cos, sin)
        s = t.shape[0]
        cos2 = cos.reshape(s, rot_dim).float().contiguous()
        sin2 = sin.reshape(s, rot_dim).float().contiguous()
        return _Rotary.apply(self.ext, t, cos2, sin2, self.variants["rotary"])

    def split_qkv_rotary(self, qkv, heads_per_group, cos, sin):
        """q, k, v of `qkv` [s, rows, heads_per_group + 2, d], q and k rotated (see
        FusedOps.split_qkv_rotary), in one autograd node over the kernels."""
        if qkv.dim() != 4 or qkv.shape[2] != heads_per_group + 2:
            raise ValueError(f"split_qkv_rotary expects qkv as [s, rows, heads_per_group + 2 = "
                             f"{heads_per_group + 2}, d], got shape {tuple(qkv.shape)}")
        rot_dim = torch_ops.check_rotary_input(qkv, cos, sin)
        if qkv.dtype == torch.float64 or qkv.stride(-1) != 1 or qkv.shape[-1] % 2:
            return torch_ops.split_qkv_rotary(qkv, heads_per_group, cos, sin, self.rotary)
        s = qkv.shape[0]
        cos2 = cos.reshape(s, rot_dim).float().contiguous()
        sin2 = sin.reshape(s, rot_dim).float().contiguous()
        return _SplitQKVRotary.apply(self.ext, qkv, cos2, sin2, heads_per_group, self.variants["rotary"])

    def scaled_masked_softmax(self, scores, mask, scale):
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.bool()
        if scores.dim() != 4 or scores.dtype == torch.float64 or not row_fits(scores.shape[-1], scores, mask=mask):
            return torch_ops.scaled_masked_softmax(scores, mask, scale)
        return _MaskedSoftmax.apply(self.ext, scores, mask, float(scale))

    def scaled_upper_triang_softmax(self, scores, scale):
        torch_ops.check_causal_input(scores)
        if scores.dtype == torch.float64 or not row_fits(scores.shape[-1], scores):
            return torch_ops.scaled_upper_triang_softmax(scores, scale)
        sq = scores.shape[-1]
        probs = _CausalSoftmax.apply(self.ext, scores.reshape(1, -1, sq, sq), float(scale))
        return probs.view(scores.shape)

    def vocab_parallel_cross_entropy(self, logits, target, vocab_start, tp_group, inplace_backward=False):
        torch_ops.check_cross_entropy_input(logits, target)
        if logits.dtype == torch.float64:
            return torch_ops.vocab_parallel_cross_entropy(logits, target, vocab_start, tp_group)
        return _VocabParallelCrossEntropy.apply(self.ext, logits, target, int(vocab_start), tp_group,
                                                self.variants["xent_fwd"], inplace_backward)

    def as_dict(self) -> Dict[str, object]:
        return {op: getattr(self, op) for op in torch_ops.TORCH_OPS}


def load(device: torch.device) -> Dict[str, object]:
    """Backend entry for dispatch.build_ops."""
    return CudaOps(load_extension(device)).as_dict()
