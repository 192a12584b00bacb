"""The corpus a run uses with no data flags, built once into the cache however many ranks start."""

import multiprocessing
import os

import numpy as np

from megatron_lite.data import build_tokenizer
from megatron_lite.config import DataConfig
from megatron_lite.data.cache import build_once
from megatron_lite.data.default_corpus import CORPUS_FILE, corpus_documents, default_corpus_prefix
from megatron_lite.data.indexed_dataset import IndexedDataset


def test_shipped_corpus_is_a_few_hundred_kilobytes_of_documents():
    documents = corpus_documents()
    assert len(documents) == 986
    assert 300_000 < os.path.getsize(CORPUS_FILE) < 1_000_000
    assert min(len(d) for d in documents) >= 150


def test_default_corpus_is_tokenized_with_eod_per_document(tmp_path):
    tokenizer = build_tokenizer(DataConfig())
    ds = IndexedDataset(default_corpus_prefix(tokenizer, str(tmp_path)))
    documents = corpus_documents()
    assert ds.num_documents == len(ds) == len(documents)
    for i in (0, 500, len(documents) - 1):
        assert ds[i][-1] == tokenizer.eod
        assert tokenizer.detokenize(ds[i].tolist()) == documents[i]


def _build_in_process(args):
    directory, log = args
    target = os.path.join(directory, "built.txt")

    def build():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        with open(target, "w") as f:
            f.write("done")

    build_once([target], build)
    return open(target).read()


def _default_prefix_in_process(cache):
    prefix = default_corpus_prefix(build_tokenizer(DataConfig()), cache)
    return prefix, IndexedDataset(prefix).sequence_lengths.tolist()


def test_ranks_starting_together_build_once(tmp_path):
    log = str(tmp_path / "builds.log")
    with multiprocessing.get_context("fork").Pool(6) as pool:
        results = pool.map(_build_in_process, [(str(tmp_path), log)] * 6)
        corpora = pool.map(_default_prefix_in_process, [str(tmp_path / "cache")] * 6)
    assert results == ["done"] * 6
    assert len(open(log).read().split()) == 1              # one process built, five waited
    assert len({prefix for prefix, _ in corpora}) == 1
    assert all(lengths == corpora[0][1] for _, lengths in corpora)
    assert not [f for f in os.listdir(os.path.dirname(corpora[0][0])) if f.endswith(".tmp")]
    assert np.sum(corpora[0][1]) > 300_000
