"""Choose, once per run, which backend computes each fused op, and call it.

Order per op: Transformer Engine (only with --transformer-impl transformer_engine) -> apex ->
megatron_lite's CUDA kernels -> plain torch. A backend is used for an op only if it imports,
provides the op, and passes a small self-check against the torch form on the run's device
(so an incompatible version of an optional library falls through instead of failing later).
CPU tensors always take the torch path. Every backend computes the same function, so the same
model and checkpoint work whichever runs.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_lite.ops.torch_ops import TORCH_OPS, add_norm, split_qkv_rotary

OP_NAMES = tuple(TORCH_OPS)

# (backend name, module with `load(device) -> {op name: fn}`), in order of preference.
_BACKENDS = (
    ("transformer_engine", "megatron_lite.ops.te_ops"),
    ("apex", "megatron_lite.ops.apex_ops"),
    ("cuda", "megatron_lite.ops.cuda_ops"),
)
_BACKEND_RANK = {name: i for i, (name, _) in enumerate(_BACKENDS)} | {"torch": len(_BACKENDS)}


class FusedOps:
    """The ops a model calls; each one dispatches to the backend chosen for it at build time."""

    def __init__(self, impls: Dict[str, Callable], backends: Dict[str, str], notes: List[str]):
        self._impls = impls
        self.backends = backends
        self._notes = notes

    def describe(self) -> str:
        """The one start-up log line: the backend of each op and why others were not used."""
        if all(b == "torch" for b in self.backends.values()):
            head, notes = "fused ops: all torch", self._notes
        else:
            head = "fused ops: " + " ".join(f"{op}={b}" for op, b in self.backends.items())
            notes = ["cpu tensors use torch"] + self._notes
        return head + (" (" + "; ".join(notes) + ")" if notes else "")

    def _impl(self, op: str, t: torch.Tensor) -> Callable:
        return self._impls[op] if t.device.type != "cpu" else TORCH_OPS[op]

    def rms_norm(self, x, weight, eps: float):
        return self._impl("rms_norm", x)(x, weight, eps)

    def layer_norm(self, x, weight, bias, eps: float):
        return self._impl("layer_norm", x)(x, weight, bias, eps)

    def add_norm(self, x, residual, weight, bias, eps: float, rms: bool):
        """(x + residual, RMSNorm or LayerNorm of it): a pre-norm layer's residual add and the next
        norm. It follows the norm's backend; the CUDA backend does both in one kernel each way (the
        same numbers: the sum is rounded to x's dtype before it is normalised)."""
        op = "rms_norm" if rms else "layer_norm"
        norm = self._impl(op, x)
        fused = getattr(getattr(norm, "__self__", None), "add_norm", None)
        if fused is not None:
            return fused(x, residual, weight, bias, eps, rms)
        return add_norm(x, residual, weight, bias, eps, rms,
                        lambda t, w, b, e, r: norm(t, w, e) if r else norm(t, w, b, e))

    def swiglu(self, x):
        return self._impl("swiglu", x)(x)

    def bias_gelu(self, x, bias):
        return self._impl("bias_gelu", x)(x, bias)

    def rotary(self, t, cos, sin):
        return self._impl("rotary", t)(t, cos, sin)

    def split_qkv_rotary(self, qkv, heads_per_group: int, cos, sin):
        """q, k, v of a fused QKV output viewed as [s, rows, heads_per_group + 2, d], q and k
        rotated: contiguous [s, rows, hpg, d], [s, rows, 1, d], [s, rows, 1, d]. It follows the
        rotary op's backend; the CUDA backend does the split in one autograd node whose backward
        writes one gradient buffer (torch_ops.split_qkv_rotary is the same computation)."""
        rotary = self._impl("rotary", qkv)
        fused = getattr(getattr(rotary, "__self__", None), "split_qkv_rotary", None)
        if fused is not None:
            return fused(qkv, heads_per_group, cos, sin)
        return split_qkv_rotary(qkv, heads_per_group, cos, sin, rotary)

    def _fp8_kernel(self, op: str, name: str, t):
        """The CUDA backend's FP8-writing form of `op` (CudaOps.<name>), or None."""
        return getattr(getattr(self._impl(op, t), "__self__", None), name, None)

    def norm_fp8(self, x, residual, weight, bias, eps: float, rms: bool, meta):
        """The norm of x (of x + residual, returned first, with `residual`) written in FP8 for the FP8
        linear `meta` (a carrier, model/fp8.py) by the norm kernel itself; None where that kernel
        does not run (another backend, the CPU, tensorwise scaling): the caller casts the output."""
        fused = self._fp8_kernel("rms_norm" if rms else "layer_norm", "norm_fp8", x)
        return None if fused is None else fused(x, residual, weight, bias, eps, rms, meta)

    def activation_fp8(self, h, bias, kind: str, meta):
        """The MLP activation ("swiglu", "bias_gelu", ...) of h (+ bias) written in FP8 by its kernel
        for the FP8 linear `meta`; None where no such kernel runs."""
        fused = self._fp8_kernel(kind, "activation_fp8", h) if kind in ("swiglu", "bias_gelu") else None
        return None if fused is None else fused(h, bias, kind, meta)

    def cast_fp8(self, t, scale, amax, dtype):
        """saturate(t * scale) in `dtype` and amax = max(amax, max|t|) in one CUDA kernel; None off
        the CUDA backend (model/fp8.py then casts in torch)."""
        fused = self._fp8_kernel("swiglu", "cast_fp8", t)
        return None if fused is None else fused(t, scale, amax, dtype)

    def scaled_masked_softmax(self, scores, mask, scale: float):
        return self._impl("scaled_masked_softmax", scores)(scores, mask, scale)

    def scaled_upper_triang_softmax(self, scores, scale: float):
        return self._impl("scaled_upper_triang_softmax", scores)(scores, scale)

    def vocab_parallel_cross_entropy(self, logits, target, vocab_start: int, tp_group, inplace_backward=False):
        return self._impl("vocab_parallel_cross_entropy", logits)(logits, target, vocab_start, tp_group,
                                                                  inplace_backward=inplace_backward)


