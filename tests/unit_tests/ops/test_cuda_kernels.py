"""megatron_lite's CUDA kernels against float64 references: forward and every gradient, over odd and
realistic shapes (rows 1 to 65536, hidden 1000 to 8192), fp32/bf16/fp16, and every launch variant
of the kernels that have several (cuda_ops.VARIANT_COUNTS).

Every allocation is NaN-filled while these tests run (torch's deterministic mode fills
uninitialised memory, the kernels' outputs and workspaces included), so an element a kernel
fails to write shows up as a NaN error.
"""

import math

import pytest
import torch

from tests.unit_tests.ops import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [1000, 2048, 4096, 5120, 8192]
# rows x hidden: every hidden size at 1, 7 and 4096 rows; 65536 rows at two sizes; two odd sizes
# that take the unvectorised path.
ROW_SHAPES = ([(r, h) for r in (1, 7, 4096) for h in HIDDEN] + [(65536, 1000), (65536, 4096)]
              + [(7, 1001), (4096, 999)])
DEVICE = torch.device("cuda") if torch.cuda.is_available() else None


def shape_id(shape):
    return "x".join(map(str, shape))


@pytest.fixture(scope="module")
def ops():
    from megatron_lite.ops.cuda_build import load_extension
    from megatron_lite.ops.cuda_ops import CudaOps
    return CudaOps(load_extension(DEVICE))


