"""The .bin/.idx format: Megatron's MMIDIDX layout, byte for byte, memory-mapped."""

import os
import resource
import struct

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import (DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder,
                                                optimal_dtype)


def hand_built_index(code: int, lengths, document_indices, itemsize: int) -> bytes:
    """The documented .idx layout, assembled field by field."""
    pointers, position = [], 0
    for length in lengths:
        pointers.append(position)
        position += length * itemsize
    return (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
            + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(document_indices))
            + b"".join(struct.pack("<i", n) for n in lengths)
            + b"".join(struct.pack("<q", p) for p in pointers)
            + b"".join(struct.pack("<q", d) for d in document_indices))


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_index_written_here_is_read_back_identically(tmp_path, code):
    dtype = np.dtype(DTYPE_CODES[code])
    rng = np.random.default_rng(code)
    prefix = str(tmp_path / "data")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    sequences = [rng.integers(0, 100, n).astype(dtype) for n in (5, 0, 17, 1, 9)]
    builder.add_document(sequences[0], [5])
    builder.add_document(np.zeros(0, dtype), [])          # an empty document: no sequence
    for seq in sequences[1:4]:                             # one document of three sequences
        builder.add_item(seq)
    builder.end_document()
    builder.add_document(sequences[4], [9])
    builder.finalize(prefix + ".idx")

    with open(prefix + ".idx", "rb") as f:
        assert f.read() == hand_built_index(code, [5, 0, 17, 1, 9], [0, 1, 1, 4, 5], dtype.itemsize)
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == b"".join(s.tobytes() for s in sequences)

    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype and len(ds) == 5 and ds.num_documents == 4
    assert ds.sequence_lengths.tolist() == [5, 0, 17, 1, 9]
    assert ds.document_indices.tolist() == [0, 1, 1, 4, 5]
    for i, seq in enumerate(sequences):
        np.testing.assert_array_equal(ds[i], seq)
    np.testing.assert_array_equal(ds.get(2, offset=3, length=4), sequences[2][3:7])
    np.testing.assert_array_equal(ds.get(2, offset=15), sequences[2][15:])


def test_hand_built_file_is_read_correctly(tmp_path):
    prefix = str(tmp_path / "hand")
    tokens = [[7, 65535, 3], [1000, 2], [0, 0, 0, 42]]
    with open(prefix + ".idx", "wb") as f:
        f.write(hand_built_index(8, [3, 2, 4], [0, 2, 3], itemsize=2))  # code 8: uint16
    with open(prefix + ".bin", "wb") as f:
        f.write(b"".join(struct.pack("<H", t) for seq in tokens for t in seq))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(3)] == tokens
    assert ds.document_indices.tolist() == [0, 2, 3]
    assert ds.sequence_pointers.tolist() == [0, 6, 10]
    assert ds.get(2, offset=3, length=1).tolist() == [42]


def test_optimal_dtype_follows_megatron():
    assert optimal_dtype(257) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(128256) == np.int32


@pytest.mark.parametrize("damage, message", [
    (lambda idx, b: open(idx, "r+b").write(b"NOTMMIDX\x00"), "bad header"),
    (lambda idx, b: os.truncate(idx, os.path.getsize(idx) - 8), "is truncated"),
    (lambda idx, b: os.truncate(b, 3), "is truncated"),
    (lambda idx, b: os.remove(b), "does not exist"),
])
def test_damaged_files_are_rejected_with_the_fix(make_dataset, damage, message):
    prefix = make_dataset("d", [[1, 2, 3], [4, 5]])
    damage(prefix + ".idx", prefix + ".bin")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        IndexedDataset(prefix)


def test_opening_a_large_dataset_costs_only_its_index(tmp_path):
    """A sparse 8 GiB .bin: opening it and reading its last sequence must not load it."""
    prefix = str(tmp_path / "big")
    huge = 8 << 30
    with open(prefix + ".bin", "wb") as f:
        f.truncate(huge)                                   # sparse: takes no disk
    lengths = [huge // 2 // 4] * 4                         # four uint16 sequences filling it
    with open(prefix + ".idx", "wb") as f:
        f.write(hand_built_index(8, lengths, [0, 4], itemsize=2))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB
    ds = IndexedDataset(prefix)
    tail = ds.get(3, offset=lengths[3] - 4, length=4)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert tail.tolist() == [0, 0, 0, 0]
    assert peak_after - peak_before < 256 * 1024           # far below the 8 GiB of data
