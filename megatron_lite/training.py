"""The training loop: steps, evaluation, logging, exits and saves.

    run = build_run(cfg); load (checkpoint/); data from consumed_train_samples on;
    while iteration < train_iters: train_step; log; evaluate; save; exit checks

Modes (pretrain / finetune / further-train) only change what the checkpoint loader restores;
the loop is the same for all of them.
"""

from __future__ import annotations

import functools
import gc
import math
import signal
import time
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_lite.inference.generate import print_training_sample
from megatron_lite.initialize import Run, build_run, model_dtype, print_rank0, setup_parallel
from megatron_lite.logging_utils import (MetricsWriter, StepProfiler, Timers, check_weight_hash_across_dp_replicas,
                                         memory_stats, num_floating_point_operations, num_zeros_in_grad,
                                         params_l2_norm)
from megatron_lite.microbatches import MicroBatchCalculator
from megatron_lite.model.fp8 import fp8_state_of
from megatron_lite.parallel.pipeline import get_forward_backward_func
from megatron_lite.parallel.random import preserved_rng


def batch_schedule(run: Run) -> MicroBatchCalculator:
    return MicroBatchCalculator(run.cfg.train, run.state.dp_size, run.cfg.model.seq_length)


def current_global_batch_size(run: Run) -> int:
    """The global batch size of the next iteration (it changes with --rampup-batch-size or
    --step-batch-size-schedule)."""
    return batch_schedule(run).current_global_batch_size(run.progress.consumed_train_samples)


def num_microbatches(run: Run) -> int:
    return batch_schedule(run).num_microbatches(run.progress.consumed_train_samples)


def eval_global_batch_size(run: Run) -> int:
    """--eval-global-batch-size, by default the full training global batch size."""
    t = run.cfg.train
    return t.eval_global_batch_size or batch_schedule(run).global_batch_size


def total_train_iters(run: Run) -> int:
    t = run.cfg.train
    if t.train_iters is not None:
        return t.train_iters
    return batch_schedule(run).train_iters(t.train_samples)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_step(batch: dict, model, per_token_loss: bool = False):
    """One microbatch through this stage; on the last stage also the loss function: the mean
    over the microbatch's unmasked tokens, or with `per_token_loss` (--calculate-per-token-loss)
    their sum and count (the schedule and finalize_model_grads divide by the global count)."""
    batch = _to_device(batch, next(model.parameters()).device)
    losses = model(batch["tokens"], batch["position_ids"], labels=batch["labels"],
                   attention_mask=batch.get("attention_mask"))

    def loss_func(output):
        mask = batch["loss_mask"].float()
        loss_sum = (output.float() * mask).sum()
        if per_token_loss:
            num_tokens = mask.sum()
            return loss_sum, num_tokens, {"lm loss": loss_sum.detach()}
        loss = loss_sum / mask.sum().clamp(min=1.0)
        return loss, {"lm loss": loss.detach()}

    return losses, loss_func


def _num_tokens(reported: List[dict]) -> torch.Tensor:
    """This rank's unmasked tokens over the microbatches of a step (0 off the last stage)."""
    if not reported:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([r["num_tokens"].reshape(()) for r in reported]).double().sum()


def _activation_shape(run: Run):
    m, t, s = run.cfg.model, run.cfg.train, run.state
    seq = m.seq_length // s.tp_size if s.sequence_parallel else m.seq_length
    return (seq, t.micro_batch_size, m.hidden_size)


