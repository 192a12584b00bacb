"""Data and tokenizer flags with Megatron-LM's meaning: TikTokenizer, the SentencePiece tokenizers,
--no-mmap-bin-files, --no-create-attention-mask-in-dataloader, the loader flags, the one-line
errors for missing files and empty splits, and the per-split dataset summary."""

import base64
import dataclasses
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from megatron_lite.arguments import ConfigError, parse_args, validate
from megatron_lite.config import DataConfig
from megatron_lite.data import build_data_iterators, build_tokenizer
from megatron_lite.data.blended_dataset import BlendedDataset
from megatron_lite.data.builder import build_gpt_datasets, split_matrix, summary_lines
from megatron_lite.data.gpt_dataset import GPTDataset, GPTDatasetSettings
from megatron_lite.data.indexed_dataset import IndexedDataset

from .conftest import random_documents

EOD = 300
SEQ = 8
BASE = ["--train-iters", "10"]


def settings(cache_dir, **flags):
    return GPTDatasetSettings(seq_length=SEQ, seed=1, eod=EOD, cache_dir=str(cache_dir),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, **flags)


# --- TikTokenizer -------------------------------------------------------------------------------

MERGES = [b"ab", b"abc", b"oW", b" a"]


def write_tiktoken_vocab(path, merges=MERGES):
    """A Megatron tiktoken .json: the 256 bytes, then the merges, each {rank, token_bytes, token_str}."""
    tokens = [bytes([i]) for i in range(256)] + list(merges)
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode("ascii"),
                "token_str": t.decode("utf-8", errors="replace")} for i, t in enumerate(tokens)]
    path.write_text(json.dumps(entries))
    return str(path)


def tiktokenizer(tmp_path, special=10, vocab_size=None, **flags):
    cfg = DataConfig(tokenizer_type="TikTokenizer", tokenizer_model=write_tiktoken_vocab(tmp_path / "vocab.json"),
                     tiktoken_num_special_tokens=special, **flags)
    return build_tokenizer(cfg, vocab_size or special + 256 + len(MERGES))


def test_tiktokenizer_ids_are_vocabulary_ranks_shifted_by_the_special_tokens(tmp_path):
    tok = tiktokenizer(tmp_path, tiktoken_pattern="v2")
    s = 10
    assert (tok.vocab_size, tok.unk, tok.bos, tok.eos, tok.eod, tok.pad) == (s + 260, 0, 1, 2, 2, None)
    # "ab abc" splits into "ab" and " abc"; " abc" merges a+b (rank 256) then ab+c (rank 257).
    assert tok.tokenize("ab abc") == [256 + s, ord(" ") + s, 257 + s]
    assert tok.tokenize(" ab") == [ord(" ") + s, 256 + s]       # "ab" (rank 256) merges before " a" (259)
    assert tok.tokenize(" ax") == [259 + s, ord("x") + s]
    assert tok.tokenize("<s>") == [ord(c) + s for c in "<s>"]   # special-token text is ordinary text
    for text in ["Hello world", "Größe — 日本語", "tabs\tand\n\nnewlines", ""]:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.detokenize([tok.bos]) == "<s>"


def test_tiktoken_patterns_v1_and_v2_split_text_as_megatrons(tmp_path):
    s = 10
    assert tiktokenizer(tmp_path, tiktoken_pattern="v1").tokenize("oW") == [258 + s]     # one letter run
    assert tiktokenizer(tmp_path, tiktoken_pattern="v2").tokenize("oW") == [ord("o") + s, ord("W") + s]
    assert tiktokenizer(tmp_path).tokenize("oW") == [ord("o") + s, ord("W") + s]         # v2 by default


def test_tiktoken_vocab_size_keeps_only_the_first_ranks(tmp_path):
    tok = tiktokenizer(tmp_path, vocab_size=10 + 257)                # the bytes and "ab" only
    assert tok.vocab_size == 267
    assert tok.tokenize("abc") == [256 + 10, ord("c") + 10]


def test_tiktoken_special_tokens_take_the_first_ids(tmp_path):
    tok = tiktokenizer(tmp_path, special=5, tokenizer_special_tokens=["<s>", "</s>", "<unk>", "<pad>"])
    assert (tok.bos, tok.eos, tok.unk, tok.pad, tok.eod) == (0, 1, 2, 3, 1)
    assert tok.detokenize([0, 4, ord("a") + 5]) == "<s><SPECIAL_4>a"


