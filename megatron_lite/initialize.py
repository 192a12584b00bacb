"""Build a run's pieces in Megatron's order: process groups, seeds, tokenizer, model, optimizer.

`build_run(cfg)` returns a Run that the training loop (training.py), the checkpoint code and
the Python API (trainer.py) share. Parallelism is applied to the model from outside: the
stage's GPTModel gets parallel layers and a ParallelState, then it is wrapped for DP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from megatron_lite.arguments import ConfigError, pad_vocab_size, validate
from megatron_lite.config import RunConfig
from megatron_lite.model.gpt import GPTModel
from megatron_lite.ops import build_ops_for
from megatron_lite.optim import build_optimizer, build_scheduler
from megatron_lite.optim.optimizer import grad_buffer_dtype
from megatron_lite.parallel.data import DistributedDataParallel
from megatron_lite.parallel.random import seed_everything
from megatron_lite.parallel.state import ParallelState, init_distributed, initialize



@dataclass
class Progress:
    """Counters that a checkpoint restores and the log reports."""
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    floating_point_operations_so_far: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if hasattr(self, k):
                setattr(self, k, v)


@dataclass
class Run:
    cfg: RunConfig
    state: ParallelState
    model: Any                      # DistributedDataParallel around the stage's GPTModel
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    ops: Any
    progress: Progress = field(default_factory=Progress)
    history: List[dict] = field(default_factory=list)
    mode: str = "pretrain"          # the mode this run requested; recorded in its checkpoints
    checkpoints: Any = None         # the CheckpointManager (load report, saves) when the run has one

    @property
    def module(self) -> GPTModel:
        return self.model.module if hasattr(self.model, "module") else self.model


def print_rank0(msg: str, state: Optional[ParallelState] = None) -> None:
    rank = state.rank if state is not None else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(msg, flush=True)


def model_dtype(cfg: RunConfig) -> torch.dtype:
    if cfg.optimizer.bf16:
        return torch.bfloat16
    if cfg.optimizer.fp16:
        return torch.float16
    return torch.float32


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels everywhere: torch algorithms, cuBLAS workspace, NCCL ring all-reduce."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("NCCL_ALGO", "Ring")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    # the fused attention backwards accumulate with atomics: use SDPA's math path
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def build_model(cfg: RunConfig, state: ParallelState, ops, device) -> GPTModel:
    return GPTModel(cfg.model, state, ops, seed=cfg.train.seed, dtype=model_dtype(cfg), device=device)


def setup_parallel(cfg: RunConfig) -> ParallelState:
    """Validate flags (before any group exists), then make the groups and seed every RNG."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size)
    set_deterministic(cfg.train.deterministic_mode)
    init_distributed(cfg.parallel.distributed_backend, cfg.parallel.distributed_timeout_minutes)
    state = initialize(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                       cfg.parallel.sequence_parallel, cfg.parallel.use_tp_pp_dp_mapping)
    seed_everything(cfg.train.seed, state.tp_rank, state.pp_rank, state.rng)
    return state


def build_run(cfg: RunConfig, state: ParallelState, tokenizer=None) -> Run:
    """Tokenizer, padded vocabulary, fused-op choice, the stage's model wrapped for DP, optimizer
    and LR scheduler. `state` comes from `setup_parallel`."""
    if tokenizer is None:
        from megatron_lite.data import build_tokenizer
        tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size)
    cfg.model.vocab_size = tokenizer.vocab_size   # --vocab-size only sizes a NullTokenizer
    cfg.model.padded_vocab_size = pad_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by,
                                                 cfg.parallel.tensor_model_parallel_size)
    ops = build_ops_for(cfg.model, state.device)
    print_rank0(ops.describe(), state)
    module = build_model(cfg, state, ops, state.device)
    model = DistributedDataParallel(module, cfg.parallel, state, grad_dtype=grad_buffer_dtype(cfg.optimizer))
    optimizer = build_optimizer([model], cfg.optimizer, cfg.parallel, state, fused_kernels=cfg.model.fused_kernels)
    try:
        scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.train)
    except ValueError as e:   # a schedule that cannot work is a flag problem
        raise ConfigError(str(e)) from e
    return Run(cfg=cfg, state=state, model=model, optimizer=optimizer, scheduler=scheduler,
               tokenizer=tokenizer, ops=ops)