def _average_reported(run: Run, reported: List[dict]) -> torch.Tensor:
    """The step's lm loss, a float64 0-dim tensor on every rank (on the device when distributed):
    the mean over microbatches and DP ranks, or with --calculate-per-token-loss the summed loss
    over the summed tokens. Computed on the last stage and broadcast over the pipeline; nothing
    here waits for the GPU."""
    s = run.state
    per_token = run.cfg.train.calculate_per_token_loss   # known on every stage, unlike `reported`
    value = torch.zeros((), dtype=torch.float64)
    if s.is_last_stage and reported:
        value = torch.stack([r["lm loss"].reshape(()) for r in reported]).double()
        value = value.sum() if per_token else value.mean()
    tokens = _num_tokens(reported) if per_token else None
    if s.is_distributed:
        value = value.to(s.device)
        if s.is_last_stage and s.dp_size > 1:
            dist.all_reduce(value, group=s.dp_group)
            if per_token:
                tokens = tokens.to(s.device)
                dist.all_reduce(tokens, group=s.dp_group)
            else:
                value /= s.dp_size
    if per_token:
        value = value / tokens.to(value).clamp(min=1.0)
    if s.is_distributed and s.pp_size > 1:
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
    """One step's reported numbers (lm loss, grad norm, loss scale, skipped, and the `measured`
    0-dim tensors such as params_norm) on their way to the host.

    When the step has been queued its loss and gradient norm are device tensors; they are copied
    to pinned host memory behind the step's kernels, and `read()` waits for that copy alone. The
    loop reads a step's numbers after queuing the next step, so the GPU does not sit idle while
    the host starts each step from a standstill (the numbers are the same either way).
    """

    def __init__(self, loss: torch.Tensor, grad_norm, loss_scale: float, skipped: bool,
                 measured: Optional[dict] = None):
        self._norm_on_device = isinstance(grad_norm, torch.Tensor)
        self._measured = list(measured or {})
        parts = [loss.reshape(())]
        if self._norm_on_device:
            parts.append(grad_norm.reshape(()).to(loss.device))
        parts += [measured[k].reshape(()).to(loss.device) for k in self._measured]
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
        out.update(zip(self._measured, values[-len(self._measured):] if self._measured else []))
        return out


def _timed_batches(batches: Iterator, timer) -> Iterator:
    """`batches`, with the time spent fetching each one on `timer` ('batch-generator')."""
    while True:
        timer.start()
        try:
            batch = next(batches)
        finally:
            timer.stop()
        yield batch


def empty_unused_memory(run: Run, level: int) -> None:
    """torch.cuda.empty_cache() where --empty-unused-memory-level is at least `level` (1: after
    each forward-backward and evaluation step, 2: also after each optimizer step); GPUs only."""
    if run.cfg.train.empty_unused_memory_level >= level and run.state.device.type == "cuda":
        torch.cuda.empty_cache()


def queue_train_step(run: Run, batches: Iterator, timers: Optional[Timers] = None) -> StepValues:
    """Forward and backward over the global batch, then one optimizer step, queued on the device
    without waiting for it (except where the step itself needs a number on the host: the fp16
    overflow check, the unfused clipping path, and the timers of --timing-log-level 1 and 2)."""
    from megatron_lite.parallel.data import finalize_model_grads

    timers = timers or Timers(0, "minmax", run.state.device)
    lc = run.cfg.logging
    run.optimizer.zero_grad()
    schedule = get_forward_backward_func(run.state)
    per_token = run.cfg.train.calculate_per_token_loss
    step_fn = functools.partial(forward_step, per_token_loss=per_token)
    if timers.log_level >= 2:
        batches = _timed_batches(batches, timers("batch-generator", 2))
    timers("forward-backward", 1).start()
    reported = schedule(step_fn, batches, run.model, run.state, num_microbatches=num_microbatches(run),
                        tensor_shape=_activation_shape(run), dtype=model_dtype(run.cfg), loss_scale=run.optimizer.get_loss_scale())
    timers("forward-backward", 1).stop()
    timers("all-grads-sync", 1).start()
    finalize_model_grads([run.model], run.state,
                         num_tokens=_num_tokens(reported).to(run.state.device) if per_token else None)
    timers("all-grads-sync", 1).stop()
    empty_unused_memory(run, 1)
    loss_scale = run.optimizer.get_loss_scale()
    timers("optimizer", 1).start()
    ok, grad_norm, _ = run.optimizer.step(sync=False)
    for fp8_state in fp8_state_of([run.model]):   # the next step's FP8 scales, and fresh weight casts
        fp8_state.update(run.state)
    timers("optimizer", 1).stop()
    empty_unused_memory(run, 2)
    run.scheduler.step(increment=current_global_batch_size(run))
    measured = {}
    if lc.log_params_norm:
        measured["params_norm"] = params_l2_norm(run)
    if lc.log_num_zeros_in_grad and ok:
        measured["num_zeros"] = num_zeros_in_grad(run)
    return StepValues(_average_reported(run, reported), grad_norm if ok else None, loss_scale, not ok, measured)


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
    batch_size = eval_global_batch_size(run)
    for _ in range(run.cfg.train.eval_iters):
        reported = schedule(functools.partial(forward_step, per_token_loss=run.cfg.train.calculate_per_token_loss),
                            valid_iter, run.model, run.state,
                            num_microbatches=batch_size // (run.cfg.train.micro_batch_size * run.state.dp_size),
                            tensor_shape=_activation_shape(run), dtype=model_dtype(run.cfg), forward_only=True)
        empty_unused_memory(run, 1)
        losses.append(_average_reported(run, reported).item())
        run.progress.consumed_valid_samples += batch_size
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


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or grad norm with --check-for-nan-in-loss-and-grad (the default): the run stops."""


def _non_finite(step: dict) -> Optional[str]:
    """What was not finite in a step's numbers (an fp16 step the loss scaler skipped is fine), or None."""
    if not math.isfinite(step["lm loss"]):
        return f"lm loss {step['lm loss']}"
    norm = step["grad_norm"]
    if not step["skipped"] and norm is not None and not math.isfinite(norm):
        return f"grad norm {norm}"
    return None


