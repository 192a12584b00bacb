"""The FP8-writing kernels of delayed FP8 scaling (csrc/cuda/fp8.cuh, fp8.cu): the cast with its amax
bit for bit the torch cast of model/fp8.py; the norm and activation forwards writing FP8 for the FP8
linear they feed, with the bf16 ops' gradients; and, on the CPU, that none of them is reached.

Where a kernel computes y in float32 its own way (a norm, an activation), the reference is the
float64 value rounded once to float32, then cast: the FP8 codes agree except where the two float32
values straddle a rounding midpoint, which moves a code to its neighbour on a tiny fraction of
elements.
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_lite.model.fp8 import (E4M3, E5M2, FP8_MAX, INPUT, WEIGHT, FP8Meta, FP8Recipe, FP8State, cast_to_fp8,
                                     fp8_linear, quantize_with, quantized_input)
from megatron_lite.ops import OP_NAMES, FusedOps
from megatron_lite.ops.cuda_ops import CudaOps
from tests.unit_tests.ops import reference as ref
from tests.unit_tests.ops.test_cuda_kernels import (DEVICE, ops, poisoned_allocations,  # noqa: F401 (fixtures)
                                                    randn, shape_id, with_variant)

BF16 = torch.bfloat16
FP8_DTYPES = [E4M3, E5M2]
INPUT_DTYPES = [torch.float32, torch.float16, BF16]


def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def delayed_meta(scale: float, device=DEVICE, ops=None, dtype=E4M3) -> FP8Meta:
    """One FP8 linear's meta under delayed scaling: input scale `scale`, amax slot zero."""
    state = FP8State(FP8Recipe(dtype, E5M2, delayed=True), ["decoder.layers.0.mlp.linear_fc2"], device)
    state.scale[0, INPUT] = scale
    state.scale_inv[0, INPUT] = 1 / scale
    return FP8Meta(state, 0, ops)


def amax_slot(meta: FP8Meta) -> torch.Tensor:
    return meta.fp8_state.amax_history[0, 0, INPUT]


def ordinal(q: torch.Tensor) -> torch.Tensor:
    """FP8 codes in value order: the sign-magnitude bytes as integers (+0 and -0 both 0), so that
    neighbouring values differ by one."""
    b = q.view(torch.uint8).to(torch.int32)
    return torch.where(b >= 0x80, -(b & 0x7F), b)


def assert_fp8_within_one_code(got: torch.Tensor, want: torch.Tensor, fraction: float = 1e-4):
    assert got.dtype == want.dtype and got.shape == want.shape
    off = (ordinal(got) - ordinal(want)).abs()
    assert off.max().item() <= 1, "an FP8 value more than one code away from the reference's"
    assert (off > 0).double().mean().item() <= fraction, f"{(off > 0).sum().item()} of {off.numel()} codes differ"
    # and dequantized: each differing value is the reference's neighbour, never across a sign
    assert torch.equal(got.float().sign() * want.float().sign() >= 0, torch.ones_like(off, dtype=torch.bool))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# --------------------------------------------------------------------------- cast_fp8

