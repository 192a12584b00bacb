"""Backend choice: torch on CPU and with --no-fused-kernels, the fall-through order, the self-check,
the start-up line, and CPU tensors taking torch whatever was chosen."""

import pytest
import torch

from megatron_lite.ops import OP_NAMES, TORCH_OPS, FusedOps, build_ops
from megatron_lite.ops.dispatch import choose_backends

CPU = torch.device("cpu")


def test_cpu_device_uses_torch_for_every_op():
    ops = build_ops(fused_kernels=True, device=CPU)
    assert ops.backends == {op: "torch" for op in OP_NAMES}
    assert ops.describe() == "fused ops: all torch (device is cpu)"


def test_no_fused_kernels_forces_torch_even_for_a_gpu():
    ops = build_ops(fused_kernels=False, device=torch.device("cuda"))
    assert ops.backends == {op: "torch" for op in OP_NAMES}
    assert ops.describe() == "fused ops: all torch (--no-fused-kernels)"


def test_unknown_transformer_impl_is_an_error():
    with pytest.raises(ValueError, match="transformer_impl must be 'local' or 'transformer_engine'"):
        build_ops(transformer_impl="te")


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the fall-back with a CPU-only torch")
def test_gpu_build_without_any_kernels_falls_back_to_torch_and_says_why():
    ops = build_ops(device=torch.device("cuda"), transformer_impl="transformer_engine")
    assert ops.backends == {op: "torch" for op in OP_NAMES}
    line = ops.describe()
    assert line.startswith("fused ops: all torch (transformer_engine: not installed")
    assert "apex: not installed" in line
    assert "cuda: the CUDA kernels need a CUDA build of torch and a GPU" in line


def _scaled(fn, factor):
    return lambda *args: fn(*args) * factor


def _in_place_swiglu(x):
    x.data[..., 0] = 0.0
    return TORCH_OPS["swiglu"](x)


def _wrapped(name):
    return lambda *args: TORCH_OPS[name](*args)


def test_each_op_goes_to_the_first_backend_that_provides_it_and_passes_the_self_check():
    def first(device):
        return {"rms_norm": _wrapped("rms_norm"), "swiglu": _in_place_swiglu,
                "bias_gelu": _scaled(TORCH_OPS["bias_gelu"], 2)}

    def broken(device):
        raise ImportError("not installed (No module named 'fast')")

    def second(device):
        return {"rms_norm": _scaled(TORCH_OPS["rms_norm"], 2), "swiglu": _wrapped("swiglu"),
                "rotary": _wrapped("rotary")}

    ops = choose_backends([("first", first), ("fast", broken), ("second", second)], CPU)
    expected = {op: "torch" for op in OP_NAMES} | {"rms_norm": "first", "swiglu": "second", "rotary": "second"}
    assert ops.backends == expected
    line = ops.describe()
    assert line.startswith("fused ops: rms_norm=first layer_norm=torch swiglu=second bias_gelu=torch rotary=second ")
    assert "first swiglu: self-check failed (it modified its input)" in line
    assert "first bias_gelu: self-check mismatch (max error" in line
    assert "fast: not installed (No module named 'fast')" in line
    assert "second rms_norm" not in line  # already taken by an earlier backend: not tried


def test_cpu_tensors_take_torch_whatever_backend_was_chosen():
    calls = []

    def gpu_only(*args):
        calls.append(args)
        raise AssertionError("a CPU tensor reached the GPU backend")

    impls = {op: gpu_only for op in OP_NAMES}
    ops = FusedOps(impls, {op: "cuda" for op in OP_NAMES}, [])
    x = torch.randn(4, 8)
    torch.testing.assert_close(ops.rms_norm(x, torch.ones(8), 1e-5), TORCH_OPS["rms_norm"](x, torch.ones(8), 1e-5))
    torch.testing.assert_close(ops.swiglu(x), TORCH_OPS["swiglu"](x))
    assert calls == []
    assert ops.describe() == "fused ops: " + " ".join(f"{op}=cuda" for op in OP_NAMES) + " (cpu tensors use torch)"