def _probe_inputs(op: str, device: torch.device) -> tuple:
    """Small inputs that exercise an op's forward and backward (odd sizes on purpose)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    if op in ("rms_norm", "layer_norm"):
        args = (rnd(3, 5, 40), rnd(40) + 1, rnd(40), 1e-5)
        return args if op == "layer_norm" else (args[0], args[1], 1e-5)
    if op == "swiglu":
        return (rnd(3, 5, 24),)
    if op == "bias_gelu":
        return rnd(3, 5, 24), rnd(24)
    if op == "rotary":
        angles = torch.rand(6, 1, 1, 8, generator=g).to(device) * 6
        return rnd(6, 2, 3, 12), angles.cos(), angles.sin()
    if op == "scaled_masked_softmax":
        mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.7).to(device)
        return rnd(2, 3, 8, 8), mask, 0.5
    if op == "scaled_upper_triang_softmax":
        return rnd(2, 3, 8, 8), 0.5
    target = torch.randint(0, 40, (6, 2), generator=g).to(device)
    return rnd(6, 2, 40), target, 0, None


def self_check(op: str, fn: Callable, device: torch.device) -> Optional[str]:
    """None if fn matches the torch form of op in value and gradients and leaves its inputs
    untouched; otherwise why not."""
    try:
        args = _probe_inputs(op, device)
        originals = [a.detach().clone() if torch.is_tensor(a) else a for a in args]
        outs = []
        for impl in (fn, TORCH_OPS[op]):
            leaves = [a.detach().requires_grad_() if torch.is_tensor(a) and a.requires_grad else a for a in args]
            y = impl(*leaves)
            weights = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
            grads = torch.autograd.grad((y.float() * weights).sum(),
                                        [a for a in leaves if torch.is_tensor(a) and a.requires_grad])
            outs.append((y, *grads))
            if any(torch.is_tensor(a) and not torch.equal(a, o) for a, o in zip(args, originals)):
                return "self-check failed (it modified its input)"
        for got, want in zip(*outs):
            if got.shape != want.shape or got.dtype != want.dtype:
                return (f"self-check mismatch (returned {got.dtype}{list(got.shape)}, "
                        f"expected {want.dtype}{list(want.shape)})")
            if not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-4):
                return f"self-check mismatch (max error {(got.float() - want.float()).abs().max().item():.2e})"
    except Exception as e:  # an optional library of another version: report and fall through
        return f"self-check failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def _agree_across_ranks(backends: Dict[str, str], device: torch.device) -> Dict[str, str]:
    """Ops whose backend differs between ranks go to torch on all (their collectives differ)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return backends
    if dist.get_backend() != "nccl":
        device = torch.device("cpu")
    ranks = torch.tensor([_BACKEND_RANK[backends[op]] for op in OP_NAMES], device=device)
    bounds = torch.cat([ranks, -ranks])
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    highest, lowest = bounds[:len(OP_NAMES)].tolist(), (-bounds[len(OP_NAMES):]).tolist()
    return {op: backends[op] if hi == lo else "torch" for op, hi, lo in zip(OP_NAMES, highest, lowest)}


