"""Tensor parallelism: the communication autograd functions and the parallel layers.

Activations are sequence-first, [s, b, h], as in Megatron. Under sequence parallelism the
activations between the TP regions are split along s; the column-parallel layer all-gathers
them and the row-parallel layer reduce-scatters its output back.

Every parallel parameter records how it maps to its global tensor:
`tensor_model_parallel`, `partition_dim`, and `partition_chunks` (2 for SwiGLU's fc1, whose
global tensor is [gate; up] and whose rank-r shard is [gate_r; up_r]). `shard` and
`unshard` are the one place where that mapping is computed (initialisation, checkpoint
resharding and conversion all use them).
"""

from __future__ import annotations

import math
import zlib
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.model.fp8 import fp8_linear
from megatron_lite.parallel.state import ParallelState


# --------------------------------------------------------------------------- global <-> shard

def shard(full: torch.Tensor, dim: int, rank: int, size: int, chunks: int = 1) -> torch.Tensor:
    """Rank `rank`'s piece of a global tensor split `size` ways along `dim`.

    With chunks > 1 the tensor is first cut into `chunks` equal parts along `dim`, each part
    is split, and the rank's pieces are concatenated (SwiGLU fc1: [gate_r; up_r])."""
    parts = full.chunk(chunks, dim=dim)
    return torch.cat([p.chunk(size, dim=dim)[rank] for p in parts], dim=dim)


def unshard(pieces: List[torch.Tensor], dim: int, chunks: int = 1) -> torch.Tensor:
    """Inverse of `shard`: the global tensor from every rank's piece, in rank order."""
    split = [p.chunk(chunks, dim=dim) for p in pieces]
    return torch.cat([torch.cat([s[c] for s in split], dim=dim) for c in range(chunks)], dim=dim)


def set_partition(param: nn.Parameter, dim: Optional[int], chunks: int = 1) -> nn.Parameter:
    param.tensor_model_parallel = dim is not None
    param.partition_dim = -1 if dim is None else dim
    param.partition_chunks = chunks
    return param


def init_param_(param: nn.Parameter, name: str, global_shape, std: Optional[float], seed: int,
                tp_rank: int, tp_size: int, distribution: str = "normal") -> None:
    """Fill `param` with its shard of a global N(0, std) tensor (U(-std, std) with `distribution`
    "uniform"; zeros when std is None, ones when std == 'ones'), drawn from a generator seeded by
    (seed, global name) so the model is the same whatever the TP/PP layout."""
    if std is None:
        param.data.zero_()
        return
    if std == "ones":
        param.data.fill_(1.0)
        return
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    full = torch.empty(global_shape)
    if distribution == "uniform":
        full.uniform_(-std, std, generator=gen)
    else:
        full.normal_(0.0, std, generator=gen)
    if param.tensor_model_parallel:
        full = shard(full, param.partition_dim, tp_rank, tp_size, param.partition_chunks)
    param.data.copy_(full.to(param.dtype))


# --------------------------------------------------------------------------- collectives