def every_value(dtype) -> torch.Tensor:
    """Every bf16 / fp16 value but the NaNs (infinities included); for float32, the FP8 values,
    the midpoints between neighbours (the ties) and their float32 neighbours, and random values of
    every magnitude an activation has."""
    if dtype != torch.float32:
        t = torch.arange(-32768, 32768, dtype=torch.int32, device=DEVICE).to(torch.int16).view(dtype)
        return t[~t.isnan()]
    codes = torch.arange(256, dtype=torch.int32, device=DEVICE).to(torch.uint8)
    values = torch.cat([codes.view(E4M3).float(), codes.view(E5M2).float()])
    values = values[values.isfinite()].unique()
    mids = (values[1:] + values[:-1]) / 2
    around = torch.cat([torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    exps = torch.randint(-40, 20, (100_003,), device=DEVICE).float()
    return torch.cat([values, mids, around, randn(100_003) * torch.exp2(exps)])


@gpu
@pytest.mark.parametrize("layout", ["aligned", "offset"], ids=["aligned", "offset-by-one"])
@pytest.mark.parametrize("scale", [1.0, 448 / 3.7, 2.0 ** -7], ids=["scale1", "scale121", "scale2^-7"])
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=["fp32", "fp16", "bf16"])
def test_cast_fp8_is_bitwise_the_torch_cast_and_its_amax_is_max_abs(ops, dtype, fp8, scale, layout):
    t = every_value(dtype)
    if layout == "offset":  # a start off the 16-byte grid: the element-wise path
        t = t[1:]
    s, amax = torch.tensor(scale, device=DEVICE), torch.zeros((), device=DEVICE)
    got = ops.cast_fp8(t, s, amax, fp8)
    assert same_bytes(got, cast_to_fp8(t, s, fp8))
    assert torch.equal(amax, t.float().abs().max())


@gpu
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3", "e5m2"])
def test_cast_fp8_saturates_past_the_format_max(ops, fp8):
    m = FP8_MAX[fp8]
    past = torch.tensor([m, m * 1.01, m * 1.0625, m * 1.2, 1e30, float("inf")], device=DEVICE)
    t = torch.cat([past, -past])
    got = ops.cast_fp8(t, torch.ones((), device=DEVICE), None, fp8)
    assert torch.equal(got.float(), torch.cat([torch.full_like(past, m), torch.full_like(past, -m)]))
    assert same_bytes(got, cast_to_fp8(t, torch.ones((), device=DEVICE), fp8))


@gpu
def test_cast_fp8_amax_accumulates_with_the_slots_prior_value(ops):
    t = randn(4096, 1000, dtype=BF16)  # many blocks, each with its own max
    s = torch.ones((), device=DEVICE)
    larger = torch.tensor(1e3, device=DEVICE)
    ops.cast_fp8(t, s, larger, E4M3)
    assert larger.item() == 1e3
    smaller = torch.tensor(0.5, device=DEVICE)
    ops.cast_fp8(t, s, smaller, E4M3)
    assert torch.equal(smaller, t.float().abs().max())


@gpu
def test_cast_fp8_of_a_large_tensor_through_the_grid_stride_loop(ops):
    t = randn((1 << 24) + 5, dtype=BF16, scale=50.0)  # past one resident wave; an odd tail
    s, amax = torch.tensor(448 / 200.0, device=DEVICE), torch.zeros((), device=DEVICE)
    assert same_bytes(ops.cast_fp8(t, s, amax, E4M3), cast_to_fp8(t, s, E4M3))
    assert torch.equal(amax, t.float().abs().max())


@gpu
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=["fp32", "fp16", "bf16"])
def test_a_nan_is_cast_to_nan_and_makes_the_amax_non_finite(ops, dtype):
    t = randn(100_000, dtype=dtype)
    t[12345], t[67890] = float("nan"), -float("nan")
    s, amax = torch.ones((), device=DEVICE), torch.tensor(1e3, device=DEVICE)  # a larger prior must not hide it
    got = ops.cast_fp8(t, s, amax, E4M3)
    assert torch.equal(got.float().isnan(), t.isnan())
    finite = ~t.isnan()
    assert same_bytes(got[finite], cast_to_fp8(t[finite], s, E4M3))
    assert not amax.isfinite().item()


@gpu
def test_cast_fp8_declines_what_it_does_not_take(ops):
    s, amax = torch.ones((), device=DEVICE), torch.zeros((), device=DEVICE)
    assert ops.cast_fp8(torch.ones(8, dtype=torch.float64, device=DEVICE), s, amax, E4M3) is None
    assert ops.cast_fp8(torch.ones(8, device=DEVICE), s.double(), amax, E4M3) is None
    assert ops.cast_fp8(torch.ones(8, device=DEVICE), s, amax, torch.bfloat16) is None
    assert amax.item() == 0


@gpu
def test_fp8_meta_quantize_runs_the_cast_kernel(ops):
    """model/fp8.py's quantize_with takes CudaOps.cast_fp8: the same bytes, the amax recorded."""
    meta = delayed_meta(1.0, ops=ops)
    meta.fp8_state.scale[0, WEIGHT] = 448 / 2.5
    w = randn(512, 256, dtype=BF16)
    q, scale_inv = meta.quantize(w, WEIGHT)
    assert same_bytes(q, cast_to_fp8(w, meta.fp8_state.scale[0, WEIGHT], E4M3))
    assert torch.equal(meta.fp8_state.amax_history[0, 0, WEIGHT], w.float().abs().max())
    assert torch.equal(scale_inv, meta.fp8_state.scale_inv[0, WEIGHT])


