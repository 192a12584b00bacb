"""GPT document/sample/shuffle indices, their cache, blends, splits and the sample fields."""

import os

import numpy as np
import pytest
import torch

from megatron_lite.config import DataConfig
from megatron_lite.data import gpt_dataset
from megatron_lite.data.blended_dataset import BlendedDataset
from megatron_lite.data.builder import build_gpt_datasets, parse_blend, split_matrix
from megatron_lite.data.gpt_dataset import GPTDataset, GPTDatasetSettings, gpt_sample
from megatron_lite.data.indexed_dataset import IndexedDataset

from .conftest import random_documents

EOD = 300


def settings(cache_dir, seq_length=16, seed=1234, **flags):
    return GPTDatasetSettings(seq_length=seq_length, seed=seed, eod=EOD, cache_dir=str(cache_dir),
                              reset_position_ids=flags.get("reset_position_ids", False),
                              reset_attention_mask=flags.get("reset_attention_mask", False),
                              eod_mask_loss=flags.get("eod_mask_loss", False))


def indices(dataset):
    return [np.array(a) for a in (dataset.document_index, dataset.sample_index, dataset.shuffle_index)]


def test_samples_are_windows_of_the_shuffled_document_stream(make_dataset, tmp_path):
    docs = random_documents(0, 40, eod=EOD)
    indexed = IndexedDataset(make_dataset("d", docs))
    sequences = [d for d in docs if d]                    # empty documents have no sequence
    ds = GPTDataset(indexed, "train", 5, 35, 200, settings(tmp_path / "cache"))
    stream = np.concatenate([sequences[d] for d in ds.document_index])
    assert set(np.array(ds.document_index)) <= set(range(5, 35))
    assert len(ds) >= 200
    assert sorted(np.array(ds.shuffle_index).tolist()) == list(range(len(ds)))
    for idx in range(len(ds)):
        j = int(ds.shuffle_index[idx])
        np.testing.assert_array_equal(ds.tokens(idx), stream[j * 16: j * 16 + 17])


def test_same_seed_rebuilds_identical_indices(make_dataset, tmp_path):
    indexed = IndexedDataset(make_dataset("d", random_documents(1, 50, eod=EOD)))
    n = len(indexed.sequence_lengths)
    first = GPTDataset(indexed, "train", 0, n, 300, settings(tmp_path / "a"))
    rebuilt = GPTDataset(indexed, "train", 0, n, 300, settings(tmp_path / "b"))
    for a, b in zip(indices(first), indices(rebuilt)):
        np.testing.assert_array_equal(a, b)
    other_seed = GPTDataset(indexed, "train", 0, n, 300, settings(tmp_path / "a", seed=99))
    assert not np.array_equal(indices(first)[2], indices(other_seed)[2])


def test_cached_indices_are_loaded_not_rebuilt(make_dataset, tmp_path, monkeypatch):
    indexed = IndexedDataset(make_dataset("d", random_documents(2, 30, eod=EOD)))
    built = GPTDataset(indexed, "valid", 0, 30, 100, settings(tmp_path))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached indices should have been loaded")

    monkeypatch.setattr(gpt_dataset, "build_sample_idx", no_rebuild)
    loaded = GPTDataset(indexed, "valid", 0, 30, 100, settings(tmp_path))
    for a, b in zip(indices(built), indices(loaded)):
        np.testing.assert_array_equal(a, b)
    assert len(os.listdir(tmp_path / "gpt_indices")) == 5   # 3 arrays, description, lock


@pytest.mark.parametrize("num_samples, separate", [(130, True), (190, False)])
def test_final_epoch_is_shuffled_separately_below_80_percent(make_dataset, tmp_path,
                                                             num_samples, separate):
    docs = [[1] * 15 + [EOD]] * 100                       # 1600 tokens: 99 samples per epoch
    indexed = IndexedDataset(make_dataset("d", docs))
    ds = GPTDataset(indexed, "train", 0, 100, num_samples, settings(tmp_path))
    document_index, sample_index, shuffle_index = indices(ds)
    assert len(document_index) == 200                     # two epochs
    halves_are_epochs = (sorted(document_index[:100]) == list(range(100))
                         and sorted(document_index[100:]) == list(range(100)))
    # 31 (or 91) samples come from the second epoch: below (or above) 0.8 * 99.
    samples_before_final = (1600 - 1) // 16
    first_part_is_closed = sorted(shuffle_index[:samples_before_final]) == list(range(samples_before_final))
    assert halves_are_epochs == separate
    assert first_part_is_closed == separate


