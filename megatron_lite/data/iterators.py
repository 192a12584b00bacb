"""Microbatch iterators for the training loop: datasets, a consumed_samples sampler, a DataLoader."""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from megatron_lite.data.builder import build_gpt_datasets
from megatron_lite.data.cache import cache_dir
from megatron_lite.data.gpt_dataset import GPTDatasetSettings
from megatron_lite.data.samplers import PretrainingRandomSampler, PretrainingSampler

SAMPLERS = {"single": PretrainingSampler, "cyclic": PretrainingRandomSampler}


class DataIterators(tuple):
    """(train, valid, test) iterators; `datasets` holds the [train, valid, test] datasets they
    draw from (for builder.summary_lines)."""

    def __new__(cls, iterators, datasets):
        self = super().__new__(cls, iterators)
        self.datasets = list(datasets)
        return self


def build_data_iterators(data_cfg, tokenizer, *, seq_length: int, micro_batch_size: int,
                         global_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                         train_samples: int, eval_samples: int, test_samples: int,
                         consumed_train_samples: int = 0, consumed_valid_samples: int = 0):
    """DataIterators: (train, valid, test) iterators of this data-parallel rank's microbatches,
    or None, and the datasets behind them.

    Each item is a dict of CPU tensors: tokens, labels, position_ids [mbs, seq] int64,
    loss_mask [mbs, seq] float32, and attention_mask [mbs, 1, seq, seq] bool (True = masked)
    with --reset-attention-mask (unless --no-create-attention-mask-in-dataloader). Global
    batch k is samples [k * gbs, (k + 1) * gbs) counted from the start of the split; each of
    its microbatch steps takes mbs * dp_size of them and rank r gets [r * mbs, (r + 1) * mbs)
    of each step, so a run restarted with consumed_train_samples = n sees exactly what an
    uninterrupted run saw from n on. A split with no data or no requested samples gives None.
    """
    if data_cfg.dataloader_type not in SAMPLERS:
        raise ValueError(f"--dataloader-type {data_cfg.dataloader_type} is not one of {sorted(SAMPLERS)}")
    step = micro_batch_size * dp_size
    if global_batch_size % step:
        raise ValueError(f"--global-batch-size {global_batch_size} is not a multiple of "
                         f"--micro-batch-size {micro_batch_size} * data-parallel size {dp_size}")
    settings = GPTDatasetSettings(
        seq_length=seq_length, seed=seed, eod=tokenizer.eod,
        reset_position_ids=data_cfg.reset_position_ids,
        reset_attention_mask=data_cfg.reset_attention_mask,
        eod_mask_loss=data_cfg.eod_mask_loss, cache_dir=cache_dir(data_cfg.data_cache_path),
        create_attention_mask=data_cfg.create_attention_mask_in_dataloader,
        mmap_bin_files=data_cfg.mmap_bin_files)
    train, valid, test = build_gpt_datasets(data_cfg, tokenizer, settings,
                                            [train_samples, eval_samples, test_samples])
    if train_samples > 0 and (train is None or len(train) < train_samples):
        have = 0 if train is None else len(train)
        raise ValueError(f"the training data has {have} samples of {seq_length + 1} tokens but "
                         f"{train_samples} are needed; add data, change --split, or give the "
                         f"--data-path blend weights (weighted datasets repeat for more epochs)")

    def iterator(dataset, consumed: int) -> Optional[Iterator[dict]]:
        if dataset is None:
            return None
        sampler = SAMPLERS[data_cfg.dataloader_type](len(dataset), consumed, micro_batch_size,
                                                     dp_rank, dp_size)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=data_cfg.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=data_cfg.num_workers > 0)
        return iter(loader)

    return DataIterators((iterator(train, consumed_train_samples), iterator(valid, consumed_valid_samples),
                          iterator(test, 0)), (train, valid, test))
