"""FP8 training of the decoder's linear layers (--fp8-format, --fp8-recipe), on torch._scaled_mm.

Each FP8 linear (linear_qkv, linear_proj, linear_fc1, linear_fc2 of every decoder layer, less the
layers --first-last-layers-bf16 keeps) runs its three GEMMs on FP8 operands:

    forward   y  = x  @ W^T      x e4m3, W e4m3
    dgrad     dx = dy @ W        dy e5m2 (hybrid) or e4m3
    wgrad     dW = dy^T @ x

each operand quantized with one fp32 scale per tensor, q = saturate(t * scale), and each GEMM
told the inverse scales. The output layer, the norms, attention, the optimizer (fp32 main params)
and every checkpointed weight stay in high precision.

Scales, as Transformer Engine computes them:
- tensorwise: scale = fp8_max / amax(t) of the tensor being cast (torchao's tensorwise recipe);
- delayed: each linear keeps an amax history per operand ([history_len] steps of input, weight
  and gradient amaxes); a step casts with the scale computed at the end of the previous step,
  scale = fp8_max / amax / 2^margin, amax the history's max or its most recent entry, and records
  the amax of what it cast. At the end of each step (`FP8State.update`) the recorded amaxes are
  reduced (max) over the TP and DP ranks, so every rank holding a layer holds the same state,
  whatever the layout, and that state is what a full checkpoint saves.

Nothing here reads a number on the host: amaxes and scales stay on the device.

Each weight is cast once per optimizer step (with its transpose, for the dgrad) and reused by
every microbatch. An input can arrive already quantized: a norm or an activation whose output
feeds one FP8 linear writes FP8 directly (`quantized_input`), and hands it on as a *carrier*,
a zero-strided tensor of the output's shape that autograd sees as the output (its gradient flows
back through the norm as usual) and that holds the FP8 data in `fp8_payload`.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lite.config import ModelConfig
from megatron_lite.parallel.state import ParallelState

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
INPUT, WEIGHT, GRAD = 0, 1, 2          # the operands of a linear, in the state's last dimension
FP8_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
GEMM_MULTIPLE = 16                     # torch._scaled_mm's dimensions are multiples of 16 on CUDA
_AMAX_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class FP8Recipe:
    forward_dtype: torch.dtype          # inputs and weights
    backward_dtype: torch.dtype         # output gradients
    delayed: bool
    history_len: int = 1
    algo: str = "most_recent"
    margin: int = 0

    @staticmethod
    def from_config(cfg: ModelConfig) -> Optional["FP8Recipe"]:
        if not cfg.fp8:
            return None
        return FP8Recipe(E4M3, E5M2 if cfg.fp8 == "hybrid" else E4M3, cfg.fp8_recipe == "delayed",
                         cfg.fp8_amax_history_len, cfg.fp8_amax_compute_algo, cfg.fp8_margin)

    def dtype(self, operand: int) -> torch.dtype:
        return self.backward_dtype if operand == GRAD else self.forward_dtype

    def settings(self) -> dict:
        """What a checkpoint records of the recipe its scaling state belongs to."""
        return {"history_len": self.history_len, "algo": self.algo, "margin": self.margin,
                "forward": str(self.forward_dtype), "backward": str(self.backward_dtype)}


def fp8_layer_numbers(cfg: ModelConfig) -> List[int]:
    """The decoder layers (numbered from 1) whose linears run in FP8."""
    first, last = 1, cfg.num_layers
    if cfg.first_last_layers_bf16:
        first, last = 1 + cfg.num_layers_at_start_in_bf16, cfg.num_layers - cfg.num_layers_at_end_in_bf16
    return list(range(first, last + 1))


# --------------------------------------------------------------------------- casting

def amax_of(t: torch.Tensor) -> torch.Tensor:
    """max |t| as an fp32 scalar on t's device (one reduction, no |t| temporary)."""
    return torch.linalg.vector_norm(t, float("inf"), dtype=torch.float32)


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return FP8_MAX[dtype] / amax.clamp(min=_AMAX_EPS)


