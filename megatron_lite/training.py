"""The training loop: steps, evaluation, logging, exits and saves.

    run = build_run(cfg); load (checkpoint/); data from consumed_train_samples on;
    while iteration < train_iters: train_step; log; evaluate; save; exit checks

Modes (pretrain / finetune / further-train) only change what the checkpoint loader restores;
the loop is the same for all of them.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_lite.initialize import Run, build_run, model_dtype, print_rank0, setup_parallel
from megatron_lite.parallel.pipeline import get_forward_backward_func
from megatron_lite.parallel.random import preserved_rng


def num_microbatches(run: Run) -> int:
    t = run.cfg.train
    return t.global_batch_size // (t.micro_batch_size * run.state.dp_size)


def total_train_iters(run: Run) -> int:
    t = run.cfg.train
    if t.train_iters is not None:
        return t.train_iters
    return t.train_samples // t.global_batch_size


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_step(batch: dict, model):
    """One microbatch through this stage; on the last stage also the loss function."""
    batch = _to_device(batch, next(model.parameters()).device)
    losses = model(batch["tokens"], batch["position_ids"], labels=batch["labels"],
                   attention_mask=batch.get("attention_mask"))

    def loss_func(output):
        mask = batch["loss_mask"].float()
        loss = (output.float() * mask).sum() / mask.sum().clamp(min=1.0)
        return loss, {"lm loss": loss.detach()}

    return losses, loss_func


def _activation_shape(run: Run):
    m, t, s = run.cfg.model, run.cfg.train, run.state
    seq = m.seq_length // s.tp_size if s.sequence_parallel else m.seq_length
    return (seq, t.micro_batch_size, m.hidden_size)


def _average_reported(run: Run, reported: List[dict]) -> torch.Tensor:
    """Mean lm loss over microbatches and DP ranks, a float64 0-dim tensor on every rank (on the
    device when distributed); nothing here waits for the GPU."""
    s = run.state
    value = torch.zeros((), dtype=torch.float64)
    if s.is_last_stage and reported:
        value = torch.stack([r["lm loss"].reshape(()) for r in reported]).double().mean()
    if s.is_distributed:
        value = value.to(s.device)
        if s.is_last_stage and s.dp_size > 1:
            dist.all_reduce(value, group=s.dp_group)
            value /= s.dp_size
        if s.pp_size > 1:
            dist.broadcast(value, src=s.pp_ranks[-1], group=s.pp_group)
    return value


class StepMark:
    """A point on the device's timeline: a CUDA event where the step runs on a GPU (so the time
    between two marks is the GPU's, however far ahead the host is), the host's clock on a CPU."""

    def __init__(self, device: torch.device):
        self.time = time.perf_counter()
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def seconds_until(self, later: "StepMark") -> float:
        if self.event is not None and later.event is not None:
            later.wait()
            return self.event.elapsed_time(later.event) / 1000.0
        return later.time - self.time


class StepValues:
    """One step's reported numbers (lm loss, grad norm, loss scale, skipped) on their way to the host.

    When the step has been queued its loss and gradient norm are device tensors; they are copied
    to pinned host memory behind the step's kernels, and `read()` waits for that copy alone. The
    loop reads a step's numbers after queuing the next step, so the GPU does not sit idle while
    the host starts each step from a standstill (the numbers are the same either way).
    """

    def __init__(self, loss: torch.Tensor, grad_norm, loss_scale: float, skipped: bool):
        self._norm_on_device = isinstance(grad_norm, torch.Tensor)
        parts = [loss.reshape(())]
        if self._norm_on_device:
            parts.append(grad_norm.reshape(()).to(loss.device))
        packed = torch.stack([t.double() for t in parts])
        if packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
        else:
            self._host = packed
        self.done = StepMark(packed.device)   # when the step (and the copy) has run
        self._fixed = {"grad_norm": grad_norm, "loss_scale": loss_scale, "skipped": skipped}

    def read(self) -> dict:
        self.done.wait()
        values = self._host.tolist()
        out = dict(self._fixed, **{"lm loss": values[0]})
        if self._norm_on_device:
            out["grad_norm"] = values[1]
        return out


def queue_train_step(run: Run, batches: Iterator) -> StepValues:
    """Forward and backward over the global batch, then one optimizer step, queued on the device
    without waiting for it (except where the step itself needs a number on the host: the fp16
    overflow check, the unfused clipping path)."""
    from megatron_lite.parallel.data import finalize_model_grads

    run.optimizer.zero_grad()
    schedule = get_forward_backward_func(run.state)
    reported = schedule(forward_step, batches, run.model, run.state, num_microbatches=num_microbatches(run),
                        tensor_shape=_activation_shape(run), dtype=model_dtype(run.cfg), loss_scale=run.optimizer.get_loss_scale())
    finalize_model_grads([run.model], run.state)
    loss_scale = run.optimizer.get_loss_scale()
    ok, grad_norm, _ = run.optimizer.step(sync=False)
    run.scheduler.step(increment=run.cfg.train.global_batch_size)
    return StepValues(_average_reported(run, reported), grad_norm if ok else None, loss_scale, not ok)


def train_step(run: Run, batches: Iterator) -> dict:
    """One training step, waited for: {lm loss, grad_norm, loss_scale, skipped} as numbers."""
    return queue_train_step(run, batches).read()


@torch.no_grad()
def evaluate(run: Run, valid_iter: Iterator) -> Optional[float]:
    if valid_iter is None:
        return None
    run.model.eval()
    schedule = get_forward_backward_func(run.state)
    losses = []
    for _ in range(run.cfg.train.eval_iters):
        reported = schedule(forward_step, valid_iter, run.model, run.state, num_microbatches=num_microbatches(run),
                            tensor_shape=_activation_shape(run), dtype=model_dtype(run.cfg), forward_only=True)
        losses.append(_average_reported(run, reported).item())
        run.progress.consumed_valid_samples += run.cfg.train.global_batch_size
    run.model.train()
    return sum(losses) / len(losses)


class ExitSignal:
    """Records SIGTERM/SIGINT; the loop asks all ranks together whether any received one."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self, run: Run) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=run.state.device)
        if run.state.is_distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def format_log_line(run: Run, it: int, total: int, step: dict, elapsed_ms: float, lr: float) -> str:
    """Megatron's iteration line; the loss with 7 significant digits."""
    t, p = run.cfg.train, run.progress
    tokens_per_s = t.global_batch_size * run.cfg.model.seq_length / max(elapsed_ms / 1000.0, 1e-9)
    grad_norm = f"{step['grad_norm']:.6f}" if step["grad_norm"] is not None else "nan"
    return (f" iteration {it:8d}/{total:8d} | consumed samples: {p.consumed_train_samples:12d} | "
            f"elapsed time per iteration (ms): {elapsed_ms:.1f} | learning rate: {lr:.6E} | "
            f"global batch size: {t.global_batch_size:5d} | lm loss: {step['lm loss']:.6E} | "
            f"loss scale: {step['loss_scale']:.1f} | grad norm: {grad_norm} | "
            f"number of skipped iterations: {p.skipped_iterations:3d} | "
            f"number of nan iterations: {p.nan_iterations:3d} | tokens per second: {tokens_per_s:.1f} |")


