"""GPT samples from an indexed dataset: the document, sample and shuffle indices, as Megatron.

For one split (a contiguous range of documents) and a requested number of samples:

* document index: the split's documents repeated for enough epochs and shuffled with
  numpy's RandomState(seed). When the last epoch is needed for fewer than 80% of an
  epoch's samples it is shuffled separately, so that its partial use does not skew the
  earlier epochs (Megatron's separate-final-epoch rule).
* sample index: where each sample of seq_length + 1 tokens starts in that document order
  (helpers.build_sample_idx).
* shuffle index: a permutation of the samples, from the same RandomState (the separate
  final epoch again shuffled on its own).

The three arrays are cached as .npy files named by a hash of everything they depend on, so
a restart, or another rank, loads instead of rebuilding; the same seed rebuilds them
identically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from megatron_lite.data import cache
from megatron_lite.data.helpers import build_sample_idx
from megatron_lite.data.indexed_dataset import IndexedDataset

SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class GPTDatasetSettings:
    """What every GPT dataset of a run shares."""
    seq_length: int
    seed: int
    eod: int
    reset_position_ids: bool
    reset_attention_mask: bool
    eod_mask_loss: bool
    cache_dir: str
    create_attention_mask: bool = True
    mmap_bin_files: bool = True


def gpt_sample(text: np.ndarray, settings: GPTDatasetSettings) -> Dict[str, torch.Tensor]:
    """Turn seq_length + 1 tokens into the model's inputs, as Megatron's GPTDataset.

    tokens = text[:-1], labels = text[1:]. A document ends at (and includes) its eod token.
    With --reset-position-ids positions restart after each eod; with --reset-attention-mask
    a token sees only earlier tokens of its own document (attention_mask [1, s, s], True =
    masked); with --eod-mask-loss there is no loss where the input token is eod.
    --no-create-attention-mask-in-dataloader leaves the mask out, so the model's causal
    attention lets documents see each other. Without --reset-attention-mask the mask would be
    the plain causal one the model applies anyway, so it is left out too.
    """
    text = torch.from_numpy(np.asarray(text, dtype=np.int64).copy())
    tokens, labels = text[:-1], text[1:]
    positions = torch.arange(tokens.numel(), dtype=torch.int64)
    sample = {"tokens": tokens, "labels": labels, "position_ids": positions}
    is_eod = tokens == settings.eod
    loss_mask = torch.ones(tokens.numel(), dtype=torch.float32)
    if settings.eod_mask_loss:
        loss_mask[is_eod] = 0.0
    sample["loss_mask"] = loss_mask
    if settings.reset_position_ids:
        starts_document = torch.zeros_like(is_eod)
        starts_document[1:] = is_eod[:-1]
        document_start = torch.cummax(torch.where(starts_document, positions, 0), dim=0).values
        sample["position_ids"] = positions - document_start
    if settings.reset_attention_mask and settings.create_attention_mask:
        document = torch.cumsum(is_eod, dim=0) - is_eod.long()
        future = positions[None, :] > positions[:, None]
        sample["attention_mask"] = (future | (document[:, None] != document[None, :]))[None]
    return sample


def _build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                          separate_final_epoch: bool) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        document_index = np.tile(documents, num_epochs).astype(np.int32)
        rng.shuffle(document_index)
        return document_index
    first = _build_document_index(documents, num_epochs - 1, rng, False)
    last = _build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def _build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Shuffle [0, num_samples) and, separately, [num_samples, total_size)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


class GPTDataset(torch.utils.data.Dataset):
    """Samples of seq_length + 1 tokens over documents [first, last) of an indexed dataset.

    num_samples None builds one epoch; otherwise enough epochs for at least num_samples
    (len(dataset) is every full sample of those epochs, so it can be larger).
    """

    def __init__(self, indexed: IndexedDataset, split: str, first: int, last: int,
                 num_samples: Optional[int], settings: GPTDatasetSettings):
        self.indexed = indexed
        self.settings = settings
        self.split = split
        count = len(indexed.sequence_lengths)
        if not 0 <= first <= last <= count:
            raise ValueError(f"the {split} split asks for documents {first} to {last} of {indexed.path_prefix}, "
                             f"which holds {count}; the split must lie within [0, {count}]")
        self.tokens_per_epoch = int(indexed.sequence_lengths[first:last].sum(dtype=np.int64))
        if self.tokens_per_epoch < 2:
            raise ValueError(f"the {split} split of {indexed.path_prefix} (documents {first} to "
                             f"{last}) holds {self.tokens_per_epoch} tokens, too few for a sample; "
                             f"change --split or add data")
        self.description = {
            "class": type(self).__name__, "path_prefix": os.path.abspath(indexed.path_prefix),
            "split": split, "documents": [first, last], "num_tokens": self.tokens_per_epoch,
            "num_samples": num_samples, "seq_length": settings.seq_length, "seed": settings.seed}
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build(
            np.arange(first, last, dtype=np.int32), num_samples)

    def _load_or_build(self, documents: np.ndarray, num_samples: Optional[int]):
        directory = os.path.join(self.settings.cache_dir, "gpt_indices")
        base = os.path.join(directory, f"{cache.description_hash(self.description)}-{self.split}")
        names = ("document_index", "sample_index", "shuffle_index")
        paths = [f"{base}-{name}.npy" for name in names]

        def build():
            arrays = self._build_indices(documents, num_samples)
            for path, array in zip(paths, arrays):
                cache.save_array(path, array)
            cache.save_text(f"{base}-description.json", json.dumps(self.description, indent=2))

        cache.build_once(paths, build)
        return tuple(cache.load_array(p) for p in paths)

    def _build_indices(self, documents: np.ndarray, num_samples: Optional[int]
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        seq_length, tokens_per_epoch = self.settings.seq_length, self.tokens_per_epoch
        num_epochs = 1
        if num_samples is not None:
            # Each sample needs seq_length tokens of its own plus one shared with the next.
            tokens_needed = num_samples * seq_length + 1
            num_epochs = max(1, -(-tokens_needed // tokens_per_epoch))
        separate_final_epoch = False
        if num_epochs > 1:
            samples_before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
            samples_from_final = num_samples - samples_before_final
            samples_per_epoch = (tokens_per_epoch - 1) // seq_length
            separate_final_epoch = samples_from_final < int(
                SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)
        rng = np.random.RandomState(self.settings.seed)
        document_index = _build_document_index(documents, num_epochs, rng, separate_final_epoch)
        sample_index = build_sample_idx(self.indexed.sequence_lengths, document_index, seq_length,
                                        num_epochs, tokens_per_epoch)
        total = sample_index.shape[0] - 1
        shuffle_index = _build_shuffle_index(
            samples_before_final if separate_final_epoch else total, total, rng)
        return document_index, sample_index, shuffle_index

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample idx (after shuffling)."""
        i = int(self.shuffle_index[idx])
        doc_first, offset_first = (int(x) for x in self.sample_index[i])
        doc_last, offset_last = (int(x) for x in self.sample_index[i + 1])
        get = self.indexed.get
        if doc_first == doc_last:
            return get(self.document_index[doc_first], offset_first, offset_last - offset_first + 1)
        parts = [get(self.document_index[doc_first], offset_first)]
        parts += [get(self.document_index[d]) for d in range(doc_first + 1, doc_last)]
        parts.append(get(self.document_index[doc_last], 0, offset_last + 1))
        return np.concatenate(parts)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        return gpt_sample(self.tokens(idx), self.settings)


class MockGPTDataset(torch.utils.data.Dataset):
    """--mock-data: sample i is uniform random tokens drawn from a generator seeded by
    (seed, split, i) alone, so any sample can be produced on its own and a resumed run
    sees exactly what an uninterrupted one did."""

    def __init__(self, split: str, num_samples: int, vocab_size: int, settings: GPTDatasetSettings):
        self.split_id = SPLIT_NAMES.index(split)
        self.num_samples = num_samples
        self.vocab_size = vocab_size
        self.settings = settings

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"mock sample {idx} is outside [0, {self.num_samples})")
        rng = np.random.default_rng([self.settings.seed, self.split_id, int(idx)])
        return rng.integers(0, self.vocab_size, self.settings.seq_length + 1, dtype=np.int64)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        return gpt_sample(self.tokens(idx), self.settings)
