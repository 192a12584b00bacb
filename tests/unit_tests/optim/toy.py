"""A tiny model and a Megatron-shaped training loop for the optimizer and data-parallel tests.

The model has what the optimizer treats differently: 2-D weights (weight decay), biases and a
1-D norm-like scale (no weight decay). `train_steps` runs the same iteration the real loop
does: zero grads, microbatches (all but the last under no_sync), finalize_model_grads, step,
scheduler step.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import torch

from megatron_lite.config import OptimizerConfig, ParallelConfig, TrainConfig
from megatron_lite.optim import build_optimizer, build_scheduler
from megatron_lite.optim.optimizer import grad_buffer_dtype
from megatron_lite.parallel.data import DistributedDataParallel, all_reduce, finalize_model_grads
from megatron_lite.parallel.state import ParallelState

GLOBAL_BATCH = 8
TRAIN_ITERS = 10


class ToyModel(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16, dtype=dtype)
        self.norm_weight = torch.nn.Parameter(torch.ones(16, dtype=dtype))
        self.fc2 = torch.nn.Linear(16, 4, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            self.norm_weight.add_(1.0)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x.to(self.fc1.weight.dtype))) * self.norm_weight
        return ((self.fc2(h).float() - y) ** 2).mean()


def make_batches(num_iters: int) -> List[tuple]:
    """Per iteration, the global batch (x, y) of GLOBAL_BATCH samples."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 8, generator=generator), torch.randn(GLOBAL_BATCH, 4, generator=generator))
            for _ in range(num_iters)]


def opt_config(**overrides) -> OptimizerConfig:
    base = dict(lr=1e-2, min_lr=1e-3, lr_warmup_iters=2, lr_decay_style="cosine", weight_decay=0.1,
                clip_grad=0.5)
    base.update(overrides)
    return OptimizerConfig(**base)


def build(state: ParallelState, cfg: OptimizerConfig, parallel_cfg: Optional[ParallelConfig] = None,
          dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A fresh (model, optimizer, scheduler) triple with identical initial weights on every rank;
    the gradient buffers in `cfg.main_grads_dtype`."""
    parallel_cfg = parallel_cfg or ParallelConfig(ddp_bucket_size=64)
    model = DistributedDataParallel(ToyModel(dtype).to(device), parallel_cfg, state,
                                    grad_dtype=grad_buffer_dtype(cfg))
    optimizer = build_optimizer([model], cfg, parallel_cfg, state)
    scheduler = build_scheduler(optimizer, cfg, TrainConfig(train_iters=TRAIN_ITERS, global_batch_size=GLOBAL_BATCH))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, state: ParallelState, batches, micro_batch_size: int = 2,
                inject_inf_at: Optional[int] = None) -> List[dict]:
    """Run one iteration per global batch; this DP rank takes its contiguous share of each.

    Returns per iteration the DP-averaged loss, grad norm, success flag, lr and loss scale.
    """
    records = []
    device = next(model.parameters()).device
    for it, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        share = GLOBAL_BATCH // state.dp_size
        x, y = x[state.dp_rank * share:(state.dp_rank + 1) * share], y[state.dp_rank * share:(state.dp_rank + 1) * share]
        num_micro = share // micro_batch_size
        optimizer.zero_grad()
        total = torch.zeros((), device=device)
        for i in range(num_micro):
            sl = slice(i * micro_batch_size, (i + 1) * micro_batch_size)
            with model.no_sync() if i < num_micro - 1 else contextlib.nullcontext():
                loss = model(x[sl], y[sl]) / num_micro
                optimizer.scale_loss(loss).backward()
            total += loss.detach()
        finalize_model_grads([model], state)
        if inject_inf_at == it:
            model.module.fc1.weight.main_grad[0, 0] = float("inf")
        loss_scale = optimizer.get_loss_scale()
        ok, grad_norm, _ = optimizer.step()
        lr = scheduler.get_lr()
        scheduler.step(increment=GLOBAL_BATCH)
        all_reduce(total, state.dp_group)
        records.append({"loss": (total / state.dp_size).cpu(), "grad_norm": grad_norm, "ok": ok, "lr": lr,
                        "loss_scale": loss_scale})
    return records


def params_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
