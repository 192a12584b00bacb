"""Megatron's memory-mapped indexed dataset: a `.bin` file of tokens and an `.idx` index.

The `.idx` layout, byte for byte as Megatron-LM writes it (little-endian):

    b"MMIDIDX\\x00\\x00"          9 bytes, magic
    <Q  version = 1
    <B  dtype code of the tokens (DTYPE_CODES)
    <Q  sequence count S
    <Q  document count D         (number of documents + 1: the list starts with 0)
    int32[S]  sequence lengths, in tokens
    int64[S]  sequence pointers, byte offsets into the .bin file
    int64[D]  document indices: document j holds sequences [doc[j], doc[j+1])

The `.bin` file is the token arrays of all sequences back to back, in that dtype. The
index is memory-mapped, and so is the `.bin` unless `mmap=False` (--no-mmap-bin-files), when
each read opens the file, seeks and reads just the requested tokens.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, List, Optional

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8

DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def optimal_dtype(vocab_size: int) -> type:
    """The token dtype Megatron's preprocessing picks: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def write_index(path: str, dtype, sequence_lengths: Iterable[int],
                document_indices: Iterable[int]) -> None:
    """Write an `.idx` file for sequences stored back to back in a `.bin` of `dtype`."""
    dtype = np.dtype(dtype)
    if dtype not in CODE_OF_DTYPE:
        raise ValueError(f"token dtype {dtype} has no Megatron dtype code; use one of "
                         f"{sorted(str(np.dtype(t)) for t in DTYPE_CODES.values())}")
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    documents = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(documents)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(documents.tobytes(order="C"))


class IndexedDatasetBuilder:
    """Appends token sequences to a `.bin` file; `finalize` writes the matching `.idx`.

    One call of `add_document` per document (one sequence each for GPT data); or
    `add_item` for each sequence of a document followed by `end_document`.
    """

    def __init__(self, bin_file: str, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        self._file = open(bin_file, "wb")
        self.sequence_lengths: List[int] = []
        self.document_indices: List[int] = [0]

    def add_item(self, tokens) -> None:
        array = np.asarray(tokens, dtype=self.dtype)
        self._file.write(array.tobytes(order="C"))
        self.sequence_lengths.append(array.size)

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths: List[int]) -> None:
        """Add a document whose sequences, concatenated in `tokens`, have these lengths."""
        array = np.asarray(tokens, dtype=self.dtype)
        if array.size != sum(lengths):
            raise ValueError(f"document has {array.size} tokens but its sequence lengths sum to "
                             f"{sum(lengths)}")
        self._file.write(array.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.end_document()

    def finalize(self, idx_file: str) -> None:
        self._file.close()
        write_index(idx_file, self.dtype, self.sequence_lengths, self.document_indices)

    def close(self) -> None:
        """Close the `.bin` file without writing an index (the build is abandoned)."""
        self._file.close()


class IndexedDataset:
    """Read-only view of a `.bin`/`.idx` pair; `dataset[i]` is sequence i as a numpy array."""

    def __init__(self, path_prefix: str, mmap: bool = True):
        self.path_prefix = path_prefix
        self.mmap = mmap
        for path in (idx_path(path_prefix), bin_path(path_prefix)):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"indexed dataset file {path} does not exist; --data-path takes the prefix "
                    f"shared by the .bin and .idx files (e.g. out_text_document), as written by "
                    f"tools/preprocess_data.py")
        self._open()

    def _open(self) -> None:
        index_file = idx_path(self.path_prefix)
        index = np.memmap(index_file, mode="r", dtype=np.uint8)
        if index.size < HEADER_BYTES or bytes(index[:len(INDEX_HEADER)]) != INDEX_HEADER:
            raise ValueError(f"{index_file} is not a Megatron MMIDIDX index (bad header); "
                             f"rebuild it with tools/preprocess_data.py")
        version, code, sequence_count, document_count = struct.unpack(
            "<QBQQ", bytes(index[len(INDEX_HEADER):HEADER_BYTES]))
        if version != INDEX_VERSION:
            raise ValueError(f"{index_file} has index version {version}; only version "
                             f"{INDEX_VERSION} exists in Megatron's format")
        if code not in DTYPE_CODES:
            raise ValueError(f"{index_file} has unknown dtype code {code}; known codes are "
                             f"{sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER_BYTES + sequence_count * (4 + 8) + document_count * 8
        if index.size < expected:
            raise ValueError(f"{index_file} is truncated: {index.size} bytes, the header promises "
                             f"{expected}; rebuild it with tools/preprocess_data.py")
        offset = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(index, np.int32, sequence_count, offset)
        offset += sequence_count * 4
        self.sequence_pointers = np.frombuffer(index, np.int64, sequence_count, offset)
        offset += sequence_count * 8
        self.document_indices = np.frombuffer(index, np.int64, document_count, offset)
        if document_count == 0 or self.document_indices[-1] != sequence_count:
            raise ValueError(f"{index_file} is inconsistent: its document indices do not end at "
                             f"the sequence count {sequence_count}")

        data_file = bin_path(self.path_prefix)
        data_bytes = os.path.getsize(data_file)
        needed = 0 if sequence_count == 0 else (
            int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize)
        if data_bytes < needed:
            raise ValueError(f"{data_file} is truncated: {data_bytes} bytes, its index needs "
                             f"{needed}; rebuild it with tools/preprocess_data.py")
        # np.memmap cannot map an empty file; an empty dataset has nothing to read anyway.
        self._data = np.memmap(data_file, mode="r", dtype=np.uint8) if data_bytes and self.mmap else None

    def __getstate__(self):
        return {"path_prefix": self.path_prefix, "mmap": self.mmap}

    def __setstate__(self, state):
        """Re-open the maps in a data-loader worker instead of pickling their contents."""
        self.path_prefix, self.mmap = state["path_prefix"], state["mmap"]
        self._open()

    def _read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens from byte offset `start` of the .bin file."""
        if self._data is not None:
            return np.frombuffer(self._data, self.dtype, length, start)
        tokens = np.empty(length, self.dtype)
        with open(bin_path(self.path_prefix), "rb", buffering=0) as f:
            f.seek(start)
            f.readinto(tokens)
        return tokens

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `idx` (to its end when length is None)."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside sequence {idx} "
                             f"of {self.path_prefix}, which has {size} tokens")
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return self._read(start, length) if length else np.zeros(0, self.dtype)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1