def test_tiktoken_vocabulary_smaller_than_the_vocab_size_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        tiktokenizer(tmp_path, vocab_size=1000)
    assert str(e.value) == (
        f"--tokenizer-model {tmp_path / 'vocab.json'} holds 260 tokens but the vocabulary needs 990 (--vocab-size "
        f"minus --tiktoken-num-special-tokens); pass a --vocab-size of at most 260 + --tiktoken-num-special-tokens")


@pytest.mark.parametrize("flags, message", [
    (["--tokenizer-type", "TikTokenizer"],
     "--tokenizer-type TikTokenizer needs --tokenizer-model (a tiktoken vocabulary .json)"),
    (["--tokenizer-type", "GPTSentencePieceTokenizer"],
     "--tokenizer-type GPTSentencePieceTokenizer needs --tokenizer-model (a SentencePiece .model)"),
    (["--tokenizer-type", "Llama2Tokenizer"],
     "--tokenizer-type Llama2Tokenizer needs --tokenizer-model (a SentencePiece .model)"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "vocab.json"],
     "--tokenizer-type GPT2BPETokenizer needs --vocab-file (vocab.json) and --merge-file (merges.txt)"),
    (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "v.json", "--tokenizer-special-tokens", "<s>", "</s>"],
     "--tokenizer-special-tokens must include <unk> <s> </s> for TikTokenizer; add <unk>"),
    (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", "v.json", "--tiktoken-num-special-tokens", "2"],
     "--tiktoken-num-special-tokens 2 must be at least the 3 special tokens and below the vocabulary size "
     "131072 (--vocab-size)"),
])
def test_a_tokenizer_without_its_files_is_a_config_error(flags, message):
    with pytest.raises(ConfigError) as e:
        validate(parse_args(BASE + flags), world_size=1)
    assert str(e.value) == message


# --- SentencePiece ------------------------------------------------------------------------------

LINES = ["the quick brown fox jumps over the lazy dog", "a lazy dog sleeps in the sun",
         "the fox and the dog are friends", "brown dogs and quick foxes run over hills"] * 5


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """A small BPE SentencePiece model trained here (unk 0, bos 1, eos 2, no pad)."""
    spm = pytest.importorskip("sentencepiece")
    prefix = str(tmp_path_factory.mktemp("spm") / "tiny")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES), model_prefix=prefix, vocab_size=60,
                                   model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2)
    return spm.SentencePieceProcessor(model_file=prefix + ".model"), prefix + ".model"


@pytest.mark.parametrize("kind, bos_first", [("GPTSentencePieceTokenizer", False), ("Llama2Tokenizer", True)])
def test_sentencepiece_tokenizers_follow_megatron(sentencepiece_model, kind, bos_first):
    reference, path = sentencepiece_model
    tok = build_tokenizer(DataConfig(tokenizer_type=kind, tokenizer_model=path))
    assert tok.vocab_size == reference.get_piece_size()
    assert (tok.bos, tok.eos, tok.eod, tok.pad) == (1, 2, 2, -1)
    for text in LINES[:4]:
        ids = reference.encode_as_ids(text)
        assert tok.tokenize(text) == ([1] + ids if bos_first else ids)
        assert tok.detokenize(tok.tokenize(text) + [tok.eod]) == text


# --- data-loader flags --------------------------------------------------------------------------

def iterators(cfg, train_samples=24, eval_samples=8, test_samples=0, mbs=2):
    return build_data_iterators(cfg, build_tokenizer(cfg), seq_length=SEQ, micro_batch_size=mbs,
                                global_batch_size=mbs, dp_rank=0, dp_size=1, seed=3, train_samples=train_samples,
                                eval_samples=eval_samples, test_samples=test_samples)


@pytest.fixture
def byte_data(make_dataset, tmp_path):
    """Byte-level documents ending in eod (256), and a DataConfig reading them."""
    docs = [list(rng_doc) + [256] for rng_doc in random_documents(4, 40, vocab=256, max_len=12) if rng_doc]
    prefix = make_dataset("bytes", docs)
    return DataConfig(data_path=[prefix], split="80,20,0", data_cache_path=str(tmp_path / "cache")), docs


def batches(iterator, n=6):
    return [next(iterator) for _ in range(n)]


