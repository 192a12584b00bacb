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
"""

from __future__ import annotations

import logging
import math
import re
from typing import List, Optional, Sequence, Tuple

from megatron_lite.data.blended_dataset import BlendedDataset, normalize
from megatron_lite.data.default_corpus import default_corpus_prefix
from megatron_lite.data.gpt_dataset import SPLIT_NAMES, GPTDataset, GPTDatasetSettings, MockGPTDataset
from megatron_lite.data.indexed_dataset import IndexedDataset

logger = logging.getLogger(__name__)

MID_LEVEL_SURPLUS = 0.005
SplitMatrix = List[Optional[Tuple[float, float]]]


def parse_split(split: str) -> SplitMatrix:
    """'969,30,1' -> [(0, 0.969), (0.969, 0.999), (0.999, 1.0)]; a zero share gives None."""
    try:
        shares = [float(x) for x in re.split(r"[,/]", split)]
    except ValueError:
        raise ValueError(f"--split {split!r} must be up to three comma-separated numbers, "
                         f"e.g. 969,30,1") from None
    if not 1 <= len(shares) <= 3 or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"--split {split!r} must be up to three non-negative numbers with a "
                         f"positive sum, e.g. 969,30,1")
    shares += [0.0] * (3 - len(shares))
    shares = normalize(shares)
    bounds = [0.0]
    for share in shares:
        bounds.append(bounds[-1] + share)
    return [(lo, hi) if hi > lo else None for lo, hi in zip(bounds[:-1], bounds[1:])]


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


def _document_splits(prefix: str, split: SplitMatrix, sizes: Sequence[Optional[int]],
                     settings: GPTDatasetSettings) -> List[Optional[GPTDataset]]:
    """One GPTDataset per split of `prefix`'s documents; None where the split is empty."""
    indexed = IndexedDataset(prefix)
    count = len(indexed)
    datasets = []
    for name, bounds, size in zip(SPLIT_NAMES, split, sizes):
        first, last = (0, 0) if bounds is None else (int(round(bounds[0] * count)),
                                                     int(round(bounds[1] * count)))
        if last <= first or size == 0:
            datasets.append(None)
            continue
        datasets.append(GPTDataset(indexed, name, first, last, size, settings))
    return datasets


def _blend_splits(paths: Sequence[str], flag: str, split: SplitMatrix, sizes: Sequence[int],
                  settings: GPTDatasetSettings) -> list:
    prefixes, weights = parse_blend(paths, flag)
    if len(prefixes) == 1 and weights is None:
        return _document_splits(prefixes[0], split, sizes, settings)
    if weights is not None:
        if min(weights) <= 0:
            raise ValueError(f"{flag} has a weight of {min(weights)}; weights must be positive "
                             f"(leave out a dataset instead of weighting it 0)")
        weights = normalize(weights)
        targets = [[math.ceil(size * w) for size in sizes] for w in weights]
        requests = [[math.ceil(t * (1 + MID_LEVEL_SURPLUS)) for t in row] for row in targets]
    else:
        requests = [[None if size else 0 for size in sizes] for _ in prefixes]
    parts = [_document_splits(p, split, r, settings) for p, r in zip(prefixes, requests)]
    blends = []
    for i, (name, size) in enumerate(zip(SPLIT_NAMES, sizes)):
        datasets = [per_prefix[i] for per_prefix in parts]
        if size == 0 or all(d is None for d in datasets):
            blends.append(None)
            continue
        if any(d is None for d in datasets):
            empty = [p for p, d in zip(prefixes, datasets) if d is None]
            raise ValueError(f"the {name} split of {empty} is empty but other datasets of the blend "
                             f"{flag} have one; change --split or the blend")
        if weights is not None:
            blends.append(BlendedDataset(datasets, weights, sum(t[i] for t in targets),
                                         settings.cache_dir))
        else:
            lengths = [len(d) for d in datasets]
            blends.append(BlendedDataset(datasets, lengths, min(size, sum(lengths)),
                                         settings.cache_dir))
    return blends


def build_gpt_datasets(data_cfg, tokenizer, settings: GPTDatasetSettings,
                       sizes: Sequence[int]) -> list:
    """[train, valid, test] datasets of at least the given sizes (None where a split is empty)."""
    per_split = [data_cfg.train_data_path, data_cfg.valid_data_path, data_cfg.test_data_path]
    if data_cfg.mock_data:
        if data_cfg.data_path or any(per_split):
            raise ValueError("--mock-data and --data-path/--train-data-path were both given; "
                             "drop one of them")
        return [MockGPTDataset(name, size, tokenizer.vocab_size, settings) if size > 0 else None
                for name, size in zip(SPLIT_NAMES, sizes)]
    if any(per_split):
        if data_cfg.data_path:
            raise ValueError("--data-path and --train/valid/test-data-path were both given; use "
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
            datasets.append(_blend_splits(paths, flag, only, sizes_i, settings)[i])
        return datasets
    paths = data_cfg.data_path
    if not paths:
        if data_cfg.tokenizer_type == "NullTokenizer":
            raise ValueError("NullTokenizer cannot tokenize the default text corpus; pass "
                             "--mock-data or --data-path")
        paths = [default_corpus_prefix(tokenizer, data_cfg.data_cache_path)]
        logger.info("no data flags: using the default corpus %s", paths[0])
    return _blend_splits(paths, "--data-path", parse_split(data_cfg.split), sizes, settings)