@pytest.fixture(scope="module")
def extension_errors_raise():
    """Skip a test of the kernels' error messages where the torch build cannot raise them.

    On some torch builds any C++ exception that leaves an extension function kills the process
    (seen with torch 2.11+cu130: even a minimal torch.utils.cpp_extension module whose
    TORCH_CHECK fails segfaults), so whether one raises is tried in a subprocess first."""
    import subprocess
    import sys

    probe = ("import torch; from megatron_lite.ops.cuda_build import load_extension\n"
             "ext = load_extension(torch.device('cuda'))\n"
             "try:\n    ext.swiglu_fwd(torch.zeros(2, 3, device='cuda'))\n"
             "except RuntimeError:\n    raise SystemExit(0)\nraise SystemExit(3)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    if done.returncode < 0:
        pytest.skip(f"this torch build kills the process (signal {-done.returncode}) when an extension raises "
                    f"a C++ exception, so the kernels' error messages cannot be checked here")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(autouse=True)
def poisoned_allocations():
    """NaN-fill every new CUDA tensor (torch.empty in Python and at::empty in the kernels)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def with_variant(ops, entry, variant):
    """ops whose `entry` kernel runs launch variant `variant`."""
    from megatron_lite.ops.cuda_ops import CudaOps
    return CudaOps(ops.ext, {entry: variant})


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, device=DEVICE)).to(dtype)


def test_allocations_are_poisoned():
    assert torch.empty(1000, device=DEVICE).isnan().all()
    assert torch.empty(1000, device=DEVICE, dtype=torch.bfloat16).isnan().all()


NORM_BWD_VARIANTS = pytest.mark.parametrize("variant", [0, 1], ids=["bwd-v0", "bwd-v1"])
ACT_FWD_VARIANTS = pytest.mark.parametrize("variant", [0, 1, 2], ids=["fwd-v0", "fwd-v1", "fwd-v2"])


@NORM_BWD_VARIANTS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=shape_id)
def test_rms_norm_kernel(ops, shape, dtype, variant):
    rows, hidden = shape
    x, w = randn(rows, hidden, dtype=dtype), (1 + randn(hidden, seed=1, scale=0.1)).to(dtype)
    impl = with_variant(ops, "norm_bwd", variant).rms_norm
    ref.assert_within(ref.compare(impl, ref.rms_norm, [x, w, 1e-5], dtype), dtype)


@NORM_BWD_VARIANTS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=shape_id)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm_kernel(ops, shape, dtype, with_bias, variant):
    rows, hidden = shape
    x, w = randn(rows, hidden, dtype=dtype, scale=2.0) + 0.5, (1 + randn(hidden, seed=1, scale=0.1)).to(dtype)
    b = randn(hidden, dtype=dtype, seed=2) if with_bias else None
    impl = with_variant(ops, "norm_bwd", variant).layer_norm
    ref.assert_within(ref.compare(impl, ref.layer_norm, [x, w, b, 1e-5], dtype), dtype)


@pytest.mark.parametrize("dtype, hidden", [(torch.bfloat16, 16384), (torch.float32, 8192), (torch.float16, 8191)],
                         ids=["bf16-16384", "fp32-8192", "fp16-8191-unvectorised"])
def test_the_longest_rows_the_row_kernels_take(ops, dtype, hidden):
    from megatron_lite.ops.cuda_ops import row_fits

    x = randn(7, hidden, dtype=dtype, scale=2.0)
    assert row_fits(hidden, x)
    w, b = (1 + randn(hidden, seed=1, scale=0.1)).to(dtype), randn(hidden, dtype=dtype, seed=2)
    ref.assert_within(ref.compare(ops.layer_norm, ref.layer_norm, [x, w, b, 1e-5], dtype), dtype)
    ref.assert_within(ref.compare(ops.scaled_masked_softmax, ref.scaled_masked_softmax,
                                  [x.view(1, 1, 7, hidden), None, 0.5], dtype), dtype)


@NORM_BWD_VARIANTS
@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_norm_kernels_take_float32_weights_with_bf16_input(ops, norm, variant):
    x, w, b = randn(4096, 4096, dtype=torch.bfloat16), 1 + randn(4096, seed=1, scale=0.1), randn(4096, seed=2)
    impl, reference = getattr(with_variant(ops, "norm_bwd", variant), norm), getattr(ref, norm)
    args = [x, w, 1e-5] if norm == "rms_norm" else [x, w, b, 1e-5]
    ref.assert_within(ref.compare(impl, reference, args, torch.bfloat16), torch.bfloat16)


ADD_NORM_SHAPES = [(7, 1000), (4096, 2048), (4096, 999), (8192, 4096)]


@NORM_BWD_VARIANTS
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADD_NORM_SHAPES, ids=shape_id)
def test_add_norm_equals_the_add_then_the_norm_bitwise(ops, shape, dtype, rms, variant):
    """The residual add fused into the norm, both ways: every output and gradient bit for bit
    what the separate add (in the input dtype) and the norm give, the sum's own gradient included."""
    rows, hidden = shape
    fused_ops, cols = with_variant(ops, "norm_bwd", variant), hidden
    x, r = randn(rows, cols, dtype=dtype, scale=2.0), randn(rows, cols, dtype=dtype, seed=1)
    w = (1 + randn(cols, seed=2, scale=0.1)).to(dtype)
    b = None if rms else randn(cols, dtype=dtype, seed=3)
    g_sum, g_y = randn(rows, cols, dtype=dtype, seed=4), randn(rows, cols, dtype=dtype, seed=5)
    results = []
    for fused in (True, False):
        leaves = [t.detach().requires_grad_() for t in (x, r, w) + ((b,) if b is not None else ())]
        xl, rl, wl = leaves[:3]
        bl = leaves[3] if b is not None else None
        if fused:
            total, y = fused_ops.add_norm(xl, rl, wl, bl, 1e-5, rms)
        else:
            total = rl + xl
            y = fused_ops.rms_norm(total, wl, 1e-5) if rms else fused_ops.layer_norm(total, wl, bl, 1e-5)
        torch.autograd.backward([total, y], [g_sum, g_y])
        results.append([total, y] + [t.grad for t in leaves])
    for name, got, want in zip(["sum", "y", "dx", "dresidual", "dweight", "dbias"], *results):
        assert torch.equal(got, want), name


@ACT_FWD_VARIANTS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=shape_id)
def test_swiglu_kernel(ops, shape, dtype, variant):
    rows, ffn = shape
    x = randn(rows, 2 * ffn, dtype=dtype, scale=2.0)
    ref.assert_within(ref.compare(with_variant(ops, "swiglu_fwd", variant).swiglu, ref.swiglu, [x], dtype), dtype)
    # every variant evaluates the same expression per element: bitwise the same result
    assert torch.equal(ops.ext.swiglu_fwd(x, variant=variant), ops.ext.swiglu_fwd(x, variant=0))


