"""MegatronOptimizer: fp32 main params, loss-scale handling, global-norm clipping, ZeRO-1 sharding.

The torch optimizer (AdamW or SGD) never sees the model's parameters directly unless they
are fp32 and unsharded. Otherwise it updates fp32 *main params*: a copy of each bf16/fp16
parameter, or, with the distributed optimizer, a copy of the slice of each parameter that
falls into this DP rank's shard of its gradient bucket (see parallel/data.py). Their
gradients are the `main_grad` buffers that DistributedDataParallel fills, used in place:
fp32, or bf16 with --main-grads-dtype bf16 (megatron_lite's AdamW reads them as they are; a
torch optimizer needs a gradient of its parameter's dtype); fp16 buffers (--fp16 without
--accumulate-allreduce-grads-in-fp32) are copied to fp32 for the step. After the step the
main params are copied back into the model (cast to its dtype) and, with ZeRO-1,
all-gathered over DP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch

from megatron_lite.config import OptimizerConfig, ParallelConfig
from megatron_lite.optim.adamw import DTYPES, AdamW, fused_adamw_available
from megatron_lite.optim.clip_grads import (clip_coefficient, clip_grads_by_total_norm, counts_in_grad_norm,
                                            global_grad_norm, global_grad_norm_tensor)
from megatron_lite.optim.grad_scaler import GradScaler, build_grad_scaler
from megatron_lite.parallel.data import DistributedDataParallel, all_reduce, world_group
from megatron_lite.parallel.state import ParallelState


@dataclass
class MainParam:
    """What the torch optimizer updates for one model parameter on this rank.

    `main_param` covers the flattened range [start, end) of `model_param`: the whole
    parameter, or this DP rank's shard with the distributed optimizer. It is `model_param`
    itself when that is fp32 and whole.
    """
    name: str
    model_param: torch.nn.Parameter
    main_param: torch.Tensor
    start: int
    end: int
    _grad: Optional[torch.Tensor] = field(default=None, repr=False)
    _grad_of: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def is_copy(self) -> bool:
        return self.main_param is not self.model_param

    def model_view(self) -> torch.Tensor:
        """The part of the model parameter that `main_param` covers, flat, in the model's dtype."""
        return self.model_param.detach().view(-1)[self.start:self.end]

    def main_grad(self) -> torch.Tensor:
        """The gradient for `main_param`: a view of the DDP buffer, shaped like `main_param`
        (made once: the buffer lives as long as the DDP wrapper)."""
        buffer = self.model_param.main_grad
        if self._grad is None or self._grad_of is not buffer:
            self._grad = buffer.view(-1)[self.start:self.end].view(self.main_param.shape)
            self._grad_of = buffer
        return self._grad

    def copy_from_model(self) -> None:
        self.main_param.view(-1).copy_(self.model_param.detach().view(-1)[self.start:self.end])


def _main_params(chunk: DistributedDataParallel, prefix: str, state: ParallelState) -> List[MainParam]:
    """The main params of one model chunk, in the module's parameter order."""
    ranges = {p: (bucket, r) for bucket in chunk.buckets for p, r in bucket.ranges.items()}
    result = []
    for name, param in chunk.module.named_parameters():
        if not param.requires_grad:
            continue
        if chunk.use_distributed_optimizer:
            bucket, (p_start, p_end) = ranges[param]
            s_start, s_end = bucket.shard_range(state.dp_rank, state.dp_size)
            start, end = max(p_start, s_start) - p_start, min(p_end, s_end) - p_start
            if start >= end:
                continue  # another DP rank owns all of this parameter
            main = param.detach().view(-1)[start:end].to(torch.float32, copy=True)
        else:
            start, end = 0, param.numel()
            main = param if param.dtype == torch.float32 else param.detach().to(torch.float32, copy=True)
        result.append(MainParam(prefix + name, param, main, start, end))
    return result