# --------------------------------------------------------------------------- norm_fp8

NORM_SHAPES = [(3, 40), (7, 1000), (4096, 4096), (4096, 999), (64, 8192)]


def norm_inputs(rows, hidden, rms, residual):
    x = randn(rows, hidden, dtype=BF16, scale=2.0) + 0.5
    r = randn(rows, hidden, dtype=BF16, seed=1) if residual else None
    w = (1 + randn(hidden, seed=2, scale=0.1)).to(BF16)
    b = None if rms else randn(hidden, dtype=BF16, seed=3)
    return x, r, w, b


def fp32_norm(t, w, b, rms):
    """The norm of t in float64, rounded once to float32."""
    t, w = t.double(), w.double()
    y = ref.rms_norm(t, w, 1e-5) if rms else ref.layer_norm(t, w, None if b is None else b.double(), 1e-5)
    return y.float()


def assert_carrier(carrier, like, shape, meta):
    """A zero-strided stand-in of `shape` and like's dtype holding (y_fp8, 1 / scale)."""
    assert carrier.shape == shape and carrier.dtype == like.dtype and set(carrier.stride()) == {0}
    y, scale_inv = carrier.fp8_payload
    assert y.shape == shape and torch.equal(scale_inv, meta.input_scale_inv())
    return y


@gpu
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add-norm"])
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=shape_id)
def test_norm_fp8_writes_the_cast_of_the_fp32_norm_and_records_its_amax(ops, shape, rms, residual):
    x, r, w, b = norm_inputs(*shape, rms, residual)
    meta = delayed_meta(448 / 3.5)  # the largest outputs saturate
    out = ops.norm_fp8(x, r, w, b, 1e-5, rms, meta)
    total, carrier = out if residual else (None, out)
    y = assert_carrier(carrier, x, x.shape, meta)
    want = fp32_norm(x if r is None else r + x, w, b, rms)  # the sum rounded to bf16, as add_norm's
    assert_fp8_within_one_code(y, cast_to_fp8(want, meta.fp8_state.scale[0, INPUT], E4M3))
    torch.testing.assert_close(amax_slot(meta), want.abs().max(), rtol=1e-6, atol=0)
    if residual:
        assert torch.equal(total, ops.add_norm(x, r, w, b, 1e-5, rms)[0])


@gpu
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add-norm"])
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
def test_norm_fp8_gradients_are_bitwise_the_bf16_norms(ops, rms, residual):
    """The backward is the bf16 norm's kernel on the same saved input, mean and rstd: for the same
    upstream gradients, every input gradient bit for bit."""
    x, r, w, b = norm_inputs(4096, 2048, rms, residual)
    g_sum, g_y = randn(4096, 2048, dtype=BF16, seed=4), randn(4096, 2048, dtype=BF16, seed=5)
    grads = []
    for fused in (True, False):
        xl, rl, wl, bl = (None if t is None else t.detach().requires_grad_() for t in (x, r, w, b))
        leaves = [t for t in (xl, rl, wl, bl) if t is not None]
        if fused:
            out = ops.norm_fp8(xl, rl, wl, bl, 1e-5, rms, delayed_meta(448 / 3.5))
        elif residual:
            out = ops.add_norm(xl, rl, wl, bl, 1e-5, rms)
        else:
            out = ops.rms_norm(xl, wl, 1e-5) if rms else ops.layer_norm(xl, wl, bl, 1e-5)
        outs = list(out) if residual else [out]
        torch.autograd.backward(outs, [g_sum, g_y][-len(outs):])
        grads.append([t.grad for t in leaves])
    names = ["dx"] + (["dresidual"] if residual else []) + ["dweight"] + ([] if rms else ["dbias"])
    for name, got, want in zip(names, *grads):
        assert torch.equal(got, want), name


