"""The plain-torch ops against float64 references: values and every gradient, fp32/bf16/fp16."""

import math

import pytest
import torch

from megatron_lite.ops import torch_ops
from tests.unit_tests.ops import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rope_tables(s, rot_dim, seed=0):
    angles = torch.rand(s, 1, 1, rot_dim // 2, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_float64(dtype):
    x, w = randn(3, 5, 40, dtype=dtype), (1 + 0.1 * randn(40, seed=1)).to(dtype)
    errors = ref.compare(torch_ops.rms_norm, ref.rms_norm, [x, w, 1e-5], dtype)
    assert set(errors) == {"out", "grad0", "grad1"}
    ref.assert_within(errors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_float64(dtype, with_bias):
    x, w = randn(3, 5, 40, dtype=dtype), (1 + 0.1 * randn(40, seed=1)).to(dtype)
    b = randn(40, dtype=dtype, seed=2) if with_bias else None
    errors = ref.compare(torch_ops.layer_norm, ref.layer_norm, [x, w, b, 1e-5], dtype)
    assert len(errors) == (4 if with_bias else 3)
    ref.assert_within(errors, dtype)


def test_rms_norm_with_float32_weight_returns_the_input_dtype():
    x, w = randn(4, 16, dtype=torch.bfloat16), torch.ones(16)
    y = torch_ops.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.rms_norm(x.double(), w.double(), 1e-5).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_float64(dtype):
    errors = ref.compare(torch_ops.swiglu, ref.swiglu, [randn(3, 5, 48, dtype=dtype)], dtype)
    ref.assert_within(errors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_matches_float64(dtype, with_bias):
    b = randn(24, dtype=dtype, seed=1) if with_bias else None
    errors = ref.compare(torch_ops.bias_gelu, ref.bias_gelu, [randn(3, 5, 24, dtype=dtype), b], dtype)
    assert len(errors) == (3 if with_bias else 2)
    ref.assert_within(errors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot_dim", [16, 8])
def test_rotary_matches_float64(dtype, rot_dim):
    cos, sin = rope_tables(6, rot_dim)
    errors = ref.compare(torch_ops.rotary, ref.rotary, [randn(6, 2, 3, 16, dtype=dtype), cos, sin], dtype,
                         grad_mask={1, 2})
    assert set(errors) == {"out", "grad0"}
    ref.assert_within(errors, dtype)


def test_rotary_passes_the_unrotated_dims_through():
    t = randn(6, 2, 3, 16)
    cos, sin = rope_tables(6, 8)
    assert torch.equal(torch_ops.rotary(t, cos, sin)[..., 8:], t[..., 8:])


def test_split_qkv_rotary_equals_rotating_each_head_of_the_split():
    """q, k, v out of [s, batch x groups, hpg + 2, d]: each query and key head rotated as the
    rotary op rotates a [s, b, heads, d] tensor, bitwise; v copied; contiguous outputs."""
    s, b, g, hpg, d = 6, 2, 3, 2, 8
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(s, b, g * (hpg + 2) * d, generator=gen, dtype=torch.bfloat16)
    angles = torch.rand(s, 1, 1, d, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    q, k, v = torch_ops.split_qkv_rotary(qkv.view(s, b * g, hpg + 2, d), hpg, cos, sin)
    assert all(t.is_contiguous() for t in (q, k, v))
    heads = qkv.view(s, b, g, hpg + 2, d)
    want_q = torch_ops.rotary(heads[:, :, :, :hpg].reshape(s, b, g * hpg, d), cos, sin)
    want_k = torch_ops.rotary(heads[:, :, :, hpg].contiguous(), cos, sin)
    assert torch.equal(q.view(s, b, g * hpg, d), want_q)
    assert torch.equal(k.view(s, b, g, d), want_k)
    assert torch.equal(v.view(s, b, g, d), heads[:, :, :, hpg + 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_masked_softmax_matches_float64(dtype):
    mask = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.6
    mask[1, 0, 5, :] = True  # one fully masked row
    errors = ref.compare(torch_ops.scaled_masked_softmax, ref.scaled_masked_softmax,
                         [randn(2, 3, 8, 8, dtype=dtype), mask, 0.37], dtype)
    ref.assert_within(errors, dtype)


def test_fully_masked_row_is_uniform_with_zero_gradient():
    scores = randn(1, 1, 2, 5).requires_grad_()
    mask = torch.tensor([[False, True, False, True, False], [True] * 5]).view(1, 1, 2, 5)
    p = torch_ops.scaled_masked_softmax(scores, mask, 0.5)
    torch.testing.assert_close(p[0, 0, 1], torch.full((5,), 0.2))
    assert torch.equal(p[0, 0, 0, [1, 3]], torch.zeros(2))
    (p * randn(1, 1, 2, 5, seed=4)).sum().backward()
    assert torch.equal(scores.grad[0, 0, 1], torch.zeros(5))
    assert torch.equal(scores.grad[0, 0, 0, [1, 3]], torch.zeros(2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_upper_triang_softmax_matches_float64(dtype):
    errors = ref.compare(torch_ops.scaled_upper_triang_softmax, ref.scaled_upper_triang_softmax,
                         [randn(2, 3, 9, 9, dtype=dtype), 0.37], dtype)
    ref.assert_within(errors, dtype)


def test_causal_softmax_gives_the_future_exactly_zero():
    p = torch_ops.scaled_upper_triang_softmax(randn(2, 2, 7, 7), 1.0)
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)
    assert torch.equal(p[..., future], torch.zeros_like(p[..., future]))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 7))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_single_shard_matches_float64(dtype):
    target = torch.randint(0, 40, (6, 2), generator=torch.Generator().manual_seed(5))
    errors = ref.compare(lambda x: torch_ops.vocab_parallel_cross_entropy(x, target, 0, None),
                         lambda x: ref.cross_entropy(x, target), [4 * randn(6, 2, 40, dtype=dtype)], dtype,
                         out_dtype=torch.float32)
    ref.assert_within(errors, dtype)


@pytest.mark.parametrize("call, message", [
    (lambda: torch_ops.swiglu(torch.zeros(2, 5)), "even last dim"),
    (lambda: torch_ops.rotary(torch.zeros(4, 1, 2, 8), torch.zeros(4, 1, 1, 6)[..., :5], torch.zeros(4, 1, 1, 5)),
     "must be even"),
    (lambda: torch_ops.rotary(torch.zeros(4, 1, 2, 8), torch.zeros(4, 1, 1, 10), torch.zeros(4, 1, 1, 10)),
     "<= head_dim=8"),
    (lambda: torch_ops.rotary(torch.zeros(4, 1, 2, 8), torch.zeros(4, 8), torch.zeros(4, 8)), "[seq=4, 1, 1, rot_dim]"),
    (lambda: torch_ops.scaled_upper_triang_softmax(torch.zeros(1, 1, 3, 4), 1.0), "sq == sk"),
    (lambda: torch_ops.vocab_parallel_cross_entropy(torch.zeros(3, 2, 5), torch.zeros(3, 1, dtype=torch.long), 0, None),
     "matching leading dims"),
    (lambda: torch_ops.vocab_parallel_cross_entropy(torch.zeros(3, 2, 5), torch.zeros(3, 2), 0, None),
     "integer token ids"),
])
def test_bad_input_is_rejected_with_the_fix(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