def _tensorboard(run: Run):
    if not run.cfg.logging.tensorboard_dir or run.state.rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print_rank0("tensorboard is not installed; --tensorboard-dir ignored (pip install tensorboard)", run.state)
        return None
    return SummaryWriter(log_dir=run.cfg.logging.tensorboard_dir)


def train(run: Run, train_iter: Iterator, valid_iter: Optional[Iterator] = None, save_fn=None,
          exit_signal: Optional["ExitSignal"] = None) -> List[dict]:
    """Train from run.progress.iteration to the last iteration; returns one record per iteration
    (iteration, lm loss, lr, grad norm, loss scale, skipped) as every rank saw it.

    Each step's numbers are read once the next step is queued (StepValues), and at once where
    something in this iteration needs them: an evaluation or a save (its counters include the
    skipped and nan iterations), or an exit check that asks all ranks every iteration anyway."""
    from megatron_lite.checkpoint.checkpointing import interval_saves

    t, p = run.cfg.train, run.progress
    total = total_train_iters(run)
    exit_signal = exit_signal or ExitSignal(t.exit_signal_handler)
    writer = _tensorboard(run)
    start = time.time()
    run.model.train()
    timing = {"interval_start": StepMark(run.state.device)}
    pending = None   # (iteration, lr, StepValues) of the last step, its numbers not read yet

    def finish(it: int, lr: float, values: StepValues) -> None:
        step = values.read()
        if step["skipped"]:
            p.skipped_iterations += 1
        if not math.isfinite(step["lm loss"]):
            p.nan_iterations += 1
        record = {"iteration": it, "lm loss": step["lm loss"], "lr": lr, "grad_norm": step["grad_norm"],
                  "loss_scale": step["loss_scale"], "skipped": step["skipped"]}
        run.history.append(record)
        if it % t.log_interval == 0:   # time per iteration averaged over the interval
            elapsed_ms = timing["interval_start"].seconds_until(values.done) * 1000.0 / t.log_interval
            print_rank0(format_log_line(run, it, total, step, elapsed_ms, lr), run.state)
            timing["interval_start"] = values.done
        if writer is not None:
            for k in ("lm loss", "lr", "loss_scale"):
                writer.add_scalar(k.replace(" ", "_"), record[k], it)
            if step["grad_norm"] is not None:
                writer.add_scalar("grad_norm", step["grad_norm"], it)

    checks_every_iteration = bool(t.exit_duration_in_mins or t.exit_signal_handler)
    while p.iteration < total:
        lr = run.scheduler.get_lr()
        values = queue_train_step(run, train_iter)
        p.iteration += 1
        p.consumed_train_samples += t.global_batch_size
        if pending is not None:
            finish(*pending)
        pending = (p.iteration, lr, values)
        eval_due = valid_iter is not None and t.eval_interval and p.iteration % t.eval_interval == 0
        exit_due = t.exit_interval and p.iteration % t.exit_interval == 0
        if eval_due or exit_due or checks_every_iteration or (save_fn is not None and interval_saves(run, p.iteration)):
            finish(*pending)
            pending = None
        if eval_due:
            val = evaluate(run, valid_iter)
            print_rank0(f" validation loss at iteration {p.iteration} | lm loss value: {val:.6E} | "
                        f"lm loss PPL: {math.exp(min(val, 700)):.6E} |", run.state)
            if writer is not None:
                writer.add_scalar("validation_lm_loss", val, p.iteration)
        if save_fn is not None:
            save_fn(run, reason="interval")
        if _should_exit(run, exit_signal, start):
            break
    if pending is not None:
        finish(*pending)
    if save_fn is not None:
        save_fn(run, reason="end")
    if writer is not None:
        writer.close()
    return run.history