def choose_backends(candidates: Sequence[Tuple[str, Callable[[torch.device], Dict[str, Callable]]]],
                    device: torch.device) -> FusedOps:
    """Give each op to the first candidate (name, loader) whose loader succeeds, that provides
    the op, and whose op passes self_check on `device`; torch takes the rest. Then make the ranks agree."""
    impls: Dict[str, Callable] = {}
    backends: Dict[str, str] = {}
    notes: List[str] = []
    for name, loader in candidates:
        if len(impls) == len(OP_NAMES):
            break
        try:
            provided = loader(device)
        except Exception as e:  # a missing or broken optional backend: note it and use the next
            notes.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        for op, fn in provided.items():
            if op in impls:
                continue
            why_not = self_check(op, fn, device)
            if why_not is None:
                impls[op], backends[op] = fn, name
            else:
                notes.append(f"{name} {op}: {why_not}")
    impls = {op: impls.get(op, TORCH_OPS[op]) for op in OP_NAMES}
    backends = {op: backends.get(op, "torch") for op in OP_NAMES}
    agreed = _agree_across_ranks(backends, device)
    for op in OP_NAMES:
        if agreed[op] != backends[op]:
            impls[op], backends[op] = TORCH_OPS[op], "torch"
            notes.append(f"{op}: torch because the ranks found different backends")
    return FusedOps(impls, backends, notes)


def _module_loader(module: str, **options) -> Callable[[torch.device], Dict[str, Callable]]:
    return lambda device: importlib.import_module(module).load(device, **options)


def build_ops(fused_kernels: bool = True, transformer_impl: str = "local",
              device: torch.device = torch.device("cpu"), no_persist_layer_norm: bool = False) -> FusedOps:
    """Pick a backend per op (see the module docstring) and return the ops. --no-fused-kernels
    (fused_kernels False) keeps every op in torch; --transformer-impl transformer_engine lets
    Transformer Engine's ops come first; --no-persist-layer-norm keeps apex's LayerNorm off its
    persistent kernel.

    Collective when torch.distributed is initialized and device is a GPU: every rank must call it
    (the kernels may be compiled on first use, local rank 0 first, and the ranks agree on the choice).
    """
    if transformer_impl not in ("local", "transformer_engine"):
        raise ValueError(f"transformer_impl must be 'local' or 'transformer_engine', got {transformer_impl!r}")
    device = torch.device(device)
    if not fused_kernels:
        return FusedOps(dict(TORCH_OPS), {op: "torch" for op in OP_NAMES}, ["--no-fused-kernels"])
    if device.type == "cpu":
        return FusedOps(dict(TORCH_OPS), {op: "torch" for op in OP_NAMES}, ["device is cpu"])
    options = {"apex": {"persist_layer_norm": not no_persist_layer_norm}}
    candidates = [(name, _module_loader(module, **options.get(name, {}))) for name, module in _BACKENDS
                  if name != "transformer_engine" or transformer_impl == "transformer_engine"]
    return choose_backends(candidates, device)


def build_ops_for(model_cfg, device: torch.device) -> FusedOps:
    """build_ops with the run's flags: --no-fused-kernels, --transformer-impl, --no-persist-layer-norm
    (`model_cfg` is the ModelConfig section)."""
    return build_ops(fused_kernels=model_cfg.fused_kernels, transformer_impl=model_cfg.transformer_impl,
                     device=device, no_persist_layer_norm=model_cfg.no_persist_layer_norm)