@gpu
def test_norm_fp8_in_evaluation_leaves_the_amax_history_alone(ops):
    x, _, w, _ = norm_inputs(64, 1024, True, False)
    meta = delayed_meta(448 / 3.5)
    with torch.no_grad():
        y = ops.norm_fp8(x, None, w, None, 1e-5, True, meta).fp8_payload[0]
    assert amax_slot(meta).item() == 0
    assert_fp8_within_one_code(y, cast_to_fp8(fp32_norm(x, w, None, True), meta.fp8_state.scale[0, INPUT], E4M3))


@gpu
def test_norm_fp8_carrier_feeds_an_fp8_linear_as_the_torch_cast_does(ops):
    """Through fp8_linear, the fused norm's carrier and quantized_input of the bf16 norm give nearly
    the same output (they differ by the bf16 rounding before the cast) and the same x gradient
    bit for bit (the linear's input gradient does not depend on its input)."""
    state = SimpleNamespace(tp_size=1, tp_group=None)
    x, _, nw, _ = norm_inputs(64, 256, True, False)
    w, g = randn(128, 256, dtype=BF16, seed=6, scale=0.05), randn(64, 128, dtype=BF16, seed=7)
    runs = []
    for fused in (True, False):
        meta = delayed_meta(448 / 3.5, ops=ops)
        meta.fp8_state.scale[0, WEIGHT] = 448 / 0.25
        meta.fp8_state.scale_inv[0, WEIGHT] = 0.25 / 448
        xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
        carrier = (ops.norm_fp8(xl, None, nw, None, 1e-5, True, meta) if fused
                   else quantized_input(ops.rms_norm(xl, nw, 1e-5), meta))
        out = fp8_linear(carrier, wl, None, meta, state, None)
        out.backward(g)
        runs.append((out, xl.grad))
    (out_fused, dx_fused), (out_torch, dx_torch) = runs
    assert (out_fused - out_torch).float().norm() / out_torch.float().norm() < 3e-2
    assert torch.equal(dx_fused, dx_torch)


# --------------------------------------------------------------------------- activation_fp8

ACT_SHAPES = [(7, 1000), (4096, 4096), (4096, 999)]
ACTIVATIONS = [("swiglu", False), ("swiglu", True), ("bias_gelu", True), ("bias_gelu", False)]
ACT_IDS = ["swiglu", "swiglu-bias", "bias-gelu", "gelu-nobias"]
VARIANT_OF = {"swiglu": "swiglu_fwd", "bias_gelu": "bias_gelu_fwd"}


def activation_inputs(rows, f, kind, with_bias):
    cols = 2 * f if kind == "swiglu" else f
    h = randn(rows, cols, dtype=BF16, scale=2.0)
    return h, randn(cols, dtype=BF16, seed=1) if with_bias else None


def fp32_activation(h, bias, kind):
    """The activation in float64, rounded once to float32; SwiGLU of h + bias added in bf16 (as MLP
    and activation_fp8 add it), bias-GeLU's bias added in the kernel's float32 (exact for bf16)."""
    if kind == "swiglu":
        return ref.swiglu((h if bias is None else h + bias).double()).float()
    return ref.bias_gelu(h.double(), None if bias is None else bias.double()).float()


@gpu
@pytest.mark.parametrize("variant", [0, 1, 2], ids=["fwd-v0", "fwd-v1", "fwd-v2"])
@pytest.mark.parametrize("kind, with_bias", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=shape_id)
def test_activation_fp8_writes_the_cast_of_the_fp32_activation_and_records_its_amax(ops, shape, kind, with_bias,
                                                                                   variant):
    h, bias = activation_inputs(*shape, kind, with_bias)
    meta = delayed_meta(448 / 4.0)
    impl = with_variant(ops, VARIANT_OF[kind], variant)
    carrier = impl.activation_fp8(h, bias, kind, meta)
    y = assert_carrier(carrier, h, torch.Size(shape), meta)
    want = fp32_activation(h, bias, kind)
    assert_fp8_within_one_code(y, cast_to_fp8(want, meta.fp8_state.scale[0, INPUT], E4M3))
    torch.testing.assert_close(amax_slot(meta), want.abs().max(), rtol=1e-6, atol=0)
    # every launch variant evaluates the same expression per element: the same bytes
    again = with_variant(ops, VARIANT_OF[kind], 0).activation_fp8(h, bias, kind, meta).fp8_payload[0]
    assert same_bytes(y, again)