def format_log_line(run: Run, it: int, total: int, step: dict, elapsed_ms: float, lr: float) -> str:
    """Megatron's iteration line; the loss with 7 significant digits. `step` may carry the
    iteration's consumed_samples and global_batch_size (else the run's current ones), and
    throughput, num_zeros and params_norm, which appear where Megatron puts them."""
    t, p = run.cfg.train, run.progress
    consumed = step.get("consumed_samples", p.consumed_train_samples)
    batch_size = step.get("global_batch_size", t.global_batch_size)
    tokens_per_s = batch_size * run.cfg.model.seq_length / max(elapsed_ms / 1000.0, 1e-9)
    grad_norm = f"{step['grad_norm']:.6f}" if step["grad_norm"] is not None else "nan"
    line = (f" iteration {it:8d}/{total:8d} | consumed samples: {consumed:12d} | "
            f"elapsed time per iteration (ms): {elapsed_ms:.1f} |")
    if step.get("throughput") is not None:
        line += f" throughput per GPU (TFLOP/s/GPU): {step['throughput']:.1f} |"
    line += (f" learning rate: {lr:.6E} | global batch size: {batch_size:5d} | lm loss: {step['lm loss']:.6E} | "
             f"loss scale: {step['loss_scale']:.1f} | grad norm: {grad_norm} |")
    if step.get("num_zeros") is not None:
        line += f" num zeros: {step['num_zeros']} |"
    if step.get("params_norm") is not None:
        line += f" params norm: {step['params_norm']:.3f} |"
    return line + (f" number of skipped iterations: {p.skipped_iterations:3d} | "
                   f"number of nan iterations: {p.nan_iterations:3d} | tokens per second: {tokens_per_s:.1f} |")


def write_step_metrics(run: Run, writer: MetricsWriter, it: int, step: dict, lr: float) -> None:
    """The --tensorboard-log-interval scalars of one iteration, under Megatron's tags."""
    lc, samples = run.cfg.logging, step["consumed_samples"]
    writer.scalar("samples vs steps", samples, it, tensorboard=False)
    writer.scalar("learning-rate", lr, it, samples)
    writer.scalar("batch-size", step["global_batch_size"], it, samples)
    writer.scalar("lm loss", step["lm loss"], it, samples)
    if lc.log_loss_scale_to_tensorboard:
        writer.scalar("loss-scale", step["loss_scale"], it, samples)
    for key, tag in (("grad_norm", "grad-norm"), ("num_zeros", "num-zeros"), ("params_norm", "params-norm")):
        if step.get(key) is not None:
            writer.scalar(tag, step[key], it, samples)
    if lc.log_memory_to_tensorboard:
        for tag, value in memory_stats(run.state.device).items():
            writer.scalar(tag, value, it, wandb=False)


def log_validation(run: Run, writer: MetricsWriter, it: int, loss: float) -> None:
    """Megatron's validation line and its 'lm loss validation' (and 'ppl') scalars; the perplexity
    is exp(min(20, loss)), as Megatron caps it."""
    ppl = math.exp(min(20.0, loss))
    print_rank0(f" validation loss at iteration {it} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |",
                run.state)
    samples = run.progress.consumed_train_samples
    writer.scalar("lm loss validation", loss, it, samples)
    if run.cfg.logging.log_validation_ppl_to_tensorboard:
        writer.scalar("lm loss validation ppl", ppl, it, samples, wandb=False)


def _manual_gc(run: Run, generation: int = 2) -> None:
    if run.cfg.train.manual_gc:
        gc.collect(generation)


def _check_weight_hash(run: Run) -> None:
    t, s = run.cfg.train, run.state
    if t.check_weight_hash_across_dp_replicas_interval is None:
        return
    check_weight_hash_across_dp_replicas(run.module, s.dp_group, s.dp_rank, run.progress.iteration, s.device)
    print_rank0(f">>> Weight hashes match after {run.progress.iteration} iterations...", s)