class MegatronOptimizer:
    """One optimizer step over every model chunk of this rank: see the module docstring."""

    def __init__(self, optimizer: torch.optim.Optimizer, main_params: List[MainParam],
                 model_chunks: List[DistributedDataParallel], cfg: OptimizerConfig, state: ParallelState,
                 grad_scaler: Optional[GradScaler]):
        self.optimizer = optimizer
        self.main_params = main_params
        self.model_chunks = model_chunks
        self.cfg = cfg
        self.state = state
        self.grad_scaler = grad_scaler
        self.use_distributed_optimizer = model_chunks[0].use_distributed_optimizer if model_chunks else False
        self._by_tensor = {id(m.main_param): m for m in main_params}
        # gradients whose dtype differs from their main param's (bf16 main grads), during a step
        self._low_grads: Dict[int, torch.Tensor] = {}
        if isinstance(optimizer, AdamW):
            optimizer.grad_of = lambda p: p.grad if p.grad is not None else self._low_grads.get(id(p))
        # megatron_lite's AdamW and torch's fused AdamW take a grad_scale tensor that they divide
        # the gradients by as they read them
        self._fused = isinstance(optimizer, AdamW) or bool(optimizer.defaults.get("fused"))

    @property
    def param_groups(self) -> List[dict]:
        """The torch optimizer's groups (weight decay, then no weight decay); the scheduler sets
        `lr` and `weight_decay` on them."""
        return self.optimizer.param_groups

    def get_loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: multiplied by the current loss scale."""
        return loss * self.get_loss_scale()

    def zero_grad(self) -> None:
        """Zero the DDP gradient buffers (the main grads are views of them)."""
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        for m in self.main_params:
            m.main_param.grad = None

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the fp32 main params from the model's weights, after loading weights without
        optimizer state (finetune, --no-load-optim, --pretrained-checkpoint)."""
        for m in self.main_params:
            if m.is_copy:
                m.copy_from_model()

    def _unscale_and_check_overflow(self, grads: List[torch.Tensor]) -> bool:
        """Divide the main grads by the loss scale; True when any rank has an inf or NaN."""
        found_inf = torch.zeros((), dtype=torch.float32, device=self.state.device)
        inv_scale = torch.full((), 1.0 / self.grad_scaler.scale, dtype=torch.float32, device=self.state.device)
        if grads:   # one multi-tensor pass: unscale, and set found_inf on a non-finite value
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        all_reduce(found_inf, world_group(), op=torch.distributed.ReduceOp.MAX)
        return bool(found_inf.item())

    @torch.no_grad()
    def step(self, *, sync: bool = True) -> Tuple[bool, Optional[Union[float, torch.Tensor]], Optional[int]]:
        """Unscale, skip on overflow, clip to --clip-grad by the global norm, update, copy back.

        Returns (update_successful, grad_norm, num_zeros_in_grad); grad_norm is None for a
        skipped step, num_zeros_in_grad is always None (not counted). With `sync=False` the
        fused path returns grad_norm as a 0-dim device tensor instead of waiting for the step to
        finish to read it (the training loop reads it while the next step runs).
        """
        # fp16 gradient buffers: fp32 copies (as Megatron's fp16 optimizer makes them), so that
        # unscaling, clipping and the update run in fp32
        grads = [g.float() if g.dtype == torch.float16 else g for g in (m.main_grad() for m in self.main_params)]
        for m, g in zip(self.main_params, grads):
            if g.dtype == m.main_param.dtype:
                m.main_param.grad = g
            else:   # a bf16 main grad: our AdamW reads it through grad_of
                self._low_grads[id(m.main_param)] = g
        try:
            if self.grad_scaler is not None:
                found_inf = self._unscale_and_check_overflow(grads)
                self.grad_scaler.update(found_inf)
                if found_inf:
                    return False, None, None
            norm_grads = [g for m, g in zip(self.main_params, grads) if counts_in_grad_norm(m.model_param, self.state)]
            norm_group = world_group() if self.use_distributed_optimizer else self.state.mp_group
            if self._fused:
                # The fused kernel divides each gradient by grad_scale as it reads it: clipping
                # without a pass of its own, and with the coefficient computed on the device, so
                # the update is queued before the host waits for the norm.
                norm = global_grad_norm_tensor(norm_grads, norm_group, self.state.device)
                if self.cfg.clip_grad > 0.0:
                    self.optimizer.grad_scale = clip_coefficient(self.cfg.clip_grad, norm).reciprocal()
                self.optimizer.step()
                grad_norm = norm.item() if sync else norm
            else:
                grad_norm = global_grad_norm(norm_grads, norm_group, self.state.device)
                if self.cfg.clip_grad > 0.0:
                    clip_grads_by_total_norm(grads, self.cfg.clip_grad, grad_norm)
                self.optimizer.step()
        finally:
            self.optimizer.grad_scale = None
            self._low_grads.clear()
            for m in self.main_params:
                m.main_param.grad = None
        copies = [m for m in self.main_params if m.is_copy]
        if copies and not getattr(self.optimizer, "writes_model_params", False):
            # fp32 main params back into the bf16/fp16 model, one multi-tensor copy
            torch._foreach_copy_([m.model_view() for m in copies], [m.main_param.view(-1) for m in copies])
        for chunk in self.model_chunks:
            chunk.all_gather_params()
        return True, grad_norm, None

    def _ordered(self) -> List[MainParam]:
        """Main params in the torch optimizer's numbering (group by group)."""
        return [self._by_tensor[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """Optimizer state by parameter name; plain tensors and numbers only (weights_only loadable).

        The tensors are the live state, not copies: save or clone them before the next step.
        """
        torch_sd = self.optimizer.state_dict()
        params: Dict[str, dict] = {}
        for index, m in enumerate(self._ordered()):
            entry = {k: v for k, v in torch_sd["state"].get(index, {}).items() if v is not None}
            if m.is_copy:
                entry["main_param"] = m.main_param
            params[m.name] = entry
        sd = {
            "optimizer": self.cfg.optimizer,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in torch_sd["param_groups"]],
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "params": params,
        }
        if self.use_distributed_optimizer:
            sd["shard_ranges"] = {m.name: [m.start, m.end] for m in self.main_params}
        return sd

    def _check_compatible(self, sd: dict) -> None:
        if sd["optimizer"] != self.cfg.optimizer:
            raise ValueError(f"the checkpoint's optimizer is {sd['optimizer']} but this run uses "
                             f"{self.cfg.optimizer}; pass --optimizer {sd['optimizer']} or --no-load-optim")
        if ("shard_ranges" in sd) != self.use_distributed_optimizer:
            saved = "with" if "shard_ranges" in sd else "without"
            raise ValueError(f"the optimizer state was saved {saved} --use-distributed-optimizer; "
                             f"use the same setting or --no-load-optim")
        mine = {m.name for m in self.main_params}
        missing, unexpected = sorted(mine - set(sd["params"])), sorted(set(sd["params"]) - mine)
        if missing or unexpected:
            raise ValueError(f"optimizer state does not match the model: missing {missing}, unexpected "
                             f"{unexpected}; load a checkpoint of the same model and layout or pass --no-load-optim")
        if self.use_distributed_optimizer:
            for m in self.main_params:
                if list(sd["shard_ranges"][m.name]) != [m.start, m.end]:
                    raise ValueError(f"{m.name}: the checkpoint's distributed-optimizer shard covers "
                                     f"{sd['shard_ranges'][m.name]} but this rank owns [{m.start}, {m.end}]; "
                                     f"load with the DP size and --ddp-bucket-size it was saved with")
        if len(sd["param_groups"]) != len(self.optimizer.param_groups):
            raise ValueError(f"the checkpoint has {len(sd['param_groups'])} optimizer param groups, this run "
                             f"{len(self.optimizer.param_groups)}")

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Restore moments, step counts, fp32 main params, hyperparameters and the loss scaler."""
        self._check_compatible(sd)
        ordered = self._ordered()
        torch_state = {}
        for index, m in enumerate(ordered):
            saved = sd["params"][m.name]
            # straight to the parameter's device (a copy: the caller's tensors stay untouched);
            # "step" stays where torch's optimizer keeps it
            state = {k: (v.to(m.main_param.device, copy=True) if k != "step" else v.clone()) if torch.is_tensor(v)
                     else v for k, v in saved.items() if k != "main_param"}
            if state:
                torch_state[index] = state
            if m.is_copy:
                m.main_param.copy_(saved["main_param"])
        groups, index = [], 0
        for saved_group, group in zip(sd["param_groups"], self.optimizer.param_groups):
            groups.append(dict(saved_group, params=list(range(index, index + len(group["params"])))))
            index += len(group["params"])
        self.optimizer.load_state_dict({"state": torch_state, "param_groups": groups})
        if self.grad_scaler is not None and sd["grad_scaler"] is not None:
            self.grad_scaler.load_state_dict(sd["grad_scaler"])


def grad_buffer_dtype(cfg: OptimizerConfig) -> torch.dtype:
    """The dtype gradients accumulate in and are reduced over DP in (Megatron's
    grad_reduce_in_fp32 = --accumulate-allreduce-grads-in-fp32, else the parameters' dtype):
    bf16 with --main-grads-dtype bf16 or --bf16 --grad-reduce-in-bf16; fp16 with --fp16 unless
    --accumulate-allreduce-grads-in-fp32; fp32 otherwise (--bf16 implies fp32 accumulation)."""
    if cfg.main_grads_dtype == "bf16" or (cfg.bf16 and cfg.grad_reduce_in_bf16):
        return torch.bfloat16
    if cfg.fp16 and not cfg.accumulate_allreduce_grads_in_fp32:
        return torch.float16
    return torch.float32


EMBEDDING_OR_OUTPUT_WEIGHTS = ("embedding.word_embeddings.weight", "output_layer.weight")


def is_embedding_or_output(name: str) -> bool:
    """The input embedding and the output layer: the weights --decoupled-lr applies to."""
    return any(name == w or name.endswith("." + w) for w in EMBEDDING_OR_OUTPUT_WEIGHTS)


def param_groups(main_params: List[MainParam], cfg: OptimizerConfig) -> List[dict]:
    """Megatron's parameter groups: weight decay for parameters of 2 or more dimensions, none
    for biases and norm weights. With --decoupled-lr the input embedding and the output layer
    form groups of their own whose `max_lr` / `min_lr` (--decoupled-lr, --decoupled-min-lr,
    which defaults to --min-lr) the scheduler uses instead of --lr / --min-lr. The groups exist
    on every rank, empty where a pipeline stage holds neither layer, so every checkpoint shard
    has the same groups."""
    decoupled = cfg.decoupled_lr is not None
    kinds = [(True, False), (False, False)] + ([(True, True), (False, True)] if decoupled else [])
    groups = []
    for with_decay, is_decoupled in kinds:
        params = [m.main_param for m in main_params if (m.model_param.dim() >= 2) == with_decay
                  and (decoupled and is_embedding_or_output(m.name)) == is_decoupled]
        group = {"params": params, "wd_mult": 1.0 if with_decay else 0.0,
                 "weight_decay": cfg.weight_decay if with_decay else 0.0}
        if decoupled:
            group["max_lr"] = cfg.decoupled_lr if is_decoupled else cfg.lr
            group["min_lr"] = ((cfg.decoupled_min_lr if cfg.decoupled_min_lr is not None else cfg.min_lr)
                               if is_decoupled else cfg.min_lr)
        groups.append(group)
    return groups


def build_optimizer(model_chunks: List[DistributedDataParallel], cfg: OptimizerConfig,
                    parallel_cfg: ParallelConfig, state: ParallelState, *,
                    fused_kernels: bool = True) -> MegatronOptimizer:
    """AdamW (decoupled weight decay) or SGD over this rank's main params, in `param_groups`.
    `fused_kernels` False (--no-fused-kernels) keeps megatron_lite's CUDA AdamW kernel out."""
    if cfg.fp16 and cfg.bf16:
        raise ValueError("--fp16 and --bf16 are exclusive; pass one")
    for chunk in model_chunks:
        if chunk.use_distributed_optimizer != parallel_cfg.use_distributed_optimizer:
            raise ValueError("the model was wrapped with a different --use-distributed-optimizer setting than "
                             "the optimizer is built with; build both from the same ParallelConfig")
    grad_dtype = grad_buffer_dtype(cfg)
    for chunk in model_chunks:
        if chunk.grad_dtype != grad_dtype:
            raise ValueError(f"the model's gradient buffers are {chunk.grad_dtype} but --main-grads-dtype is "
                             f"{cfg.main_grads_dtype} (buffers of {grad_dtype}: see grad_buffer_dtype); wrap the "
                             f"model with DistributedDataParallel(..., grad_dtype={grad_dtype})")
    if grad_dtype == torch.bfloat16 and cfg.optimizer != "adam":
        raise ValueError("bf16 gradient buffers (--main-grads-dtype bf16 or --grad-reduce-in-bf16) need "
                         "--optimizer adam")
    main_params = []
    for i, chunk in enumerate(model_chunks):
        main_params += _main_params(chunk, f"chunk{i}." if len(model_chunks) > 1 else "", state)
    groups = param_groups(main_params, cfg)
    if cfg.optimizer == "adam":
        on_gpu = bool(main_params) and all(m.main_param.is_cuda for m in main_params)
        ours = fused_kernels and on_gpu and fused_adamw_available(main_params[0].main_param.device)
        moments = DTYPES[cfg.exp_avg_dtype], DTYPES[cfg.exp_avg_sq_dtype]
        if ours or moments != (torch.float32, torch.float32) or grad_dtype == torch.bfloat16:
            # megatron_lite's AdamW: moments in their configured dtypes; on GPUs one kernel that
            # also writes the model's bf16/fp16 copy of each parameter
            by_main = {id(m.main_param): m for m in main_params if m.is_copy}
            optimizer = AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                              exp_avg_dtype=moments[0], exp_avg_sq_dtype=moments[1], fused=ours,
                              model_view=lambda p: by_main[id(p)].model_view() if id(p) in by_main else None)
        else:
            # torch's AdamW: one fused kernel over all fp32 main params on GPUs (--no-fused-kernels)
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                          eps=cfg.adam_eps, fused=on_gpu or None)
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.sgd_momentum)
    else:
        raise ValueError(f"--optimizer {cfg.optimizer!r} is not supported; use adam or sgd")
    return MegatronOptimizer(optimizer, main_params, model_chunks, cfg, state, build_grad_scaler(cfg))
