"""The GPT sample index and the blending indices: C++ helper, with numpy versions as fallback.

`csrc/helpers.cpp` (built by setup.py as `megatron_lite.data.helpers_cpp`) is used when it is
importable; otherwise the numpy functions below, which give identical arrays, are used and
one warning says so.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np

try:
    from megatron_lite.data import helpers_cpp
except ImportError:
    helpers_cpp = None

_warned = False


def _use_cpp() -> bool:
    global _warned
    if helpers_cpp is None and not _warned:
        warnings.warn("megatron_lite.data.helpers_cpp is not built; building dataset indices with "
                      "the slower numpy fallback (build it with `pip install -e .`)", stacklevel=3)
        _warned = True
    return helpers_cpp is not None


def sample_idx_dtype(sizes: np.ndarray, document_index: np.ndarray) -> type:
    """int32 when every document position and token offset fits, else int64 (as Megatron)."""
    largest = max(len(document_index), int(sizes.max()) if len(sizes) else 0)
    return np.int32 if largest <= np.iinfo(np.int32).max else np.int64


def build_sample_idx(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                     num_epochs: int, tokens_per_epoch: int) -> np.ndarray:
    """Where each sample starts: row i is (position in document_index, token offset in it).

    The documents are read in `document_index` order as one token stream; sample i is the
    seq_length + 1 tokens from stream position i * seq_length, so consecutive samples share
    one token (the last label of one is the first input of the next). Row i gives where
    sample i starts and row i + 1 where it ends (inclusive); there are
    (num_epochs * tokens_per_epoch - 1) // seq_length samples, the partial last one dropped.
    """
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    document_index = np.ascontiguousarray(document_index, dtype=np.int32)
    dtype = sample_idx_dtype(sizes, document_index)
    if _use_cpp():
        build = helpers_cpp.build_sample_idx_int32 if dtype == np.int32 else \
            helpers_cpp.build_sample_idx_int64
        return build(sizes, document_index, seq_length, num_epochs, tokens_per_epoch)
    return build_sample_idx_numpy(sizes, document_index, seq_length, num_epochs, tokens_per_epoch)


def build_sample_idx_numpy(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                           num_epochs: int, tokens_per_epoch: int) -> np.ndarray:
    """numpy version of build_sample_idx: locate each start in the cumulative document lengths.

    Sample 0 starts at (0, 0); sample i >= 1 starts at stream position p = i * seq_length, in
    the document k with cum[k] <= p < cum[k + 1] (searching from the right skips empty
    documents, as the C++ loop does), at offset p - cum[k].
    """
    if seq_length < 1 or num_epochs < 1 or tokens_per_epoch < 2:
        raise ValueError("build_sample_idx needs seq_length >= 1, num_epochs >= 1 and "
                         "tokens_per_epoch >= 2")
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    cumulative = np.zeros(len(document_index) + 1, dtype=np.int64)
    np.cumsum(sizes[document_index], dtype=np.int64, out=cumulative[1:])
    starts = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    if num_samples and starts[-1] >= cumulative[-1]:
        raise ValueError("build_sample_idx: the documents hold fewer than num_epochs * "
                         "tokens_per_epoch tokens")
    document = np.searchsorted(cumulative, starts, side="right") - 1
    sample_idx = np.zeros((num_samples + 1, 2), dtype=sample_idx_dtype(sizes, document_index))
    sample_idx[1:, 0] = document
    sample_idx[1:, 1] = starts - cumulative[document]
    return sample_idx


def build_blending_indices(weights: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """For each of `size` blended samples, its dataset (int16) and its sample in that dataset.

    Greedy, as Megatron: sample i goes to the dataset whose share falls furthest behind,
    argmax_d (weights[d] * max(i, 1) - taken[d]), the first such dataset on ties; so after any
    prefix of n samples each dataset has contributed within one sample of weights[d] * n.
    """
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if _use_cpp():
        return helpers_cpp.build_blending_indices(weights, size)
    return build_blending_indices_numpy(weights, size)


def build_blending_indices_numpy(weights: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pure-Python version of build_blending_indices (the greedy choice is sequential)."""
    if not 1 <= len(weights) <= 32767 or size < 0:
        raise ValueError("build_blending_indices needs 1 to 32767 weights and size >= 0")
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for sample in range(size):
        position = float(sample) if sample > 0 else 1.0
        chosen, max_error = 0, w[0] * position - counts[0]
        for d in range(1, len(w)):
            error = w[d] * position - counts[d]
            if error > max_error:
                chosen, max_error = d, error
        dataset_index[sample] = chosen
        dataset_sample_index[sample] = counts[chosen]
        counts[chosen] += 1
    return dataset_index, dataset_sample_index
