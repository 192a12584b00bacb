"""Batch samplers driven by consumed_samples, as Megatron's pretraining samplers.

Both yield, for one data-parallel rank, the dataset indices of its next microbatch. The
position comes from `consumed_samples` (a multiple of micro_batch_size * dp_size), so after
a restart the next batch is computed from the checkpoint's counter, not replayed.
"""

from __future__ import annotations

from typing import Iterator, List

import torch


class _Sampler:
    """The layout both samplers share, checked once: samples, consumed samples, DP slice."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler layout: micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        if total_samples < 1:
            raise ValueError("the dataset has no samples to draw from")
        if consumed_samples < 0 or consumed_samples % (micro_batch_size * dp_size):
            raise ValueError(f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size "
                             f"* data-parallel size = {micro_batch_size * dp_size}; it must count whole "
                             f"microbatches of every rank")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size


class PretrainingSampler(_Sampler):
    """--dataloader-type single: samples in order from consumed_samples on.

    Each step takes the next micro_batch_size * dp_size samples and gives rank r the slice
    [r * mbs, (r + 1) * mbs), so a global batch is global_batch_size consecutive samples.
    A final incomplete step is dropped.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        super().__init__(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size)
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} is past the end of the dataset "
                             f"({total_samples} samples)")

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size
        first = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(start + first, start + first + self.micro_batch_size))


class PretrainingRandomSampler(_Sampler):
    """--dataloader-type cyclic: a fresh random order each epoch, forever (Megatron's data
    sharding on).

    Each epoch covers the largest multiple of micro_batch_size * dp_size samples. They are
    cut into one contiguous bucket per rank; rank r walks a permutation of its bucket drawn
    from torch's generator seeded with the epoch number, as Megatron does.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        super().__init__(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size)
        if total_samples < micro_batch_size * dp_size:
            raise ValueError(f"the dataset has {total_samples} samples, fewer than one step of "
                             f"micro_batch_size * data-parallel size = {micro_batch_size * dp_size}")

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size
        bucket_size = (self.total_samples // step) * self.micro_batch_size
        active_samples = bucket_size * self.dp_size
        while True:
            epoch, done_in_epoch = divmod(self.consumed_samples, active_samples)
            generator = torch.Generator()
            generator.manual_seed(epoch)
            order = torch.randperm(bucket_size, generator=generator).tolist()
            first = self.dp_rank * bucket_size
            mine = order[done_in_epoch // self.dp_size:]
            for i in range(0, len(mine) - self.micro_batch_size + 1, self.micro_batch_size):
                self.consumed_samples += step
                yield [first + x for x in mine[i:i + self.micro_batch_size]]