def test_no_mmap_bin_files_reads_the_same_bytes_with_file_reads(make_dataset, tmp_path, byte_data):
    prefix = make_dataset("d", random_documents(3, 30, eod=EOD))
    mapped, read = IndexedDataset(prefix), IndexedDataset(prefix, mmap=False)
    assert read._data is None and isinstance(mapped._data, np.memmap)
    for i in range(len(mapped)):
        np.testing.assert_array_equal(read[i], mapped[i])
        if len(mapped[i]) > 2:
            np.testing.assert_array_equal(read.get(i, 1, 2), mapped.get(i, 1, 2))
    assert pickle.loads(pickle.dumps(read)).mmap is False                 # kept in loader workers
    cfg, _ = byte_data
    with_mmap = batches(iterators(cfg)[0])
    without = batches(iterators(dataclasses.replace(cfg, mmap_bin_files=False))[0])
    for a, b in zip(with_mmap, without):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_create_attention_mask_in_dataloader_leaves_the_mask_out(byte_data):
    cfg, _ = byte_data
    cfg = dataclasses.replace(cfg, reset_attention_mask=True)
    assert batches(iterators(cfg)[0], 1)[0]["attention_mask"].shape == (2, 1, SEQ, SEQ)
    without = batches(iterators(dataclasses.replace(cfg, create_attention_mask_in_dataloader=False))[0], 1)[0]
    assert sorted(without) == ["labels", "loss_mask", "position_ids", "tokens"]


def test_reset_position_ids_and_eod_mask_loss_reach_the_batches(byte_data):
    cfg, _ = byte_data
    batch = batches(iterators(dataclasses.replace(cfg, reset_position_ids=True, eod_mask_loss=True))[0], 1)[0]
    tokens = batch["tokens"]
    for row in range(tokens.shape[0]):
        expected, position = [], 0
        for t in tokens[row].tolist():
            expected.append(position)
            position = 0 if t == 256 else position + 1
        assert batch["position_ids"][row].tolist() == expected
    assert torch.equal(batch["loss_mask"], (tokens != 256).float())
    assert (tokens == 256).any()


def test_data_cache_path_num_workers_and_dataloader_type_are_used(byte_data, tmp_path):
    cfg, _ = byte_data
    train = iterators(dataclasses.replace(cfg, num_workers=2))[0]
    assert train._num_workers == 2
    assert len(os.listdir(tmp_path / "cache" / "gpt_indices")) == 2 * 4 + 1   # train, valid: 3 arrays + json; lock
    single = iterators(cfg)
    steps = len(single.datasets[0]) // 2                                # one pass over the split
    in_order = torch.cat([b["tokens"] for b in batches(single[0], steps)])
    shuffled = torch.cat([b["tokens"] for b in batches(iterators(dataclasses.replace(
        cfg, dataloader_type="cyclic"))[0], steps)])
    assert sorted(in_order.tolist()) == sorted(shuffled.tolist()) and not torch.equal(in_order, shuffled)


# --- splits, missing files, empty splits --------------------------------------------------------

def test_split_is_read_by_validations_parser():
    assert split_matrix("'99,1,0'") == split_matrix("99,1,0") == split_matrix("99/1/0")
    np.testing.assert_allclose(split_matrix("99,1")[:2], [(0, 0.99), (0.99, 1.0)])
    assert split_matrix("99,1")[2] is None


def test_a_missing_bin_or_idx_file_names_the_prefix_and_the_file(make_dataset, tmp_path):
    prefix = make_dataset("d", random_documents(1, 10, eod=EOD))
    os.remove(prefix + ".bin")
    with pytest.raises(ConfigError) as e:
        build_gpt_datasets(DataConfig(data_path=[prefix]), None, settings(tmp_path), [4, 0, 0])
    assert str(e.value) == (f"--data-path {prefix}: {prefix}.bin not found; pass the path prefix shared by the "
                            f".bin and .idx files written by tools/preprocess_data.py")
    with pytest.raises(ConfigError) as e:
        build_gpt_datasets(DataConfig(train_data_path=["1", prefix + "x"]), None, settings(tmp_path), [4, 0, 0])
    assert str(e.value).startswith(f"--train-data-path {prefix}x: {prefix}x.bin and {prefix}x.idx not found;")
    good = make_dataset("good", random_documents(1, 10, eod=EOD))
    with pytest.raises(ConfigError) as e:
        build_gpt_datasets(DataConfig(data_path=[good + ".bin"]), None, settings(tmp_path), [4, 0, 0])
    assert str(e.value) == f"--data-path {good}.bin: pass the prefix without the .bin extension (--data-path {good})"