def train(run: Run, train_iter: Iterator, valid_iter: Optional[Iterator] = None, checkpoints=None,
          exit_signal: Optional["ExitSignal"] = None) -> List[dict]:
    """Train from run.progress.iteration to the last iteration; returns one record per iteration
    (iteration, lm loss, lr, grad norm, loss scale, skipped) as every rank saw it.

    Each step's numbers are read once the next step is queued (StepValues), and at once where
    something in this iteration needs them: an evaluation or a save (its counters include the
    skipped and nan iterations), an exit check that asks all ranks every iteration anyway, or
    timers (--timing-log-level 1 and 2 wait for the device at every timer anyway).

    With --manual-gc Python's automatic collector is off while the loop runs: one collection at
    the start, one every --manual-gc-interval iterations, a full one before each evaluation and
    a young-generation one after it (unless --no-manual-gc-eval).

    `checkpoints` (a CheckpointManager) saves after each iteration as its intervals ask, and
    once more when the loop stops. A non-finite loss or grad norm stops the run with
    NonFiniteLossError (unless --no-check-for-nan-in-loss-and-grad); either way no checkpoint is
    saved from that iteration on. --generate-interval prints a sample from the model every N
    iterations (inference/generate.py), without changing what training computes."""
    t, p, lc, s = run.cfg.train, run.progress, run.cfg.logging, run.state
    total = total_train_iters(run)
    exit_signal = exit_signal or ExitSignal(t.exit_signal_handler)
    timers = Timers(lc.timing_log_level, lc.timing_log_option, s.device)
    writer = MetricsWriter(lc, run.cfg.to_dict(), run.cfg.checkpoint.save, s.rank, s.world_size)
    profiler = StepProfiler(lc, s.rank, run.cfg.checkpoint.save, s.device)
    start = time.time()
    run.model.train()
    timing = {"interval_start": StepMark(s.device)}
    pending = None   # the last step's numbers, not read yet
    gc_was_enabled = gc.isenabled()
    if t.manual_gc:
        gc.disable()
        gc.collect()
    _check_weight_hash(run)

    def finish(it: int, lr: float, consumed: int, batch_size: int, values: StepValues) -> None:
        step = values.read()
        step.update(consumed_samples=consumed, global_batch_size=batch_size)
        if step["skipped"]:
            p.skipped_iterations += 1
        if not math.isfinite(step["lm loss"]):
            p.nan_iterations += 1
        bad = _non_finite(step)
        if bad is not None:
            # the weights may be damaged from here on: never saved, and retention keeps what is there
            if checkpoints is not None:
                checkpoints.stop_saving(it, bad)
            if t.check_for_nan_in_loss_and_grad:
                raise NonFiniteLossError(
                    f"iteration {it}: {bad}; stopping (--check-for-nan-in-loss-and-grad). The newest checkpoint "
                    f"is the last one saved before it; lower --lr or check the data, or pass "
                    f"--no-check-for-nan-in-loss-and-grad to train on without saving")
        if "num_zeros" in step:
            step["num_zeros"] = int(step["num_zeros"])
        record = {"iteration": it, "lm loss": step["lm loss"], "lr": lr, "grad_norm": step["grad_norm"],
                  "loss_scale": step["loss_scale"], "skipped": step["skipped"]}
        run.history.append(record)
        if writer.enabled and it % lc.tensorboard_log_interval == 0:
            write_step_metrics(run, writer, it, step, lr)
        if it % t.log_interval == 0:   # time per iteration averaged over the interval
            seconds = timing["interval_start"].seconds_until(values.done) / t.log_interval
            flops = num_floating_point_operations(run.cfg.model, batch_size)
            throughput = flops / (max(seconds, 1e-12) * 1e12 * s.world_size)
            if lc.log_throughput:
                step["throughput"] = throughput
            if checkpoints is not None:
                checkpoints.local_settled()   # a process killed after this line resumes from `it` or `it - 1`
            print_rank0(format_log_line(run, it, total, step, seconds * 1000.0, lr), s)
            timing["interval_start"] = values.done
            times = timers.gather()
            if lc.log_timers_to_tensorboard:
                writer.scalar("iteration-time", seconds, it)
                if lc.log_throughput:
                    writer.scalar("throughput", throughput, it)
                for name, per_rank in times.items():
                    if max(per_rank) > 0:
                        writer.scalar(f"{name}-time", max(per_rank) / t.log_interval, it)
            block = timers.format(times, t.log_interval)
            if block is not None:
                print_rank0(block, s)

    checks_every_iteration = bool(t.exit_duration_in_mins or t.exit_signal_handler or timers.log_level > 0)
    try:
        while p.iteration < total:
            lr = run.scheduler.get_lr()
            batch_size = current_global_batch_size(run)
            profiler.before_step(p.iteration)
            values = queue_train_step(run, train_iter, timers)
            p.iteration += 1
            p.consumed_train_samples += batch_size
            p.floating_point_operations_so_far += num_floating_point_operations(run.cfg.model, batch_size)
            profiler.after_step(p.iteration)
            if pending is not None:
                finish(*pending)
            pending = (p.iteration, lr, p.consumed_train_samples, batch_size, values)
            eval_due = valid_iter is not None and t.eval_interval and p.iteration % t.eval_interval == 0
            exit_due = t.exit_interval and p.iteration % t.exit_interval == 0
            save_due = checkpoints is not None and checkpoints.saves_due(p.iteration)
            sample_due = lc.generate_interval and p.iteration % lc.generate_interval == 0
            if eval_due or exit_due or checks_every_iteration or save_due or sample_due:
                finish(*pending)
                pending = None
            every = t.check_weight_hash_across_dp_replicas_interval
            if every and p.iteration % every == 0:
                _check_weight_hash(run)
            if eval_due:
                if t.manual_gc_eval:
                    _manual_gc(run)
                loss = evaluate(run, valid_iter)
                log_validation(run, writer, p.iteration, loss)
                if checkpoints is not None:
                    checkpoints.record_validation(p.iteration, loss)
                if t.manual_gc_eval:
                    _manual_gc(run, generation=0)
            if sample_due:
                print_training_sample(run)
            if checkpoints is not None:
                checkpoints.save_if_due(run)
            if t.manual_gc_interval and p.iteration % t.manual_gc_interval == 0:
                _manual_gc(run)
            if _should_exit(run, exit_signal, start):
                break
        if pending is not None:
            finish(*pending)
        profiler.stop()
        if checkpoints is not None:
            checkpoints.save_at_end(run)
    except NonFiniteLossError:
        if checkpoints is not None:
            checkpoints.finish()   # a finite checkpoint still being written in the background commits
        raise
    finally:
        writer.close()
        if t.manual_gc and gc_was_enabled:
            gc.enable()
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
    eval_batch = eval_global_batch_size(run)
    return build_data_iterators(
        run.cfg.data, run.tokenizer, seq_length=m.seq_length, micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size, dp_rank=run.state.dp_rank, dp_size=run.state.dp_size,
        seed=t.seed, train_samples=batch_schedule(run).samples_for_iterations(total),
        eval_samples=eval_runs * t.eval_iters * eval_batch, test_samples=t.eval_iters * eval_batch,
        consumed_train_samples=run.progress.consumed_train_samples,
        consumed_valid_samples=run.progress.consumed_valid_samples)