def test_sample_fields_follow_the_documents(tmp_path):
    text = np.array([10, 11, EOD, 12, 13, 14, EOD, 15, 16])   # 8 inputs, 8 labels
    plain = gpt_sample(text, settings(tmp_path, seq_length=8))
    assert plain["tokens"].tolist() == text[:-1].tolist()
    assert plain["labels"].tolist() == text[1:].tolist()
    assert plain["position_ids"].tolist() == list(range(8))
    assert plain["loss_mask"].tolist() == [1.0] * 8 and "attention_mask" not in plain

    reset = gpt_sample(text, settings(tmp_path, seq_length=8, reset_position_ids=True,
                                      reset_attention_mask=True, eod_mask_loss=True))
    assert reset["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert reset["loss_mask"].tolist() == [1, 1, 0, 1, 1, 1, 0, 1]
    document = [0, 0, 0, 1, 1, 1, 1, 2]                   # an eod belongs to the document it ends
    expected = torch.tensor([[j > i or document[i] != document[j] for j in range(8)] for i in range(8)])
    assert reset["attention_mask"].dtype == torch.bool
    assert torch.equal(reset["attention_mask"][0], expected)


def test_split_strings_become_document_ranges():
    bounds = split_matrix("969,30,1")
    np.testing.assert_allclose(bounds, [(0, 0.969), (0.969, 0.999), (0.999, 1.0)])
    assert split_matrix("98,2") == [(0, 0.98), (0.98, 1.0), None]
    assert split_matrix("1,0,1") == [(0, 0.5), None, (0.5, 1.0)]
    with pytest.raises(ValueError, match="--split 'a,b'"):
        split_matrix("a,b")


def test_blend_flags_are_prefixes_or_weight_prefix_pairs():
    assert parse_blend(["a"], "--data-path") == (["a"], None)
    assert parse_blend(["a", "b"], "--data-path") == (["a", "b"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"], "--data-path") == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError, match="mixes weights and prefixes"):
        parse_blend(["0.3", "a", "b"], "--data-path")
    with pytest.raises(ValueError, match="--data-path has a weight of 0.0; weights must be positive"):
        build_gpt_datasets(DataConfig(data_path=["0", "a", "1", "b"]), None, settings("/unused"),
                           [10, 0, 0])


def test_weighted_blend_draws_each_dataset_in_proportion(make_dataset, tmp_path):
    a = make_dataset("a", random_documents(5, 60, eod=EOD))
    b = make_dataset("b", random_documents(6, 20, eod=EOD))
    cfg = DataConfig(data_path=["0.3", a, "0.7", b], split="90,10,0")
    train, valid, test = build_gpt_datasets(cfg, None, settings(tmp_path), [1000, 100, 0])
    assert isinstance(train, BlendedDataset) and test is None
    assert len(train) == 300 + 700 and len(valid) == 30 + 70
    counts = np.bincount(train.dataset_index, minlength=2)
    np.testing.assert_allclose(counts, [300, 700], atol=1)
    # Blend sample i is sample dataset_sample_index[i] of its dataset.
    i = int(np.flatnonzero(train.dataset_index == 1)[5])
    np.testing.assert_array_equal(train[i]["tokens"], train.datasets[1][5]["tokens"])


def test_per_split_paths_use_every_document(make_dataset, tmp_path):
    a = make_dataset("a", random_documents(7, 30, eod=EOD))
    b = make_dataset("b", random_documents(8, 10, eod=EOD))
    cfg = DataConfig(train_data_path=[a], valid_data_path=[a, b])
    train, valid, test = build_gpt_datasets(cfg, None, settings(tmp_path), [50, 40, 10])
    assert isinstance(train, GPTDataset) and test is None
    assert sorted(set(np.array(train.document_index))) == list(range(len(IndexedDataset(a))))
    assert isinstance(valid, BlendedDataset)              # unweighted: sized by the datasets
    lengths = [len(d) for d in valid.datasets]
    assert len(valid) == min(40, sum(lengths))


def test_an_empty_split_of_too_little_data_is_reported(make_dataset, tmp_path):
    prefix = make_dataset("tiny", [[1]] * 10)
    cfg = DataConfig(data_path=[prefix], split="90,10,0")
    with pytest.raises(ValueError, match="too few for a sample; change --split or add data"):
        build_gpt_datasets(cfg, None, settings(tmp_path), [10, 10, 0])


def test_a_split_beyond_the_documents_is_refused(make_dataset, tmp_path):
    indexed = IndexedDataset(make_dataset("d", random_documents(1, 10, eod=EOD)))
    n = len(indexed.sequence_lengths)
    with pytest.raises(ValueError, match=f"documents 0 to {n + 1} of .* which holds {n}"):
        GPTDataset(indexed, "train", 0, n + 1, 10, settings(tmp_path))