def _all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    if dist.get_backend(group) == "nccl":
        out = x.new_empty((x.shape[0] * size,) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    if dist.get_backend(group) == "nccl":
        out = x.new_empty((x.shape[0] // size,) + tuple(x.shape[1:]))
        dist.reduce_scatter_tensor(out, x, group=group)
        return out
    dist.all_reduce(x, group=group)  # gloo has no reduce-scatter
    return x.chunk(size, dim=0)[dist.get_rank(group)].contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if dist.get_world_size(group) > 1:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None   # in place, as Megatron reduces: the GEMM's fresh input gradient


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward (output of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)   # in place, as Megatron reduces: the GEMM's fresh output, saved by nothing

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromSP(torch.autograd.Function):
    """All-gather along s forward, reduce-scatter backward (into a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_dim0(g, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    """Reduce-scatter along s forward, all-gather backward (out of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_dim0(g, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    """Keep this rank's slice of s forward, all-gather backward (after the embedding)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        size = dist.get_world_size(group)
        return x.chunk(size, dim=0)[dist.get_rank(group)].contiguous() if size > 1 else x

    @staticmethod
    def backward(ctx, g):
        return _all_gather_dim0(g, ctx.group), None


def copy_to_tp_region(x, state: ParallelState):
    return _CopyToTP.apply(x, state.tp_group) if state.tp_size > 1 else x


def reduce_from_tp_region(x, state: ParallelState):
    return _ReduceFromTP.apply(x, state.tp_group) if state.tp_size > 1 else x


def gather_from_sequence_parallel_region(x, state: ParallelState):
    return _GatherFromSP.apply(x, state.tp_group) if state.tp_size > 1 else x


def reduce_scatter_to_sequence_parallel_region(x, state: ParallelState):
    return _ReduceScatterToSP.apply(x, state.tp_group) if state.tp_size > 1 else x


def scatter_to_sequence_parallel_region(x, state: ParallelState):
    return _ScatterToSP.apply(x, state.tp_group) if state.tp_size > 1 else x


# --------------------------------------------------------------------------- layers

# torch.mm with an fp32 result from bf16/fp16 operands (cuBLAS accumulates in fp32 either way)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")


class _LinearIntoMainGrad(torch.autograd.Function):
    """F.linear whose weight gradient is computed straight into the weight's `main_grad`
    (Megatron's gradient accumulation fusion): the wgrad GEMM writes main_grad's dtype, fp32 or
    bf16 (the first gradient of the iteration), or accumulates into it (later microbatches), so
    no separate weight gradient is written and then added into main_grad by the DDP hook.

    Autograd still gets a gradient for the weight, so that the DDP hook runs (bucket
    bookkeeping, overlapped reduction); it is an uninitialised tensor that the hook drops,
    told by `grad_added_to_main_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        grad_x = g.matmul(weight)
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        main_grad = weight.main_grad
        # out_dtype only where it widens (fp32 main_grad); a bf16 main_grad is the plain GEMM
        wide = {"out_dtype": torch.float32} if main_grad.dtype != g2.dtype else {}
        if weight.main_grad_is_stale:   # first gradient of the iteration: overwrite
            torch.mm(g2.t(), x2, out=main_grad, **wide)
            weight.main_grad_is_stale = False
        else:
            torch.addmm(main_grad, g2.t(), x2, out=main_grad, **wide)
        weight.grad_added_to_main_grad = True
        grad_bias = g2.sum(dim=0) if ctx.has_bias else None
        return grad_x, torch.empty_like(weight), grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           fuse_wgrad: bool = True) -> torch.Tensor:
    """F.linear; on a GPU, for a bf16/fp16 weight whose gradient goes to a main_grad buffer (the
    DDP wrapper marks it `fuse_wgrad`, see --no-gradient-accumulation-fusion), with the weight
    gradient computed into main_grad. `fuse_wgrad` False for a weight that gets gradients from
    elsewhere too (a tied embedding used as the output layer on its own stage)."""
    if (fuse_wgrad and _MM_OUT_DTYPE and x.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)
            and getattr(weight, "fuse_wgrad", False) and weight.requires_grad and torch.is_grad_enabled()):
        return _LinearIntoMainGrad.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           state: ParallelState, fuse_wgrad: bool = True) -> torch.Tensor:
    """x (replicated, or split along s under sequence parallelism) times this rank's columns."""
    if state.sequence_parallel:
        x = gather_from_sequence_parallel_region(x, state)
    else:
        x = copy_to_tp_region(x, state)
    return linear(x, weight, bias, fuse_wgrad)


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split along its output dimension: each rank computes Y[:, shard].

    Input is replicated over TP (or, with sequence parallelism, split along s and gathered
    here); output stays split. With `skip_bias_add` the bias is returned for a later fused op.
    An `adapter` (model/lora.py) adds its term for the same input; with `fp8` the GEMMs run in FP8
    (model/fp8.py), the input's TP communication inside them."""

    def __init__(self, input_size: int, output_size: int, state: ParallelState, *, bias: bool = True,
                 skip_bias_add: bool = False, partition_chunks: int = 1, dtype=torch.float32,
                 device=None):
        super().__init__()
        assert output_size % state.tp_size == 0, (output_size, state.tp_size)
        self.state, self.skip_bias_add = state, skip_bias_add
        self.global_shape = (output_size, input_size)
        local = output_size // state.tp_size
        self.weight = set_partition(nn.Parameter(torch.empty(local, input_size, dtype=dtype, device=device)),
                                    0, partition_chunks)
        self.bias = set_partition(nn.Parameter(torch.zeros(local, dtype=dtype, device=device)),
                                  0, partition_chunks) if bias else None
        self.adapter = None
        self.fp8 = None   # an FP8Meta (model/fp8.py) with --fp8-format

    def forward(self, x: torch.Tensor):
        bias = self.bias if self.adapter is None and not self.skip_bias_add else None
        y = None
        if self.fp8 is not None:
            y = fp8_linear(x, self.weight, bias, self.fp8, self.state, "gather" if self.state.sequence_parallel else "copy")
        if y is None:
            y = column_parallel_linear(x, self.weight, bias, self.state)
        if self.adapter is not None:
            y = y + self.adapter(x)
            if not self.skip_bias_add and self.bias is not None:
                y = y + self.bias
        return (y, self.bias) if self.skip_bias_add else y


class RowParallelLinear(nn.Module):
    """Y = X A + b with A split along its input dimension: partial products are summed over TP
    (all-reduce, or reduce-scatter along s under sequence parallelism); b is added once. An
    `adapter` (model/lora.py) adds its term, already reduced, for the same input."""

    def __init__(self, input_size: int, output_size: int, state: ParallelState, *, bias: bool = True,
                 skip_bias_add: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        assert input_size % state.tp_size == 0, (input_size, state.tp_size)
        self.state, self.skip_bias_add = state, skip_bias_add
        self.global_shape = (output_size, input_size)
        self.weight = set_partition(
            nn.Parameter(torch.empty(output_size, input_size // state.tp_size, dtype=dtype, device=device)), 1)
        self.bias = None
        if bias:
            self.bias = set_partition(nn.Parameter(torch.zeros(output_size, dtype=dtype, device=device)), None)
            self.bias.sequence_parallel = state.sequence_parallel
        self.adapter = None
        self.fp8 = None   # an FP8Meta (model/fp8.py) with --fp8-format

    def forward(self, x: torch.Tensor):
        y = None if self.fp8 is None else fp8_linear(x, self.weight, None, self.fp8, self.state, None)
        if y is None:
            y = linear(x, self.weight)
        if self.state.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.state)
        else:
            y = reduce_from_tp_region(y, self.state)
        if self.adapter is not None:
            y = y + self.adapter(x)
        if self.skip_bias_add:
            return y, self.bias
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the (padded) vocabulary: each rank looks up the ids in its
    range, zeros the rest, and the partial results are summed over TP."""

    def __init__(self, num_embeddings: int, embedding_dim: int, state: ParallelState, *, dtype=torch.float32,
                 device=None):
        super().__init__()
        assert num_embeddings % state.tp_size == 0
        self.state = state
        self.global_shape = (num_embeddings, embedding_dim)
        local = num_embeddings // state.tp_size
        self.vocab_start = state.tp_rank * local
        self.vocab_end = self.vocab_start + local
        self.weight = set_partition(nn.Parameter(torch.empty(local, embedding_dim, dtype=dtype, device=device)), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.state.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return out  # the caller reduces (all-reduce or reduce-scatter into the SP region)


def init_std_for(name: str, std: float, num_layers: int) -> float:
    """Megatron's init: N(0, std), and N(0, std / sqrt(2 * num_layers)) for the output
    projections of each residual branch (linear_proj, linear_fc2)."""
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return std / math.sqrt(2.0 * num_layers)
    return std