def pretrain(cfg, data_iterators=None, load: bool = True, resume_own: bool = True) -> Run:
    """Everything `pretrain_gpt.py` does: groups, load decision, build, restore, train, save.

    `data_iterators(run) -> (train_iter, valid_iter)` replaces the configured datasets;
    `load=False` starts from scratch whatever --load and --save hold; `resume_own=False` loads from
    --load alone, in the mode the flags ask for, whatever --save holds."""
    from megatron_lite.checkpoint.manager import CheckpointManager

    exit_signal = ExitSignal(cfg.train.exit_signal_handler)   # a signal during start-up is honoured too
    state = setup_parallel(cfg)
    checkpoints = CheckpointManager(cfg, state)
    try:
        return _pretrain(cfg, state, checkpoints, data_iterators, load, resume_own, exit_signal)
    finally:
        checkpoints.close()


def _pretrain(cfg, state, checkpoints, data_iterators, load, resume_own, exit_signal) -> Run:
    from megatron_lite.data import summary_lines
    from megatron_lite.summary import print_arguments, print_parameters

    checkpoints.decide(load, resume_own)
    run = build_run(cfg, state)
    run.checkpoints, run.mode = checkpoints, checkpoints.mode
    print_arguments(run)
    print_parameters(run)
    checkpoints.restore(run)
    with preserved_rng(run.state.rng):   # a fresh run and a restart must draw the same numbers
        if data_iterators is None:
            iterators = build_data(run)
            train_iter, valid_iter, _ = iterators
            print_rank0("\n".join(summary_lines(iterators.datasets)), run.state)
        else:
            train_iter, valid_iter = data_iterators(run)
    train(run, train_iter, valid_iter, checkpoints=checkpoints, exit_signal=exit_signal)
    return run