def cast_to_fp8(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """saturate(t * scale) in `dtype`, computed in fp32 (the reference of the fused kernels)."""
    m = FP8_MAX[dtype]
    return (t.float() * scale).clamp_(-m, m).to(dtype)


class _Carry(torch.autograd.Function):
    """Identity for autograd from `out` to a zero-strided stand-in of its shape: the stand-in's
    gradient is `out`'s."""

    @staticmethod
    def forward(ctx, out):
        return out.new_zeros(1).expand(out.shape)

    @staticmethod
    def backward(ctx, g):
        return g


def make_carrier(out: torch.Tensor, data: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """A stand-in for `out` that costs no memory and carries (data, scale_inv), its FP8 cast; the
    gradient it receives goes to `out`."""
    carrier = _Carry.apply(out)
    carrier.fp8_payload = (data, scale_inv)
    return carrier


def payload(x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    return getattr(x, "fp8_payload", None)


# --------------------------------------------------------------------------- scaling state

_SETTING_FLAGS = {"history_len": "--fp8-amax-history-len", "algo": "--fp8-amax-compute-algo",
                  "margin": "--fp8-margin", "forward": "--fp8-format (forward dtype)",
                  "backward": "--fp8-format (gradient dtype)"}


class FP8State:
    """The scaling state of one model chunk's FP8 linears: for delayed scaling an amax history
    [history_len, n, 3] and scales [n, 3] (operands INPUT, WEIGHT, GRAD), n the chunk's linears,
    named by their global module names; `generation` counts weight updates (the weight casts'
    cache key)."""

    def __init__(self, recipe: FP8Recipe, names: List[str], device):
        self.recipe, self.names = recipe, list(names)
        n, length = len(names), recipe.history_len if recipe.delayed else 1
        self.amax_history = torch.zeros(length, n, 3, dtype=torch.float32, device=device)
        self.scale = torch.ones(n, 3, dtype=torch.float32, device=device)
        self.scale_inv = torch.ones(n, 3, dtype=torch.float32, device=device)
        self.fp8_max = torch.tensor([FP8_MAX[recipe.dtype(k)] for k in (INPUT, WEIGHT, GRAD)],
                                    dtype=torch.float32, device=device)
        self.generation = 0

    def weights_changed(self) -> None:
        """The weights were written (an optimizer step, a checkpoint load): cast them again."""
        self.generation += 1

    @torch.no_grad()
    def update(self, state: ParallelState) -> None:
        """End of a training step: delayed scaling reduces this step's amaxes over the ranks
        that hold the same layers (TP, DP), computes the next step's scales from the history
        and rolls it, as Transformer Engine's DelayedScaling does."""
        self.weights_changed()
        r = self.recipe
        if not r.delayed or not self.names:
            return
        current = self.amax_history[0]
        for group, size in ((state.tp_group, state.tp_size), (state.dp_group, state.dp_size)):
            if size > 1:
                dist.all_reduce(current, op=dist.ReduceOp.MAX, group=group)
        amax = self.amax_history.amax(dim=0) if r.algo == "max" else current.clone()
        new = self.fp8_max / amax / (2.0 ** r.margin)
        keep = ~(torch.isfinite(amax) & (amax > 0))
        self.scale.copy_(torch.where(keep, self.scale, new))
        torch.reciprocal(self.scale, out=self.scale_inv)
        if self.amax_history.shape[0] > 1:
            self.amax_history.copy_(torch.roll(self.amax_history, -1, dims=0))
        self.amax_history[0].zero_()

    def state_dict(self) -> Optional[dict]:
        """{"recipe": settings, "linears": {global name: {"amax_history", "scale"}}}; None for
        tensorwise scaling, which has no state."""
        if not self.recipe.delayed:
            return None
        return {"recipe": self.recipe.settings(),
                "linears": {name: {"amax_history": self.amax_history[:, i].cpu().clone(),
                                   "scale": self.scale[i].cpu().clone()} for i, name in enumerate(self.names)}}

    @torch.no_grad()
    def load_state_dict(self, saved: Optional[dict]) -> str:
        """Restore the linears' state from `saved` (entries by global name, as merged from the
        checkpoint's stages); the report's word for what happened."""
        if not self.recipe.delayed:
            return "not kept (tensorwise scaling has no state)"
        if saved is None:
            return "fresh (the checkpoint has no FP8 scaling state)"
        theirs, mine = saved.get("recipe", {}), self.recipe.settings()
        changed = [f"{flag} {theirs.get(k)}, this run has {mine[k]}" for k, flag in _SETTING_FLAGS.items()
                   if theirs.get(k) != mine[k]]
        if changed:
            return f"fresh (saved with {'; '.join(changed)})"
        missing = [n for n in self.names if n not in saved["linears"]]
        if missing:
            return f"fresh (the checkpoint has no FP8 state for {missing[0]}, a layer it did not run in FP8)"
        for i, name in enumerate(self.names):
            entry = saved["linears"][name]
            self.amax_history[:, i].copy_(entry["amax_history"])
            self.scale[i].copy_(entry["scale"])
        torch.reciprocal(self.scale, out=self.scale_inv)
        self.weights_changed()
        return "restored"


class FP8Meta:
    """One linear's view of the state: its scales, its amax slots, its weight cast."""

    def __init__(self, fp8_state: FP8State, index: int, ops=None):
        self.fp8_state, self.index, self.ops = fp8_state, index, ops
        self.recipe = fp8_state.recipe
        # the TP group a tensorwise input scale is agreed over: under sequence parallelism the cast
        # input is all-gathered (linear_qkv, linear_fc1), so every rank must cast with one scale
        self.agree_group = None
        self._weight: Optional[tuple] = None   # (generation, data_ptr, w_fp8, w_fp8_t, scale_inv)

    def recording(self, operand: int) -> bool:
        """Whether a cast records its amax: weights and gradients always, inputs in training
        forwards only (an evaluation's activations leave the history as it was)."""
        return self.recipe.delayed and (operand != INPUT or torch.is_grad_enabled())

    def quantize(self, t: torch.Tensor, operand: int, tp_group=None,
                 record: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(saturate(t * scale), 1 / scale) with this operand's scale. `tp_group`: tensorwise scales
        are agreed over it (the max of the ranks' amaxes), for a tensor all-gathered after the cast.
        `record`: whether to record the amax (default `recording`; an autograd function's forward
        runs without grad mode, so it is decided before)."""
        record = self.recording(operand) if record is None else record
        with torch.no_grad():
            return self._quantize(t.detach(), operand, tp_group, record)

    def _quantize(self, t, operand, tp_group, record):
        dtype = self.recipe.dtype(operand)
        s = self.fp8_state
        if self.recipe.delayed:
            scale = s.scale[self.index, operand]
            amax = s.amax_history[0, self.index, operand] if record else None
            # a scale of its own: cuBLASLt refuses scale pointers at a 4-byte offset into the state
            return quantize_with(self.ops, t, scale, amax, dtype), s.scale_inv[self.index, operand].clone()
        amax = amax_of(t)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=tp_group)
        scale = scale_from_amax(amax, dtype)
        return quantize_with(self.ops, t, scale, None, dtype), scale.reciprocal()

    def input_scale(self) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """For a fused producer of this linear's input: (scale, amax slot) under delayed scaling;
        None under tensorwise, whose scale needs the finished tensor."""
        if not self.recipe.delayed:
            return None
        s = self.fp8_state
        return s.scale[self.index, INPUT], (s.amax_history[0, self.index, INPUT] if self.recording(INPUT) else None)

    def input_scale_inv(self) -> torch.Tensor:
        return self.fp8_state.scale_inv[self.index, INPUT].clone()   # aligned, as quantize's

    def weight(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W in FP8 [N, K], its transpose [K, N] contiguous, 1 / scale), cast once per optimizer step."""
        key = (self.fp8_state.generation, w.data_ptr())
        if self._weight is None or self._weight[:2] != key:
            data, scale_inv = self.quantize(w, WEIGHT)
            self._weight = key + (data, data.t().contiguous(), scale_inv)
        return self._weight[2:]


def quantize_with(ops, t: torch.Tensor, scale: torch.Tensor, amax: Optional[torch.Tensor],
                  dtype: torch.dtype) -> torch.Tensor:
    """saturate(t * scale) in `dtype`, and amax = max(amax, max |t|) when an amax slot is given:
    one kernel with the CUDA ops (`ops.cast_fp8`), the fp32 torch form otherwise."""
    fused = getattr(ops, "cast_fp8", None) if ops is not None else None
    if fused is not None:
        out = fused(t, scale, amax, dtype)
        if out is not None:
            return out
    if amax is not None:
        torch.maximum(amax, amax_of(t), out=amax)
    return cast_to_fp8(t, scale, dtype)


# --------------------------------------------------------------------------- the GEMMs

def _gather(t: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 of an FP8 tensor (as bytes: collectives have no FP8 types)."""
    from megatron_lite.parallel.tensor import _all_gather_dim0

    return _all_gather_dim0(t.view(torch.uint8), group).view(t.dtype)


class _FP8Linear(torch.autograd.Function):
    """y = x W^T (+ b) with FP8 operands. `comm`: None (row-parallel input, or no TP), "copy"
    (column-parallel, x replicated: the input gradient is all-reduced over TP) or "gather"
    (column-parallel under sequence parallelism: x is all-gathered along s after its cast, the
    input gradient reduce-scattered)."""

    @staticmethod
    def forward(ctx, x, weight, bias, meta: FP8Meta, comm, group, fuse_wgrad, record):
        carried = payload(x)
        if carried is not None:
            xq, x_sinv = carried
        else:
            xq, x_sinv = meta.quantize(x, INPUT, group if comm == "gather" else None, record)
        if comm == "gather":
            xq = _gather(xq, group)
        wq, wq_t, w_sinv = meta.weight(weight)
        k, n = wq.shape[1], wq.shape[0]
        x2 = xq.reshape(-1, k)
        out_dtype = weight.dtype
        # fast accumulation in the forward GEMM only, as Transformer Engine and torchao do
        y = torch._scaled_mm(x2, wq.t(), scale_a=x_sinv, scale_b=w_sinv,
                             bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                             use_fast_accum=True)
        ctx.save_for_backward(x2.t().contiguous(), x_sinv, wq_t, w_sinv)
        ctx.meta, ctx.comm, ctx.group, ctx.fuse_wgrad = meta, comm, group, fuse_wgrad
        ctx.weight, ctx.has_bias, ctx.x_shape, ctx.x_dtype = weight, bias is not None, xq.shape, x.dtype
        return y.view(*xq.shape[:-1], n)

    @staticmethod
    def backward(ctx, g):
        from megatron_lite.parallel.tensor import _all_reduce, _reduce_scatter_dim0

        x_t, x_sinv, wq_t, w_sinv = ctx.saved_tensors
        weight = ctx.weight
        g2 = g.reshape(-1, g.shape[-1]).contiguous()
        gq, g_sinv = ctx.meta.quantize(g2, GRAD)
        grad_x = torch._scaled_mm(gq, wq_t.t(), scale_a=g_sinv, scale_b=w_sinv, out_dtype=g.dtype)
        grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.comm == "gather":
            grad_x = _reduce_scatter_dim0(grad_x, ctx.group)
        elif ctx.comm == "copy":
            grad_x = _all_reduce(grad_x, ctx.group)
        main_grad = getattr(weight, "main_grad", None)
        fused = ctx.fuse_wgrad and main_grad is not None and getattr(weight, "fuse_wgrad", False)
        wgrad_dtype = main_grad.dtype if fused else weight.dtype
        grad_bias = g2.sum(dim=0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if not ctx.needs_input_grad[1]:   # a frozen weight (LoRA's base)
            return grad_x, None, grad_bias, None, None, None, None, None
        g_t = gq.t().contiguous()
        if fused:   # gradient accumulation fusion (parallel/tensor.py's _LinearIntoMainGrad protocol)
            if weight.main_grad_is_stale:   # the first gradient of the iteration: written in place
                torch._scaled_mm(g_t, x_t.t(), scale_a=g_sinv, scale_b=x_sinv, out_dtype=wgrad_dtype, out=main_grad)
                weight.main_grad_is_stale = False
            else:
                main_grad.add_(torch._scaled_mm(g_t, x_t.t(), scale_a=g_sinv, scale_b=x_sinv, out_dtype=wgrad_dtype))
            weight.grad_added_to_main_grad = True
            grad_w = torch.empty_like(weight)
        else:
            grad_w = torch._scaled_mm(g_t, x_t.t(), scale_a=g_sinv, scale_b=x_sinv, out_dtype=wgrad_dtype)
        return grad_x, grad_w, grad_bias, None, None, None, None, None


def fits_fp8_gemm(t: torch.Tensor) -> bool:
    """Whether t's rows (tokens) are a multiple of 16, as the FP8 GEMMs take them; decoding a few
    tokens at a time (generation) runs in high precision instead."""
    return (t.numel() // max(t.shape[-1], 1)) % GEMM_MULTIPLE == 0


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], meta: FP8Meta,
               state: ParallelState, comm: Optional[str], fuse_wgrad: bool = True) -> Optional[torch.Tensor]:
    """The FP8 linear of x, or None for an input of a row count the FP8 GEMMs do not take (the
    caller runs its high-precision form)."""
    if payload(x) is None and not fits_fp8_gemm(x):
        return None
    if comm is not None and state.tp_size == 1:
        comm = None
    return _FP8Linear.apply(x, weight, bias, meta, comm, state.tp_group, fuse_wgrad, meta.recording(INPUT))


# --------------------------------------------------------------------------- fused producers

def quantized_input(out: torch.Tensor, meta: FP8Meta) -> torch.Tensor:
    """A producer's finished output, cast for the FP8 linear it feeds, as a carrier (the torch
    form of what the fused kernels write directly)."""
    data, scale_inv = meta.quantize(out, INPUT, meta.agree_group)
    return make_carrier(out, data, scale_inv)


# --------------------------------------------------------------------------- model wiring

def enable_fp8(model, cfg: ModelConfig, state: ParallelState, device) -> Optional[FP8State]:
    """Give each FP8 linear of this stage's decoder layers its FP8Meta, and each norm or MLP
    activation that feeds one (without an adapter on it) the meta to cast its output for;
    returns the stage's FP8State (None without --fp8-format)."""
    recipe = FP8Recipe.from_config(cfg)
    if recipe is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        from megatron_lite.arguments import ConfigError
        raise ConfigError(f"--fp8-format needs FP8 tensor cores (compute capability 8.9 or more: Ada, Hopper); "
                          f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}; "
                          f"train without --fp8-format")
    chosen = set(fp8_layer_numbers(cfg))
    names, linears = [], []
    for i, layer in enumerate(model.decoder.layers):
        if layer.self_attention.layer_number not in chosen:
            continue
        for path in FP8_LINEARS:
            names.append(f"decoder.layers.{model.layer_offset + i}.{path}")
            linears.append((layer, path, layer.get_submodule(path)))
    fp8_state = FP8State(recipe, names, device)
    for index, (layer, path, linear) in enumerate(linears):
        meta = FP8Meta(fp8_state, index, model.ops)
        if path.endswith(("linear_qkv", "linear_fc1")) and state.sequence_parallel and state.tp_size > 1:
            meta.agree_group = state.tp_group
        linear.fp8 = meta
        if linear.adapter is not None:
            continue   # the adapter reads the same input in high precision
        # a producer casts for its linear unless selective recompute frees its output ("layernorm",
        # "mlp_act": the carrier has no storage to free)
        if path.endswith("linear_qkv") and not layer.recompute_norms:
            layer.input_layernorm.fp8_consumer = meta
        elif path.endswith("linear_fc1") and not layer.recompute_norms:
            layer.pre_mlp_layernorm.fp8_consumer = meta
        elif path.endswith("linear_fc2") and not layer.mlp.recompute_activation:
            layer.mlp.fp8_consumer = meta
    return fp8_state


def fp8_state_of(chunks) -> List[FP8State]:
    """The FP8 states of a run's model chunks (modules or their DDP wrappers)."""
    out = []
    for c in chunks:
        module = getattr(c, "module", c)
        if getattr(module, "fp8_state", None) is not None:
            out.append(module.fp8_state)
    return out


def merge_saved(stages: List[Optional[dict]]) -> Optional[dict]:
    """One {"recipe", "linears"} from the fp8_state entries of a checkpoint's stages."""
    stages = [s for s in stages if s]
    if not stages:
        return None
    linears: Dict[str, dict] = {}
    for s in stages:
        linears.update(s["linears"])
    return {"recipe": stages[0]["recipe"], "linears": linears}
