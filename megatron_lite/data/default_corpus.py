"""The data a run uses when it is given no data flags: a small corpus shipped in the package.

corpus/stdlib_docstrings.txt holds 986 documents (about 540 KB of English text): the
docstrings of modules, classes and functions of the Python 3.11 standard library (written
by the Python Software Foundation, under the PSF license), one document per docstring,
documents separated by a line holding only a form feed. On first use it is tokenized with
the run's tokenizer into the data cache directory; ranks that start together build it once
(see cache.build_once).
"""

from __future__ import annotations

import hashlib
import os
from typing import List

from megatron_lite.data import cache
from megatron_lite.data.indexed_dataset import bin_path, idx_path, optimal_dtype
from megatron_lite.data.preprocess import dataset_writer

CORPUS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus",
                           "stdlib_docstrings.txt")
DOCUMENT_SEPARATOR = "\n\f\n"


def corpus_documents() -> List[str]:
    with open(CORPUS_FILE, encoding="utf-8") as f:
        return [doc for doc in f.read().split(DOCUMENT_SEPARATOR) if doc.strip()]


def default_corpus_prefix(tokenizer, data_cache_path=None) -> str:
    """Path prefix of the default corpus tokenized by `tokenizer`, building it on first use.

    Each document ends with the tokenizer's eod token, as `--append-eod` preprocessing does.
    """
    with open(CORPUS_FILE, "rb") as f:
        corpus_hash = hashlib.md5(f.read()).hexdigest()
    key = cache.description_hash({"corpus": corpus_hash, "tokenizer": tokenizer.description})
    prefix = os.path.join(cache.cache_dir(data_cache_path), "default_corpus",
                          f"stdlib_docstrings-{key[:12]}_text_document")

    def build():
        with dataset_writer(prefix, optimal_dtype(tokenizer.vocab_size)) as builder:
            for text in corpus_documents():
                tokens = tokenizer.tokenize(text) + [tokenizer.eod]
                builder.add_document(tokens, [len(tokens)])

    cache.build_once([idx_path(prefix), bin_path(prefix)], build)
    return prefix
