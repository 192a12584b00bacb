"""build_data_iterators: Megatron's DP slicing of each global batch, and exact resume."""

import dataclasses

import pytest
import torch

from megatron_lite.config import DataConfig
from megatron_lite.data import build_data_iterators, build_tokenizer

SEQ = 16


@pytest.fixture(params=["mock", "corpus"])
def data_cfg(request, tmp_path_factory):
    # One cache directory per source for the whole module: the corpus is tokenized once.
    cache = tmp_path_factory.getbasetemp() / "iterator_cache"
    return DataConfig(mock_data=request.param == "mock", data_cache_path=str(cache))


def iterators(cfg, *, dp_rank=0, dp_size=1, mbs=1, gbs=None, consumed=0, consumed_valid=0,
              train_samples=96, eval_samples=48):
    return build_data_iterators(
        cfg, build_tokenizer(cfg), seq_length=SEQ, micro_batch_size=mbs,
        global_batch_size=gbs or mbs * dp_size, dp_rank=dp_rank, dp_size=dp_size, seed=7,
        train_samples=train_samples, eval_samples=eval_samples, test_samples=0,
        consumed_train_samples=consumed, consumed_valid_samples=consumed_valid)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_each_rank_gets_its_slice_of_every_microbatch_step(data_cfg):
    train, valid, test = iterators(data_cfg)
    assert test is None
    samples = torch.cat([b["tokens"] for b in take(train, 48)])        # sample i, in order
    mbs, dp, gbs = 2, 3, 12
    per_rank = [take(iterators(data_cfg, dp_rank=r, dp_size=dp, mbs=mbs, gbs=gbs)[0], 8)
                for r in range(dp)]
    for step in range(8):
        for r in range(dp):
            first = step * mbs * dp + r * mbs
            assert torch.equal(per_rank[r][step]["tokens"], samples[first:first + mbs])
    # so global batch k is samples [k * gbs, (k + 1) * gbs), spread over the ranks
    for k in range(2):
        steps = range(k * gbs // (mbs * dp), (k + 1) * gbs // (mbs * dp))
        batch = torch.cat([per_rank[r][s]["tokens"] for s in steps for r in range(dp)])
        assert torch.equal(batch, samples[k * gbs:(k + 1) * gbs])


@pytest.mark.parametrize("dataloader_type", ["single", "cyclic"])
def test_restart_from_consumed_samples_sees_the_uninterrupted_batches(data_cfg, dataloader_type):
    cfg = dataclasses.replace(data_cfg, dataloader_type=dataloader_type)
    mbs, dp, gbs, consumed = 2, 2, 8, 24                  # restart after 3 global batches
    for rank in range(dp):
        train, valid, _ = iterators(cfg, dp_rank=rank, dp_size=dp, mbs=mbs, gbs=gbs)
        uninterrupted = take(train, 12)
        valid_uninterrupted = take(valid, 6)
        train, valid, _ = iterators(cfg, dp_rank=rank, dp_size=dp, mbs=mbs, gbs=gbs,
                                    consumed=consumed, consumed_valid=8)
        assert_same_batches(take(train, 6), uninterrupted[consumed // (mbs * dp):])
        assert_same_batches(take(valid, 4), valid_uninterrupted[2:])


def test_cyclic_loader_keeps_going_past_an_epoch_in_a_new_order():
    cfg = DataConfig(mock_data=True, dataloader_type="cyclic")
    train, _, _ = iterators(cfg, mbs=4, train_samples=16, eval_samples=0)
    epochs = [torch.cat([b["tokens"] for b in take(train, 4)]) for _ in range(3)]
    key = [sorted(e[:, 0].tolist()) for e in epochs]
    assert key[0] == key[1] == key[2]                    # same samples each epoch ...
    assert not torch.equal(epochs[0], epochs[1])         # ... in a different order


def test_single_loader_stops_at_the_end_of_the_split():
    train, _, _ = iterators(DataConfig(mock_data=True), mbs=4, train_samples=16, eval_samples=0)
    assert len(list(train)) == 4


def test_worker_processes_give_the_same_batches(tmp_path):
    cfg = DataConfig(data_cache_path=str(tmp_path), reset_attention_mask=True, reset_position_ids=True)
    in_process = take(iterators(cfg, mbs=2)[0], 5)
    with_workers = take(iterators(dataclasses.replace(cfg, num_workers=2), mbs=2)[0], 5)
    assert_same_batches(in_process, with_workers)
    assert in_process[0]["attention_mask"].shape == (2, 1, SEQ, SEQ)
    assert in_process[0]["attention_mask"].dtype == torch.bool


def test_batch_layout():
    batch = next(iterators(DataConfig(mock_data=True), mbs=3)[0])
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "tokens": ((3, SEQ), torch.int64), "labels": ((3, SEQ), torch.int64),
        "loss_mask": ((3, SEQ), torch.float32), "position_ids": ((3, SEQ), torch.int64)}
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(mbs=2, dp_size=2, gbs=6), "not a multiple of --micro-batch-size 2"),
    (dict(mbs=2, dp_size=2, gbs=8, consumed=6), "consumed_samples=6 is not a multiple"),
    (dict(mbs=2, consumed=200), "past the end of the dataset"),
])
def test_bad_batch_layouts_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        iterators(DataConfig(mock_data=True), **kwargs)


def test_too_little_training_data_is_an_error(make_dataset, tmp_path):
    prefix = make_dataset("small", [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] * 8)
    cfg = DataConfig(train_data_path=[prefix, prefix], data_cache_path=str(tmp_path))
    with pytest.raises(ValueError, match="has 8 samples of 17 tokens but 96 are needed"):
        iterators(cfg)


def test_mock_data_and_a_data_path_cannot_both_be_given(make_dataset):
    cfg = DataConfig(mock_data=True, data_path=[make_dataset("d", [[1, 2, 3]])])
    with pytest.raises(ValueError, match="drop one of them"):
        iterators(cfg)