def _should_exit(run: Run, exit_signal: ExitSignal, start: float) -> bool:
    t, p = run.cfg.train, run.progress
    if t.exit_interval and p.iteration % t.exit_interval == 0:
        print_rank0(f"exiting at iteration {p.iteration} (--exit-interval {t.exit_interval})", run.state)
        return True
    if t.exit_duration_in_mins:
        elapsed = torch.tensor([(time.time() - start) / 60.0], device=run.state.device)
        if run.state.is_distributed:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if elapsed.item() > t.exit_duration_in_mins:
            print_rank0(f"exiting after {elapsed.item():.1f} minutes (--exit-duration-in-mins)", run.state)
            return True
    if t.exit_signal_handler and exit_signal.any_rank(run):
        print_rank0(f"exiting at iteration {p.iteration} on a signal", run.state)
        return True
    return False


def build_data(run: Run):
    from megatron_lite.data import build_data_iterators

    t, m = run.cfg.train, run.cfg.model
    total = total_train_iters(run)
    eval_runs = (total // t.eval_interval + 1) if t.eval_interval else 0
    return build_data_iterators(
        run.cfg.data, run.tokenizer, seq_length=m.seq_length, micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size, dp_rank=run.state.dp_rank, dp_size=run.state.dp_size,
        seed=t.seed, train_samples=total * t.global_batch_size,
        eval_samples=eval_runs * t.eval_iters * t.global_batch_size, test_samples=t.eval_iters * t.global_batch_size,
        consumed_train_samples=run.progress.consumed_train_samples,
        consumed_valid_samples=run.progress.consumed_valid_samples)


def pretrain(cfg, data_iterators=None, load: bool = True) -> Run:
    """Everything `pretrain_gpt.py` does: groups, load decision, build, restore, train, save.

    `data_iterators(run) -> (train_iter, valid_iter)` replaces the configured datasets;
    `load=False` starts from scratch whatever --load and --save hold."""
    from megatron_lite.checkpoint.checkpointing import (LoadDecision, check_model_config, decide_load,
                                                        maybe_save_checkpoint, requested_mode, restore)

    exit_signal = ExitSignal(cfg.train.exit_signal_handler)   # a signal during start-up is honoured too
    state = setup_parallel(cfg)
    decision = decide_load(cfg, state) if load else LoadDecision()
    check_model_config(cfg, decision)
    run = build_run(cfg, state)
    run.mode = requested_mode(cfg)
    if cfg.checkpoint.async_save:
        from megatron_lite.checkpoint.async_save import AsyncSaver
        run.async_saver = AsyncSaver()
    restore(run, decision)
    with preserved_rng(run.state.rng):   # a fresh run and a restart must draw the same numbers
        if data_iterators is None:
            train_iter, valid_iter, _ = build_data(run)
        else:
            train_iter, valid_iter = data_iterators(run)
    train(run, train_iter, valid_iter, save_fn=maybe_save_checkpoint, exit_signal=exit_signal)
    return run
