"""Float64 references of the fused ops, written from the formulas (not from torch_ops), and the
comparison every op test uses: forward value and every input gradient, normwise relative error
max|got - ref| / max|ref| within a per-dtype bound.
"""

from __future__ import annotations

import math

import torch

# Far under 1e-4 for float32; the usual half-precision bounds.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * w
    return y if b is None else y + b


def swiglu(x):
    f = x.shape[-1] // 2
    gate, up = x[..., :f], x[..., f:]
    return gate / (1 + torch.exp(-gate)) * up


def bias_gelu(x, b):
    z = x if b is None else x + b
    return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))


def rotary(t, cos, sin):
    rot = cos.shape[-1]
    half = rot // 2
    x1, x2, rest = t[..., :half], t[..., half:rot], t[..., rot:]
    y1 = x1 * cos[..., :half] - x2 * sin[..., :half]
    y2 = x2 * cos[..., half:] + x1 * sin[..., half:]
    return torch.cat([y1, y2, rest], dim=-1)


def scaled_masked_softmax(scores, mask, scale):
    s = scores * scale
    if mask is not None:
        s = torch.where(mask, torch.full_like(s, -10000.0), s)
    return torch.softmax(s, dim=-1)


def scaled_upper_triang_softmax(scores, scale):
    sq = scores.shape[-1]
    future = torch.ones(sq, sq, dtype=torch.bool, device=scores.device).triu(1)
    return torch.softmax(torch.where(future, torch.full_like(scores, -math.inf), scores * scale), dim=-1)


def cross_entropy(logits, target):
    """Per-token loss over the full vocabulary: logsumexp(x) - x[target]."""
    return torch.logsumexp(logits, -1) - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (got.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def compare(impl, ref, inputs, dtype, out_dtype=None, grad_mask=None):
    """Run impl on `inputs` (tensors in `dtype` or other args) and ref on their float64 copies.

    Returns {name: relative error} for the output and the gradient of every floating input,
    using a random output weighting that is exactly representable in `dtype`. The output must
    have `out_dtype` (default: `dtype`); `grad_mask` names inputs (by index) whose gradients are
    not compared.
    """
    leaves, leaves64 = [], []
    for a in inputs:
        if torch.is_tensor(a) and a.is_floating_point():
            leaves.append(a.detach().clone().requires_grad_())
            leaves64.append(a.detach().double().requires_grad_())
        else:
            leaves.append(a)
            leaves64.append(a)
    y = impl(*leaves)
    y64 = ref(*leaves64)
    gen = torch.Generator(device=y.device).manual_seed(1234)
    weight = torch.randn(y.shape, generator=gen, device=y.device).to(y.dtype).double()
    (y.double() * weight).sum().backward()
    (y64 * weight).sum().backward()
    errors = {"out": rel_error(y, y64)}
    assert y.dtype == (out_dtype or dtype), f"output dtype {y.dtype}, expected {out_dtype or dtype}"
    assert y.shape == y64.shape, f"output shape {tuple(y.shape)}, expected {tuple(y64.shape)}"
    for i, (a, a64) in enumerate(zip(leaves, leaves64)):
        if torch.is_tensor(a) and a.requires_grad and (grad_mask is None or i not in grad_mask):
            assert a.grad is not None, f"input {i} got no gradient"
            errors[f"grad{i}"] = rel_error(a.grad, a64.grad)
    return errors


def assert_within(errors: dict, dtype: torch.dtype) -> None:
    bound = TOLERANCE[dtype]
    bad = {k: v for k, v in errors.items() if not v <= bound}  # `not <=` also catches NaN
    assert not bad, f"relative errors over {bound} for {dtype}: {bad} (all: {errors})"