@ACT_FWD_VARIANTS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=shape_id)
def test_bias_gelu_kernel(ops, shape, dtype, variant):
    rows, cols = shape
    x, b = randn(rows, cols, dtype=dtype, scale=2.0), randn(cols, dtype=dtype, seed=1)
    ref.assert_within(ref.compare(with_variant(ops, "bias_gelu_fwd", variant).bias_gelu, ref.bias_gelu, [x, b],
                                  dtype), dtype)
    assert torch.equal(ops.ext.bias_gelu_fwd(x, b, variant=variant), ops.ext.bias_gelu_fwd(x, b, variant=0))


@ACT_FWD_VARIANTS
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_kernel_without_bias(ops, dtype, variant):
    ref.assert_within(ref.compare(with_variant(ops, "bias_gelu_fwd", variant).bias_gelu, ref.bias_gelu,
                                  [randn(4096, 1000, dtype=dtype), None], dtype), dtype)


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_swiglu_and_norm_forward_write_into_out(ops, variant):
    x = randn(7, 2 * 1000, dtype=torch.bfloat16)
    out = torch.empty(7, 1000, dtype=torch.bfloat16, device=DEVICE)
    assert ops.ext.swiglu_fwd(x, out=out, variant=variant).data_ptr() == out.data_ptr()
    assert torch.equal(out, ops.ext.swiglu_fwd(x))
    h, w, b = randn(7, 1000, dtype=torch.bfloat16), randn(1000, dtype=torch.bfloat16, seed=1), None
    y = torch.empty_like(h)
    got, mean, rstd, total = ops.ext.norm_fwd(h, w, b, 1e-5, True, out=y)
    assert got.data_ptr() == y.data_ptr() and mean is None and total is None
    assert torch.equal(y, ops.ext.norm_fwd(h, w, b, 1e-5, True)[0])


def test_forward_out_of_the_wrong_shape_dtype_layout_or_overlapping_the_input_is_refused(ops, extension_errors_raise):
    x = randn(8, 2 * 64, dtype=torch.bfloat16)
    for bad, what in [(torch.empty(8, 2 * 64, dtype=torch.bfloat16, device=DEVICE), "got \\[8, 128\\] BFloat16"),
                      (torch.empty(8, 64, device=DEVICE), "got \\[8, 64\\] Float"),
                      (torch.empty(64, 8, dtype=torch.bfloat16, device=DEVICE).t(), "\\(not contiguous\\)")]:
        with pytest.raises(RuntimeError, match="swiglu_fwd out must be a contiguous \\[8, 64\\] BFloat16") as e:
            ops.ext.swiglu_fwd(x, out=bad)
        assert e.match(what)
    with pytest.raises(RuntimeError, match="single memory location"):
        ops.ext.swiglu_fwd(x, out=x.view(-1)[:8 * 64].view(8, 64))
    h, w = randn(8, 64, dtype=torch.bfloat16), randn(64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="norm_fwd out must be a contiguous"):
        ops.ext.norm_fwd(h, w, None, 1e-5, True, out=torch.empty(8, 32, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(RuntimeError, match="single memory location"):
        ops.ext.norm_fwd(h, w, None, 1e-5, True, out=h)


def test_unknown_kernel_variants_are_refused(ops, extension_errors_raise):
    from megatron_lite.ops.cuda_ops import CudaOps

    x = randn(8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="norm_bwd variant must be 0 .* or 1"):
        ops.ext.norm_bwd(x, x, x[0].contiguous(), None, torch.ones(8, device=DEVICE), True, False, variant=2)
    with pytest.raises(RuntimeError, match="activation forward variant must be 0"):
        ops.ext.swiglu_fwd(x, variant=3)
    with pytest.raises(RuntimeError, match="cross-entropy forward variant must be 0"):
        ops.ext.vocab_parallel_xent_fwd(x, torch.zeros(8, dtype=torch.long, device=DEVICE), 0, variant=-1)
    with pytest.raises(ValueError, match="norm_bwd has variants 0..1, got 2"):
        CudaOps(ops.ext, {"norm_bwd": 2})
    with pytest.raises(RuntimeError, match="rotary variant must be 0 .* or 1 .*, got 2"):
        ops.ext.rotary(x.view(8, 1, 1, 64), torch.ones(8, 64, device=DEVICE), torch.ones(8, 64, device=DEVICE), False,
                       variant=2)
    with pytest.raises(ValueError, match="no kernel variants for 'swiglu_bwd'"):
        CudaOps(ops.ext, {"swiglu_bwd": 1})


def rope_tables(s, rot_dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, device=DEVICE).float() / rot_dim))
    angles = torch.outer(torch.arange(s, device=DEVICE).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1).view(s, 1, 1, rot_dim)
    return angles.cos(), angles.sin()


