"""LoRA: low-rank adapters on the decoder's linear layers, in PEFT's formulation

    y = W x + (alpha / r) * B A dropout(x)        A [r, in], B [out, r]

(--lora-rank r, --lora-alpha alpha, --lora-dropout, --lora-target-modules). A is drawn as PEFT
draws it (kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) and B is zero, so a fresh
adapter changes nothing. Every other parameter is frozen: no gradient, no optimizer state.

Under TP an adapter is split like its base layer, and its rank-r activation h = A x crosses the
TP region the way the base layer's activations do:
- column-parallel base (linear_qkv, linear_fc1; output split): B is split along its output rows
  (with fc1's [gate; up] chunks), A is whole on every rank; h goes through the same region as
  the base's input (copy_to_tp: gradient summed over TP; under SP all-gathered along s).
- row-parallel base (linear_proj, linear_fc2; input split): A is split along its input columns,
  B is whole; h is a partial sum, reduced as the base's output is (all-reduce, or reduce-scatter
  along s under SP).
Under SP the whole half sees only this rank's tokens, so it is marked `sequence_parallel` and its
gradient is summed over TP with the norms' (finalize_model_grads).

State-dict keys: `<linear>.adapter.lora_A.weight` and `<linear>.adapter.lora_B.weight`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.parallel.state import ParallelState
from megatron_lite.parallel.tensor import (ColumnParallelLinear, copy_to_tp_region, gather_from_sequence_parallel_region,
                                           reduce_from_tp_region, reduce_scatter_to_sequence_parallel_region,
                                           set_partition)

ADAPTER_KEY = ".adapter.lora_"


def is_adapter(name: str) -> bool:
    """Whether a (local or global) parameter name is a LoRA adapter's."""
    return ADAPTER_KEY in name


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The model a LoRA model adapts: the same config without adapters."""
    return dataclasses.replace(cfg, lora_rank=0)


def lora_settings(cfg: ModelConfig) -> dict:
    """What an adapter checkpoint records of its adapters (and a resumed run must repeat)."""
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
            "target_modules": list(cfg.lora_target_modules)}


class _Projection(nn.Module):
    """One low-rank factor; `global_shape` is the unsplit [out, in]."""

    def __init__(self, weight: nn.Parameter, global_shape):
        super().__init__()
        self.weight, self.global_shape = weight, tuple(global_shape)


class LoRAAdapter(nn.Module):
    """The adapter of one parallel linear layer; forward(x) is the term added to the layer's
    output (before its bias), for the same input x the layer gets."""

    def __init__(self, base: nn.Module, cfg: ModelConfig, state: ParallelState):
        super().__init__()
        self.state, self.scaling, self.dropout = state, cfg.lora_alpha / cfg.lora_rank, cfg.lora_dropout
        self.column = isinstance(base, ColumnParallelLinear)
        out_size, in_size = base.global_shape
        r, tp, dtype, device = cfg.lora_rank, state.tp_size, base.weight.dtype, base.weight.device
        if self.column:
            a = set_partition(nn.Parameter(torch.empty(r, in_size, dtype=dtype, device=device)), None)
            b = set_partition(nn.Parameter(torch.empty(out_size // tp, r, dtype=dtype, device=device)), 0,
                              base.weight.partition_chunks)
            whole = a
        else:
            a = set_partition(nn.Parameter(torch.empty(r, in_size // tp, dtype=dtype, device=device)), 1)
            b = set_partition(nn.Parameter(torch.empty(out_size, r, dtype=dtype, device=device)), None)
            whole = b
        whole.sequence_parallel = state.sequence_parallel
        self.lora_A = _Projection(a, (r, in_size))
        self.lora_B = _Projection(b, (out_size, r))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout > 0):
            return x
        # the same mask on every TP rank where x is replicated; this rank's own where x is split
        # (a row-parallel layer's input, or anything along s under sequence parallelism)
        split = not self.column or self.state.sequence_parallel
        with self.state.rng.fork() if split else contextlib.nullcontext():
            return F.dropout(x, p=self.dropout, training=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self._dropout(x), self.lora_A.weight)                 # [s, b, r]
        s = self.state
        if self.column:
            h = gather_from_sequence_parallel_region(h, s) if s.sequence_parallel else copy_to_tp_region(h, s)
        else:
            h = reduce_scatter_to_sequence_parallel_region(h, s) if s.sequence_parallel else reduce_from_tp_region(h, s)
        return F.linear(h, self.lora_B.weight) * self.scaling


def add_adapters(model: nn.Module, cfg: ModelConfig, state: ParallelState) -> None:
    """Attach an adapter to every --lora-target-modules linear of `model` and freeze the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in cfg.lora_target_modules:
            module.adapter = LoRAAdapter(module, cfg, state)


def adapter_init(name: str, global_shape) -> tuple:
    """(std, distribution) for `init_param_`: A from U(-1/sqrt(in), 1/sqrt(in)), B zeros."""
    if name.endswith("lora_A.weight"):
        return 1.0 / math.sqrt(global_shape[1]), "uniform"
    return None, "normal"