def test_a_requested_split_without_samples_is_a_config_error(make_dataset, tmp_path):
    prefix = make_dataset("ten", [[1, 2, EOD]] * 10)
    cfg = DataConfig(data_path=[prefix], split="969,30,1")     # valid: documents round(9.69) to round(9.99)
    with pytest.raises(ConfigError) as e:
        build_gpt_datasets(cfg, None, settings(tmp_path), [4, 4, 0])
    assert str(e.value) == (f"--data-path: the valid split of {prefix} (documents 10 to 10 of 10 by --split "
                            f"969,30,1) holds 0 tokens, too few for a sample; change --split or add data")


def test_a_weighted_blend_member_without_samples_in_a_split_is_a_config_error(make_dataset, tmp_path):
    big = make_dataset("big", random_documents(2, 100, eod=EOD))
    small = make_dataset("small", [[1, 2, EOD]] * 10)
    cfg = DataConfig(data_path=["0.5", big, "0.5", small], split="969,30,1")
    with pytest.raises(ConfigError) as e:
        build_gpt_datasets(cfg, None, settings(tmp_path), [4, 4, 0])
    assert str(e.value).startswith(f"--data-path: the valid split of {small} (documents 10 to 10 of 10 by")


def test_an_unweighted_blend_member_without_samples_drops_out_of_that_split(make_dataset, tmp_path):
    big = make_dataset("big", random_documents(2, 100, eod=EOD))
    small = make_dataset("small", [[1, 2, EOD]] * 10)
    train, valid, _ = build_gpt_datasets(DataConfig(data_path=[big, small], split="969,30,1"), None,
                                         settings(tmp_path), [4, 4, 0])
    assert [d.indexed.path_prefix for d in train.datasets] == [big, small]
    assert [d.indexed.path_prefix for d in valid.datasets] == [big]


def test_a_split_with_no_share_is_not_built_even_when_requested(make_dataset, tmp_path):
    prefix = make_dataset("d", random_documents(2, 50, eod=EOD))
    train, valid, test = build_gpt_datasets(DataConfig(data_path=[prefix], split="100,0,0"), None,
                                            settings(tmp_path), [4, 4, 4])
    assert isinstance(train, GPTDataset) and valid is None and test is None


# --- summary ------------------------------------------------------------------------------------

def read_idx(prefix):
    """Sequence lengths straight from the .idx bytes."""
    raw = open(prefix + ".idx", "rb").read()
    count = struct.unpack("<Q", raw[18:26])[0]
    return np.frombuffer(raw, np.int32, count, 34)


def test_summary_lines_count_the_documents_tokens_and_samples_of_each_split(make_dataset, tmp_path):
    a = make_dataset("a", random_documents(5, 40, eod=EOD))
    b = make_dataset("b", random_documents(6, 20, eod=EOD))
    single = build_gpt_datasets(DataConfig(data_path=[a], split="3,1,0"), None, settings(tmp_path), [50, 10, 0])
    lengths = read_idx(a)
    n = len(lengths)
    cut = round(0.75 * n)
    assert summary_lines(single) == [
        f"train: {cut} documents, {lengths[:cut].sum()} tokens, {len(single[0])} samples of 9 tokens of {a}",
        f"valid: {n - cut} documents, {lengths[cut:].sum()} tokens, {len(single[1])} samples of 9 tokens of {a}",
        "test: no data"]
    assert len(single[0]) >= 50 and len(single[1]) >= 10
    blend = build_gpt_datasets(DataConfig(train_data_path=["0.4", a, "0.6", b]), None, settings(tmp_path),
                               [30, 0, 0])
    total = len(read_idx(a)) + len(read_idx(b))
    assert isinstance(blend[0], BlendedDataset) and len(blend[0]) == 30
    assert summary_lines(blend)[0] == (f"train: {total} documents, {read_idx(a).sum() + read_idx(b).sum()} "
                                       f"tokens, 30 samples of 9 tokens from 2 datasets")
    mock = build_data_iterators(DataConfig(mock_data=True), build_tokenizer(DataConfig()), seq_length=SEQ,
                                micro_batch_size=1, global_batch_size=1, dp_rank=0, dp_size=1, seed=1,
                                train_samples=6, eval_samples=0, test_samples=0)
    assert summary_lines(mock.datasets) == ["train: 6 samples of 9 random tokens (--mock-data)",
                                            "valid: no data", "test: no data"]
