"""The train, valid and test datasets a DataConfig describes, as Megatron's dataset builder.

Sources, in order of precedence:
* --mock-data: MockGPTDataset of exactly the requested sizes.
* --train-data-path / --valid-data-path / --test-data-path: each split from its own blend,
  using all of its documents.
* --data-path: one blend split into train/valid/test by --split (ranges of documents).
* nothing: the default corpus (default_corpus.py), split by --split.

A blend is one prefix, several prefixes (weighted by their sizes) or weight/prefix pairs.
One prefix without a weight gives a GPTDataset directly. With weights, each dataset is asked
for ceil(ceil(size * weight) * 1.005) samples and the blend holds sum(ceil(size * weight));
without, each dataset is one epoch and the blend holds min(size, their total) samples.

A split that --split gives no share is not built, whatever was requested of it (Megatron's
rule: no validation dataset means no evaluation). A split that has a share but no sample to
give, while samples are requested of it, is a ConfigError: Megatron would loop forever
looking for tokens there. In an unweighted blend such a dataset only drops out of that
split, as its zero length gives it zero weight in Megatron.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

from megatron_lite.arguments import ConfigError
from megatron_lite.data.blended_dataset import BlendedDataset, normalize
from megatron_lite.data.default_corpus import default_corpus_prefix
from megatron_lite.data.gpt_dataset import SPLIT_NAMES, GPTDataset, GPTDatasetSettings, MockGPTDataset
from megatron_lite.data.indexed_dataset import IndexedDataset, bin_path, idx_path
from megatron_lite.validation import parse_split


MID_LEVEL_SURPLUS = 0.005
SplitMatrix = List[Optional[Tuple[float, float]]]


def split_matrix(split: str) -> SplitMatrix:
    """'969,30,1' -> [(0, 0.969), (0.969, 0.999), (0.999, 1.0)]: each split's share of the
    documents as bounds on [0, 1] (validation.parse_split reads the numbers); a zero share
    gives None."""
    bounds = [0.0]
    for share in normalize(parse_split(split)):
        bounds.append(bounds[-1] + share)
    return [(lo, hi) if hi > lo else None for lo, hi in zip(bounds[:-1], bounds[1:])]


def check_prefixes(prefixes: Sequence[str], flag: str) -> None:
    """Every prefix names an existing .bin/.idx pair, or a one-line ConfigError says which file is missing."""
    for prefix in prefixes:
        missing = [path for path in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(path)]
        if not missing:
            continue
        stem, extension = os.path.splitext(prefix)
        if extension in (".bin", ".idx") and os.path.isfile(bin_path(stem)) and os.path.isfile(idx_path(stem)):
            raise ConfigError(f"{flag} {prefix}: pass the prefix without the {extension} extension "
                              f"({flag} {stem})")
        raise ConfigError(f"{flag} {prefix}: {' and '.join(missing)} not found; pass the path prefix "
                          f"shared by the .bin and .idx files written by tools/preprocess_data.py")


def parse_blend(paths: Sequence[str], flag: str) -> Tuple[List[str], Optional[List[float]]]:
    """['0.3', 'a', '0.7', 'b'] -> (['a', 'b'], [0.3, 0.7]); ['a', 'b'] -> (['a', 'b'], None)."""
    paths = list(paths)

    def is_number(text):
        try:
            float(text)
            return True
        except ValueError:
            return False

    if len(paths) % 2 == 0 and all(is_number(w) for w in paths[0::2]):
        return paths[1::2], [float(w) for w in paths[0::2]]
    if not any(is_number(p) for p in paths):
        return paths, None
    raise ValueError(f"{flag} {' '.join(paths)} mixes weights and prefixes; give either prefixes "
                     f"only or weight/prefix pairs (e.g. {flag} 0.3 a_text_document 0.7 b_text_document)")


def _document_splits(prefix: str, flag: str, split: SplitMatrix, split_source: str,
                     sizes: Sequence[Optional[int]], settings: GPTDatasetSettings) -> List[Optional[GPTDataset]]:
    """One GPTDataset per split of `prefix`'s documents; None where the split has no share or
    no samples are requested of it, and, for an unweighted blend member (size None), where it
    has no sample to give."""
    indexed = IndexedDataset(prefix, mmap=settings.mmap_bin_files)
    count = len(indexed)
    datasets = []
    for name, bounds, size in zip(SPLIT_NAMES, split, sizes):
        if bounds is None or size == 0:
            datasets.append(None)
            continue
        first, last = int(round(bounds[0] * count)), int(round(bounds[1] * count))
        tokens = int(indexed.sequence_lengths[first:last].sum())
        if tokens < 2:
            if size is None:
                datasets.append(None)
                continue
            raise ConfigError(f"{flag}: the {name} split of {prefix} (documents {first} to {last} of "
                              f"{count}{split_source}) holds {tokens} tokens, too few for a sample; change --split "
                              f"or add data")
        datasets.append(GPTDataset(indexed, name, first, last, size, settings))
    return datasets


def _blend_splits(paths: Sequence[str], flag: str, split: SplitMatrix, split_source: str,
                  sizes: Sequence[int], settings: GPTDatasetSettings) -> list:
    prefixes, weights = parse_blend(paths, flag)
    if weights is not None and min(weights) <= 0:
        raise ValueError(f"{flag} has a weight of {min(weights)}; weights must be positive "
                         f"(leave out a dataset instead of weighting it 0)")
    check_prefixes(prefixes, flag)
    if len(prefixes) == 1 and weights is None:
        return _document_splits(prefixes[0], flag, split, split_source, sizes, settings)
    if weights is not None:
        weights = normalize(weights)
        targets = [[math.ceil(size * w) for size in sizes] for w in weights]
        requests = [[math.ceil(t * (1 + MID_LEVEL_SURPLUS)) for t in row] for row in targets]
    else:
        requests = [[None if size else 0 for size in sizes] for _ in prefixes]
    parts = [_document_splits(p, flag, split, split_source, r, settings) for p, r in zip(prefixes, requests)]
    blends = []
    for i, (name, size) in enumerate(zip(SPLIT_NAMES, sizes)):
        if size == 0 or split[i] is None:
            blends.append(None)
            continue
        if weights is not None:
            datasets = [per_prefix[i] for per_prefix in parts]
            blends.append(BlendedDataset(datasets, weights, sum(t[i] for t in targets), settings.cache_dir))
            continue
        datasets = [per_prefix[i] for per_prefix in parts if per_prefix[i] is not None and len(per_prefix[i])]
        if not datasets:
            raise ConfigError(f"{flag}: the {name} split of every dataset of the blend is "
                              f"empty{split_source}; change --split or add data")
        lengths = [len(d) for d in datasets]
        blends.append(BlendedDataset(datasets, lengths, min(size, sum(lengths)), settings.cache_dir))
    return blends


def build_gpt_datasets(data_cfg, tokenizer, settings: GPTDatasetSettings,
                       sizes: Sequence[int]) -> list:
    """[train, valid, test] datasets of at least the given sizes (None where a split is empty)."""
    per_split = [data_cfg.train_data_path, data_cfg.valid_data_path, data_cfg.test_data_path]
    if data_cfg.mock_data:
        if data_cfg.data_path or any(per_split):
            raise ConfigError("--mock-data and --data-path/--train-data-path were both given; "
                             "drop one of them")
        return [MockGPTDataset(name, size, tokenizer.vocab_size, settings) if size > 0 else None
                for name, size in zip(SPLIT_NAMES, sizes)]
    if any(per_split):
        if data_cfg.data_path:
            raise ConfigError("--data-path and --train/valid/test-data-path were both given; use "
                             "--data-path with --split, or the per-split paths")
        datasets = []
        for i, (paths, flag) in enumerate(zip(per_split, ("--train-data-path", "--valid-data-path",
                                                          "--test-data-path"))):
            if not paths:
                datasets.append(None)
                continue
            only = [None, None, None]
            only[i] = (0.0, 1.0)
            sizes_i = [0, 0, 0]
            sizes_i[i] = sizes[i]
            datasets.append(_blend_splits(paths, flag, only, "", sizes_i, settings)[i])
        return datasets
    paths = data_cfg.data_path
    if not paths:
        if data_cfg.tokenizer_type == "NullTokenizer":
            raise ValueError("NullTokenizer cannot tokenize the default text corpus; pass "
                             "--mock-data or --data-path")
        paths = [default_corpus_prefix(tokenizer, data_cfg.data_cache_path)]
    return _blend_splits(paths, "--data-path", split_matrix(data_cfg.split),
                         f" by --split {data_cfg.split}", sizes, settings)


def summary_lines(datasets: Sequence) -> List[str]:
    """One line per split of [train, valid, test] datasets: its documents and tokens (one pass
    over the split's documents, summed over a blend's datasets) and the samples it holds, e.g.
    `train: 9690 documents, 4126433 tokens, 64000 samples of 1025 tokens from 2 datasets`."""
    lines = []
    for name, dataset in zip(SPLIT_NAMES, datasets):
        if dataset is None:
            lines.append(f"{name}: no data")
            continue
        if isinstance(dataset, MockGPTDataset):
            lines.append(f"{name}: {len(dataset)} samples of {dataset.settings.seq_length + 1} random tokens "
                         f"(--mock-data)")
            continue
        parts = dataset.datasets if isinstance(dataset, BlendedDataset) else [dataset]
        documents = sum(d.description["documents"][1] - d.description["documents"][0] for d in parts)
        tokens = sum(d.tokens_per_epoch for d in parts)
        source = f"from {len(parts)} datasets" if len(parts) > 1 else f"of {parts[0].indexed.path_prefix}"
        lines.append(f"{name}: {documents} documents, {tokens} tokens, {len(dataset)} samples of "
                     f"{parts[0].settings.seq_length + 1} tokens {source}")
    return lines