# (seq, batch, heads, head_dim, rot_dim): Llama-like, partial rotation, odd head dim, one token.
ROTARY_SHAPES = [(4096, 2, 32, 128, 128), (1024, 4, 8, 128, 64), (7, 3, 5, 80, 40), (1, 1, 1, 64, 64),
                 (513, 2, 4, 72, 36)]


@pytest.mark.parametrize("variant", [0, 1], ids=["v0", "v1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=shape_id)
def test_rotary_kernel_on_a_strided_qkv_slice(ops, shape, dtype, variant):
    s, b, h, d, rot = shape
    qkv = randn(s, b, h, 3 * d, dtype=dtype)
    q = qkv[..., :d]  # a view into the fused projection's output, as the attention layer passes it
    cos, sin = rope_tables(s, rot)
    errors = ref.compare(with_variant(ops, "rotary", variant).rotary, ref.rotary, [q, cos, sin], dtype,
                         grad_mask={1, 2})
    assert set(errors) == {"out", "grad0"}
    ref.assert_within(errors, dtype)


@pytest.mark.parametrize("variant", [1], ids=["v1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=shape_id)
def test_rotary_variants_are_bitwise_equal_to_variant_0(ops, shape, dtype, variant):
    # every variant evaluates the same pinned expression per element, on strided or contiguous input
    s, b, h, d, rot = shape
    q = randn(s, b, h, 3 * d, dtype=dtype)[..., :d]
    cos, sin = (table.view(s, rot) for table in rope_tables(s, rot))
    for t in (q, q.contiguous()):
        for backward in (False, True):
            got = ops.ext.rotary(t, cos, sin, backward, variant=variant)
            assert torch.equal(got, ops.ext.rotary(t, cos, sin, backward, variant=0))
            assert torch.equal(got[..., rot:], t[..., rot:])


# (seq, batch, query groups, heads per group, head_dim, rot_dim): the reference model, MHA (hpg 1),
# partial rotation, odd sizes
QKV_SHAPES = [(2048, 4, 8, 2, 128, 128), (256, 2, 4, 1, 64, 64), (33, 3, 2, 4, 80, 40), (7, 1, 3, 2, 72, 36)]


@pytest.mark.parametrize("variant", [0, 1], ids=["v0", "v1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=shape_id)
def test_rotary_and_copy_heads_write_into_a_strided_out(ops, shape, dtype, variant):
    """The QKV split's backward writes each gradient into its slice of one buffer: the same values
    as a fresh result, bitwise, and nothing outside the slice touched."""
    s, b, g, hpg, d, rot = shape
    cos, sin = (table.view(s, rot) for table in rope_tables(s, rot))
    t = randn(s, b * g, hpg, d, dtype=dtype)
    for backward in (False, True):
        buffer = torch.full((s, b * g, hpg + 2, d), float("nan"), dtype=dtype, device=DEVICE)
        out = buffer[:, :, 1:hpg + 1]
        returned = ops.ext.rotary(t, cos, sin, backward, variant=variant, out=out)
        assert returned.data_ptr() == out.data_ptr()
        assert torch.equal(out, ops.ext.rotary(t, cos, sin, backward, variant=0))
        assert buffer[:, :, 0].isnan().all() and buffer[:, :, hpg + 1].isnan().all()
    v = randn(s, b * g, hpg + 2, d, dtype=dtype, seed=1)[:, :, hpg + 1:]   # a strided slice
    assert torch.equal(ops.ext.copy_heads(v, variant=variant), v)
    buffer = torch.full((s, b * g, hpg + 2, d), float("nan"), dtype=dtype, device=DEVICE)
    ops.ext.copy_heads(v, out=buffer[:, :, :1], variant=variant)
    assert torch.equal(buffer[:, :, :1], v) and buffer[:, :, 1:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=shape_id)
def test_split_qkv_rotary_matches_the_torch_form(ops, shape, dtype):
    """The attention layer's split: q and k rotated and v copied out of the fused QKV output, and
    one gradient buffer back; against the torch form (torch.split, rotary, v.contiguous())."""
    from megatron_lite.ops import torch_ops

    s, b, g, hpg, d, rot = shape
    cos, sin = rope_tables(s, rot)
    base = randn(s, b, g * (hpg + 2) * d, dtype=dtype)
    grads = [randn(s, b * g, n, d, dtype=dtype, seed=2 + i) for i, n in enumerate((hpg, 1, 1))]
    results = []
    for split in (ops.split_qkv_rotary, torch_ops.split_qkv_rotary):
        x = base.detach().requires_grad_()
        q, k, v = split(x.view(s, b * g, hpg + 2, d), hpg, cos, sin)
        assert all(t.is_contiguous() for t in (q, k, v))
        torch.autograd.backward([q, k, v], grads)
        results.append((q, k, v, x.grad))
    (q, k, v, dx), (q_ref, k_ref, v_ref, dx_ref) = results
    # the kernels round each output once from fp32 (fused multiply-adds), the torch form per op
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    assert torch.equal(v, v_ref)
    torch.testing.assert_close(dx, dx_ref, **tol)
    dx5, ref5 = dx.view(s, b * g, hpg + 2, d), dx_ref.view(s, b * g, hpg + 2, d)
    assert torch.equal(dx5[:, :, hpg + 1], ref5[:, :, hpg + 1])        # v's gradient is copied exactly


def test_strided_out_is_checked(ops, extension_errors_raise):
    t = randn(8, 2, 2, 64, dtype=torch.bfloat16)
    cos = torch.ones(8, 64, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"rotary out must be a BFloat16 \[8, 2, 2, 64\] tensor"):
        ops.ext.rotary(t, cos, cos, False, out=torch.empty(8, 2, 3, 64, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(RuntimeError, match="copy_heads out has overlapping elements"):
        ops.ext.copy_heads(t, out=torch.empty(64, dtype=torch.bfloat16, device=DEVICE).expand(8, 2, 2, 64))
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        ops.ext.rotary(t, cos, cos, False, out=t)


# (batch, heads, sq, sk)
SOFTMAX_SHAPES = [(2, 2, 7, h) for h in HIDDEN] + [(1, 4, 1024, 1000), (1, 2, 512, 4096), (1, 1, 1, 8192),
                                                    (2, 2, 3, 999)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=shape_id)
def test_scaled_masked_softmax_kernel(ops, shape, dtype):
    b, h, sq, sk = shape
    g = torch.Generator(device=DEVICE).manual_seed(3)
    mask = torch.rand(b, 1, sq, sk, generator=g, device=DEVICE) > 0.7
    mask[0, 0, 0, :] = True  # a fully masked row: uniform, zero gradient
    scores = randn(b, h, sq, sk, dtype=dtype, scale=3.0)
    ref.assert_within(ref.compare(ops.scaled_masked_softmax, ref.scaled_masked_softmax,
                                  [scores, mask, 1 / math.sqrt(128)], dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_masked_softmax_kernel_without_mask_and_with_a_padding_mask(ops, dtype):
    scores = randn(2, 4, 64, 2048, dtype=dtype, scale=3.0)
    padding = torch.arange(2048, device=DEVICE).view(1, 1, 1, 2048) >= torch.tensor([2048, 1500], device=DEVICE).view(
        2, 1, 1, 1)
    for mask in (None, padding):
        ref.assert_within(ref.compare(ops.scaled_masked_softmax, ref.scaled_masked_softmax,
                                      [scores, mask, 0.125], dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 7), (1, 4, 1000, 1000), (1, 2, 2048, 2048),
                                   (1, 1, 999, 999)], ids=shape_id)
def test_scaled_upper_triang_softmax_kernel(ops, shape, dtype):
    scores = randn(*shape, dtype=dtype, scale=3.0)
    ref.assert_within(ref.compare(ops.scaled_upper_triang_softmax, ref.scaled_upper_triang_softmax,
                                  [scores, 1 / math.sqrt(128)], dtype), dtype)


def test_softmax_longer_than_the_kernel_row_falls_back_to_torch(ops):
    scores = randn(1, 1, 2, 40000, scale=3.0)
    ref.assert_within(ref.compare(ops.scaled_masked_softmax, ref.scaled_masked_softmax, [scores, None, 1.0],
                                  torch.float32), torch.float32)


# (tokens, vocab shard)
XENT_SHAPES = [(1, 1000), (7, 32000), (4096, 1000), (4096, 32000), (65536, 1000), (7, 999), (4096, 16001)]


def xent_problem(tokens, vocab, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = randn(tokens, 1, vocab, dtype=dtype, scale=4.0, seed=seed)
    target = torch.randint(0, vocab, (tokens, 1), generator=g, device=DEVICE)
    target[0, 0] = vocab - 1
    return logits, target


@pytest.mark.parametrize("variant", [0, 1], ids=["fwd-v0", "fwd-v1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", XENT_SHAPES, ids=shape_id)
def test_cross_entropy_kernel_single_shard(ops, shape, dtype, variant):
    logits, target = xent_problem(*shape, dtype)
    impl = with_variant(ops, "xent_fwd", variant)
    errors = ref.compare(lambda x: impl.vocab_parallel_cross_entropy(x, target, 0, None),
                         lambda x: ref.cross_entropy(x, target), [logits], dtype, out_dtype=torch.float32)
    ref.assert_within(errors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 999), (4096, 32000)], ids=shape_id)
def test_cross_entropy_inplace_backward_writes_the_same_gradient_over_the_logits(ops, shape, dtype):
    logits, target = xent_problem(*shape, dtype)
    grad_loss = randn(shape[0], 1, seed=3)
    grads = {}
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        loss = ops.vocab_parallel_cross_entropy(x, target, 0, None, inplace_backward=inplace)
        (grad,) = torch.autograd.grad(loss, x, grad_loss)
        grads[inplace] = (grad, grad.data_ptr() == x.data_ptr())
    assert torch.equal(grads[True][0], grads[False][0])
    assert grads[True][1] and not grads[False][1]


@pytest.mark.parametrize("variant", [0, 1], ids=["fwd-v0", "fwd-v1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_kernels_over_uneven_shards_merge_to_the_full_vocabulary(ops, dtype, variant):
    from megatron_lite.ops.cuda_ops import combine_shard_stats

    logits, target = xent_problem(4096, 32000, dtype)
    logits2, target1 = logits.view(-1, 32000), target.view(-1)
    bounds = [(0, 12000), (12000, 12001), (12001, 32000)]
    stats = [ops.ext.vocab_parallel_xent_fwd(logits2[:, a:b].contiguous(), target1, a, variant=variant)
             for a, b in bounds]
    lse, target_logit = combine_shard_stats(torch.stack(stats))
    grad_loss = randn(4096, seed=5)
    grads = [ops.ext.vocab_parallel_xent_bwd(logits2[:, a:b].contiguous(), target1, a, lse, grad_loss)
             for a, b in bounds]
    full = logits2.double().requires_grad_()
    want = ref.cross_entropy(full, target1)
    (want * grad_loss.double()).sum().backward()
    ref.assert_within({"out": ref.rel_error(lse - target_logit, want.detach()),
                       "grad": ref.rel_error(torch.cat(grads, dim=-1), full.grad)}, dtype)


def test_dispatch_picks_the_kernels_for_every_op_when_no_apex_or_transformer_engine():
    import importlib.util

    from megatron_lite.ops import OP_NAMES, build_ops

    if importlib.util.find_spec("apex") is not None:
        pytest.skip("apex is installed and takes precedence for some ops")
    ops = build_ops(device=DEVICE)
    assert ops.backends == {op: "cuda" for op in OP_NAMES}, ops.describe()
    assert ops.describe() == "fused ops: " + " ".join(f"{op}=cuda" for op in OP_NAMES) + (
        " (cpu tensors use torch; apex: not installed with its CUDA extensions (No module named 'apex'))")
