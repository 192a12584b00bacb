"""The C++ index helper against its numpy fallback, and the blending guarantee."""

import warnings

import numpy as np
import pytest

from megatron_lite.data import helpers
from megatron_lite.data.helpers import (build_blending_indices, build_blending_indices_numpy,
                                        build_sample_idx, build_sample_idx_numpy)

helpers_cpp = pytest.importorskip(
    "megatron_lite.data.helpers_cpp",
    reason="the C++ helper is not built; run `pip install --no-build-isolation -e .`")


def random_sample_index_inputs(rng):
    num_docs = int(rng.integers(1, 60))
    sizes = rng.integers(0, 50, num_docs).astype(np.int32)
    sizes[rng.integers(0, num_docs)] += 2                 # at least two tokens in all
    epochs = int(rng.integers(1, 4))
    document_index = np.tile(np.arange(num_docs, dtype=np.int32), epochs)
    rng.shuffle(document_index)
    seq_length = int(rng.integers(1, 70))
    return sizes, document_index, seq_length, epochs, int(sizes.sum())


def test_helper_and_numpy_give_identical_sample_indices():
    rng = np.random.default_rng(0)
    for _ in range(300):
        args = random_sample_index_inputs(rng)
        cpp = helpers_cpp.build_sample_idx_int32(*args)
        ref = build_sample_idx_numpy(*args)
        assert cpp.dtype == ref.dtype == np.int32
        np.testing.assert_array_equal(cpp, ref)
        np.testing.assert_array_equal(helpers_cpp.build_sample_idx_int64(*args), ref.astype(np.int64))


def test_sample_index_starts_each_sample_seq_length_tokens_after_the_last():
    """Row i points at stream token i * seq_length, never at an empty document or past one."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        sizes, document_index, seq_length, epochs, tokens = random_sample_index_inputs(rng)
        sample_idx = build_sample_idx(sizes, document_index, seq_length, epochs, tokens)
        cumulative = np.concatenate([[0], np.cumsum(sizes[document_index])])
        assert len(sample_idx) - 1 == (epochs * tokens - 1) // seq_length
        for i, (doc, offset) in enumerate(sample_idx[1:], start=1):
            assert cumulative[doc] + offset == i * seq_length
            assert 0 <= offset < sizes[document_index[doc]]


def test_helper_and_numpy_give_identical_blending_indices():
    rng = np.random.default_rng(2)
    for _ in range(100):
        weights = rng.random(int(rng.integers(1, 9))) ** 2
        weights /= weights.sum()
        size = int(rng.integers(0, 2000))
        cpp = helpers_cpp.build_blending_indices(weights, size)
        ref = build_blending_indices_numpy(weights, size)
        for a, b in zip(cpp, ref):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def blend_counts(weights, size):
    dataset_index, dataset_sample_index = build_blending_indices(np.array(weights), size)
    taken = np.zeros((size, len(weights)))
    taken[np.arange(size), dataset_index] = 1
    counts = np.cumsum(taken, axis=0)                     # samples per dataset in each prefix
    for d in range(len(weights)):                         # each dataset is read in order
        np.testing.assert_array_equal(dataset_sample_index[dataset_index == d],
                                      np.arange(int(counts[-1, d])))
    return counts, np.arange(1, size + 1)[:, None] * np.array(weights)[None]


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.5, 0.5], [0.01, 0.99], [0.123, 0.877]])
def test_blending_of_two_datasets_is_within_one_sample_of_the_weights_in_every_prefix(weights):
    counts, shares = blend_counts(weights, 5000)
    assert np.abs(counts - shares).max() < 1


def test_blending_never_runs_a_full_sample_ahead_of_a_weight():
    """Any number of datasets: no prefix holds a full sample more than its share."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        weights = rng.random(int(rng.integers(2, 8)))
        weights = (weights / weights.sum()).tolist()
        counts, shares = blend_counts(weights, 3000)
        assert (counts - shares).max() < 1
        np.testing.assert_allclose(counts[-1] / 3000, weights, atol=2 / 3000)


def test_numpy_fallback_is_used_with_one_warning(monkeypatch):
    monkeypatch.setattr(helpers, "helpers_cpp", None)
    monkeypatch.setattr(helpers, "_warned", False)
    args = random_sample_index_inputs(np.random.default_rng(4))
    weights = np.array([0.2, 0.3, 0.5])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = [build_sample_idx(*args), build_blending_indices(weights, 100),
                    build_sample_idx(*args)]
    assert [str(w.message).split(";")[0] for w in caught] == [
        "megatron_lite.data.helpers_cpp is not built"]
    np.testing.assert_array_equal(fallback[0], helpers_cpp.build_sample_idx_int32(*args))
    for a, b in zip(fallback[1], helpers_cpp.build_blending_indices(weights, 100)):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments_are_rejected_by_both_implementations():
    sizes, document_index = np.array([1], dtype=np.int32), np.array([0], dtype=np.int32)
    with pytest.raises(ValueError, match="tokens_per_epoch >= 2"):
        helpers_cpp.build_sample_idx_int32(sizes, document_index, 4, 1, 1)
    with pytest.raises(ValueError, match="tokens_per_epoch >= 2"):
        build_sample_idx_numpy(sizes, document_index, 4, 1, 1)
    short = np.array([3], dtype=np.int32)                 # claims 10 tokens, holds 3
    with pytest.raises(ValueError, match="fewer than"):
        helpers_cpp.build_sample_idx_int32(short, document_index, 2, 1, 10)
    with pytest.raises(ValueError, match="fewer than"):
        build_sample_idx_numpy(short, document_index, 2, 1, 10)
