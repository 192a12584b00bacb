"""Tokenize a JSON-lines file into Megatron indexed datasets (tools/preprocess_data.py).

Each line is a JSON object; for every key in `json_keys` its text becomes one document of
`{output_prefix}_{key}_document.bin/.idx` (Megatron's naming). Lines are tokenized by a
pool of worker processes; results come back in input order, so any number of workers
writes the same bytes. Output is written under temporary names and renamed only when the
whole file succeeded: a failure leaves nothing under the output prefix.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from multiprocessing import Pool
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from megatron_lite.data.cache import atomic_path
from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype
from megatron_lite.data.tokenizers import build_tokenizer


@dataclass
class PreprocessStats:
    documents: int
    input_bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


@contextmanager
def dataset_writer(prefix: str, dtype):
    """An IndexedDatasetBuilder whose files become prefix.bin/.idx only if the block succeeds."""
    with atomic_path(prefix + ".bin") as bin_tmp, atomic_path(prefix + ".idx") as idx_tmp:
        builder = IndexedDatasetBuilder(bin_tmp, dtype)
        try:
            yield builder
        except BaseException:
            builder.close()
            raise
        builder.finalize(idx_tmp)


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


class _Encoder:
    """Per-process tokenizer state; `encode` turns one input line into token arrays per key."""

    def __init__(self, tokenizer_cfg, vocab_size: Optional[int], json_keys: List[str],
                 append_eod: bool, input_path: str):
        self.tokenizer_cfg = tokenizer_cfg
        self.vocab_size = vocab_size
        self.json_keys = json_keys
        self.append_eod = append_eod
        self.input_path = input_path
        self.tokenizer = None

    def setup(self) -> None:
        self.tokenizer = build_tokenizer(self.tokenizer_cfg, self.vocab_size)
        self.dtype = optimal_dtype(self.tokenizer.vocab_size)

    def encode(self, numbered_line: Tuple[int, bytes]) -> Optional[Tuple[Dict[str, np.ndarray], int]]:
        number, raw = numbered_line
        where = f"{self.input_path} line {number}"
        if not raw.strip():
            return None
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not valid UTF-8 ({e})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        documents = {}
        for key in self.json_keys:
            if key not in record:
                raise ValueError(f"{where}: no key {key!r} (keys: {sorted(record)}); pass the text "
                                 f"key with --json-keys")
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: {key!r} is a {type(record[key]).__name__}, not a string")
            ids = self.tokenizer.tokenize(record[key])
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
            documents[key] = np.fromiter(ids, dtype=self.dtype, count=len(ids))
        return documents, len(raw)


_worker_encoder: Optional[_Encoder] = None


def _init_worker(encoder: _Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder
    encoder.setup()


def _encode_in_worker(numbered_line):
    return _worker_encoder.encode(numbered_line)


def _numbered_lines(path: str) -> Iterable[Tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


def preprocess_jsonl(input_path: str, output_prefix: str, tokenizer_cfg, *,
                     json_keys: List[str] = ("text",), append_eod: bool = False, workers: int = 1,
                     vocab_size: Optional[int] = None, log_interval: int = 1000,
                     log=sys.stderr) -> PreprocessStats:
    """Tokenize `input_path` with the tokenizer `tokenizer_cfg` (a DataConfig) names.

    Writes one dataset per key and returns the counts; prints a progress line to `log`
    every `log_interval` documents.
    """
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input {input_path} does not exist")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    json_keys = list(json_keys)
    encoder = _Encoder(tokenizer_cfg, vocab_size, json_keys, append_eod, input_path)
    encoder.setup()  # fail early on a bad tokenizer, before any worker starts
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    start = time.perf_counter()
    documents = total_bytes = 0
    with ExitStack() as stack:
        builders = {key: stack.enter_context(dataset_writer(output_prefix_for(output_prefix, key),
                                                            encoder.dtype))
                    for key in json_keys}
        if workers == 1:
            results = map(encoder.encode, _numbered_lines(input_path))
        else:
            fresh = _Encoder(tokenizer_cfg, vocab_size, json_keys, append_eod, input_path)
            pool = stack.enter_context(Pool(workers, initializer=_init_worker, initargs=(fresh,)))
            results = pool.imap(_encode_in_worker, _numbered_lines(input_path), chunksize=32)
        for result in results:
            if result is None:
                continue
            docs, nbytes = result
            for key, tokens in docs.items():
                builders[key].add_document(tokens, [len(tokens)] if len(tokens) else [])
            documents += 1
            total_bytes += nbytes
            if log_interval and documents % log_interval == 0:
                _log_progress(log, documents, total_bytes, time.perf_counter() - start)
        if documents == 0:
            raise ValueError(f"{input_path} holds no documents (it is empty or only blank lines)")
    stats = PreprocessStats(documents, total_bytes, time.perf_counter() - start)
    _log_progress(log, documents, total_bytes, stats.seconds, done=True)
    return stats


def _log_progress(log, documents: int, nbytes: int, seconds: float, done: bool = False) -> None:
    if log is None:
        return
    seconds = max(seconds, 1e-9)
    word = "done:" if done else "processed"
    print(f"{word} {documents} documents ({documents / seconds:.1f} docs/s, "
          f"{nbytes / 1e6 / seconds:.2f} MB/s)", file=log, flush=True)
