"""The global batch size of each iteration, and so its number of microbatches.

Three schedules, each a function of the samples consumed so far (Megatron-LM's
num_microbatches_calculator):

  constant (--global-batch-size):       G
  ramp-up (--rampup-batch-size S I N):  G once consumed > N; before that
                                        S + I * floor(consumed / (N / ((G - S) / I)))
                                        (one increment every N / number-of-increments samples)
  step (--step-batch-size-schedule):    the batch size of the last THRESHOLD <= consumed, the
                                        thresholds given in tokens (divided by --seq-length)

The number of microbatches of an iteration is its global batch size // (micro batch x DP).
Everything is derived from consumed_train_samples, which checkpoints save, so a resumed run
continues the schedule where it stopped.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from megatron_lite.config import TrainConfig

_SUFFIXES = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "T": 10 ** 12}


def _parse_count(text: str) -> int:
    text = text.strip().upper()
    multiplier = _SUFFIXES.get(text[-1:], 1)
    if multiplier != 1:
        text = text[:-1]
    return int(float(text) * multiplier)


def parse_step_schedule(schedule: str, seq_length: int) -> List[Tuple[int, int]]:
    """'THRESHOLD:BS ...' (tokens, suffixes K/M/B/T, commas or spaces) -> [(samples, batch size)],
    sorted; the first threshold must be 0 and thresholds strictly increase."""
    steps = []
    for entry in schedule.replace(",", " ").split():
        if ":" not in entry:
            raise ValueError(f"--step-batch-size-schedule entry {entry!r} is not THRESHOLD:BATCH_SIZE")
        threshold, batch = entry.split(":", 1)
        steps.append((_parse_count(threshold) // seq_length, _parse_count(batch)))
    steps.sort()
    if not steps or steps[0][0] != 0:
        raise ValueError(f"--step-batch-size-schedule {schedule!r} must start with a threshold of 0, "
                         f"e.g. '0:256 1B:512'")
    for (before, _), (after, _) in zip(steps, steps[1:]):
        if after <= before:
            raise ValueError(f"--step-batch-size-schedule thresholds must strictly increase (in samples of "
                             f"--seq-length {seq_length}); {before} is followed by {after}")
    if any(batch <= 0 for _, batch in steps):
        raise ValueError(f"--step-batch-size-schedule {schedule!r}: batch sizes must be positive")
    return steps


class MicroBatchCalculator:
    """Global batch size and number of microbatches as functions of consumed samples."""

    def __init__(self, train_cfg: TrainConfig, dp_size: int, seq_length: int):
        self.micro_batch_times_dp = train_cfg.micro_batch_size * dp_size
        self.global_batch_size = train_cfg.global_batch_size
        self.rampup: Optional[Tuple[int, int, int]] = None
        self.steps: Optional[List[Tuple[int, int]]] = None
        if train_cfg.rampup_batch_size is not None:
            start, increment, samples = (int(v) for v in train_cfg.rampup_batch_size)
            if start <= 0 or increment <= 0 or samples < 0:
                raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: the start batch size and the "
                                 f"increment must be positive, the ramp-up samples non-negative")
            diff = self.global_batch_size - start
            if diff < 0 or diff % increment:
                raise ValueError(f"--rampup-batch-size: --global-batch-size {self.global_batch_size} minus the start "
                                 f"batch size {start} must be a non-negative multiple of the increment {increment}")
            self.rampup = (start, increment, samples)
            self.samples_per_increment = samples / (diff // increment) if diff else float("inf")
        elif train_cfg.step_batch_size_schedule is not None:
            self.steps = parse_step_schedule(train_cfg.step_batch_size_schedule, seq_length)
            self.global_batch_size = self.steps[-1][1]

    def current_global_batch_size(self, consumed_samples: int) -> int:
        """The global batch size of the iteration that starts after `consumed_samples`."""
        if self.rampup is not None:
            start, increment, samples = self.rampup
            if consumed_samples > samples:
                return self.global_batch_size
            return start + int(consumed_samples / self.samples_per_increment) * increment
        if self.steps is not None:
            return [batch for threshold, batch in self.steps if threshold <= consumed_samples][-1]
        return self.global_batch_size

    def num_microbatches(self, consumed_samples: int) -> int:
        """Microbatches per DP rank of the iteration that starts after `consumed_samples`."""
        batch = self.current_global_batch_size(consumed_samples)
        if batch % self.micro_batch_times_dp:
            raise ValueError(f"the global batch size {batch} at {consumed_samples} consumed samples is not divisible "
                             f"by micro batch size x data-parallel size = {self.micro_batch_times_dp}; change the "
                             f"batch-size schedule or --micro-batch-size")
        return batch // self.micro_batch_times_dp

    def train_iters(self, train_samples: int) -> int:
        """Iterations that --train-samples makes (a partial last batch is dropped). Ramp-up counts as
        Megatron's update_train_iters does: iterations of the ramp while consumed <= the ramp-up
        samples and <= train_samples, then full batches of the rest."""
        if self.rampup is not None:
            iterations = consumed = 0
            while consumed <= self.rampup[2] and consumed <= train_samples:
                consumed += self.current_global_batch_size(consumed)
                iterations += 1
            if train_samples > consumed:
                iterations += (train_samples - consumed) // self.global_batch_size
            return iterations
        if self.steps is not None:
            iterations = consumed = 0
            while consumed + self.current_global_batch_size(consumed) <= train_samples:
                consumed += self.current_global_batch_size(consumed)
                iterations += 1
            return iterations
        return train_samples // self.global_batch_size

    def samples_for_iterations(self, iterations: int, consumed_samples: int = 0) -> int:
        """Samples that `iterations` iterations from `consumed_samples` on consume."""
        if self.rampup is None and self.steps is None:
            return iterations * self.global_batch_size
        consumed = consumed_samples
        for _ in range(iterations):
            consumed += self.current_global_batch_size(consumed)
        return consumed - consumed_samples