@gpu
@pytest.mark.parametrize("kind, with_bias", ACTIVATIONS, ids=ACT_IDS)
def test_activation_fp8_gradients_are_bitwise_the_bf16_activations(ops, kind, with_bias):
    h, bias = activation_inputs(4096, 2048, kind, with_bias)
    g = randn(4096, 2048, dtype=BF16, seed=2)
    grads = []
    for fused in (True, False):
        hl, bl = (None if t is None else t.detach().requires_grad_() for t in (h, bias))
        leaves = [t for t in (hl, bl) if t is not None]
        if fused:
            out = ops.activation_fp8(hl, bl, kind, delayed_meta(448 / 4.0))
        elif kind == "swiglu":
            out = ops.swiglu(hl if bl is None else hl + bl)
        else:
            out = ops.bias_gelu(hl, bl)
        out.backward(g)
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(["dh", "dbias"], *grads):
        assert torch.equal(got, want), name


@gpu
def test_fp8_producers_decline_tensorwise_scaling_and_other_activations(ops):
    tensorwise = FP8Meta(FP8State(FP8Recipe(E4M3, E5M2, delayed=False), ["l"], DEVICE), 0)
    x, _, w, _ = norm_inputs(64, 1024, True, False)
    assert ops.norm_fp8(x, None, w, None, 1e-5, True, tensorwise) is None
    assert ops.activation_fp8(randn(64, 2048, dtype=BF16), None, "swiglu", tensorwise) is None
    assert ops.activation_fp8(randn(64, 2048, dtype=BF16), None, "squared_relu", delayed_meta(1.0)) is None


# --------------------------------------------------------------------------- CPU: the torch path

class _UntouchedMeta:
    """An FP8Meta stand-in that fails the test if anything reaches for its scales."""

    def input_scale(self):
        raise AssertionError("a CPU tensor reached the FP8 kernels")

    input_scale_inv = input_scale


def test_fp8_producers_take_the_torch_path_for_cpu_tensors():
    """FusedOps gives CPU tensors the torch forms whatever backend was chosen: the CUDA backend's
    FP8 methods are never reached (None: the caller casts in torch)."""
    fused = FusedOps(CudaOps(ext=None).as_dict(), {op: "cuda" for op in OP_NAMES}, [])
    x, w, meta = torch.randn(16, 64), torch.ones(64), _UntouchedMeta()
    assert fused.norm_fp8(x, None, w, None, 1e-5, True, meta) is None
    assert fused.norm_fp8(x, x, w, torch.zeros(64), 1e-5, False, meta) is None
    assert fused.activation_fp8(torch.randn(16, 128), None, "swiglu", meta) is None
    assert fused.activation_fp8(torch.randn(16, 64), torch.zeros(64), "bias_gelu", meta) is None
    assert fused.cast_fp8(x, torch.tensor(1.0), torch.tensor(0.0), E4M3) is None


def test_cuda_ops_fp8_methods_decline_cpu_tensors():
    cuda_ops, meta = CudaOps(ext=None), delayed_meta(2.0, device="cpu")
    x, w = torch.randn(16, 64), torch.ones(64)
    assert cuda_ops.norm_fp8(x, None, w, None, 1e-5, True, meta) is None
    assert cuda_ops.activation_fp8(torch.randn(16, 128), None, "swiglu", meta) is None
    assert cuda_ops.cast_fp8(x, torch.tensor(2.0), torch.tensor(0.0), E4M3) is None


def test_quantize_with_casts_in_torch_where_the_kernel_declines():
    t, scale, amax = torch.randn(256, 64) * 300, torch.tensor(1.0), torch.tensor(0.0)
    got = quantize_with(CudaOps(ext=None), t, scale, amax, E4M3)
    assert same_bytes(got, cast_to_fp8(t, scale, E4M3))
    assert torch.equal(amax, t.abs().max())
