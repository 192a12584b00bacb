"""fastio reads: every strategy returns the file's bytes and CRC-32, catches damage and short files,
and falls back to buffered reads where O_DIRECT is refused."""

from __future__ import annotations

import errno
import fcntl
import os
import zlib

import pytest

from megatron_lite.checkpoint.io import fastio
from megatron_lite.checkpoint.io.integrity import CheckpointIntegrityError
from megatron_lite.checkpoint.io.layout import model_shard_path
from megatron_lite.checkpoint.io.storage import load_file, save_files

CHUNK = 8192
# empty, one byte, around the O_DIRECT block, around the chunk, several chunks with a ragged tail
SIZES = [0, 1, 4095, 4096, 4097, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 4095]
STRATEGIES = [fastio.ReadStrategy(mode, threads) for mode in fastio.READ_STRATEGIES for threads in (1, 3)]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(fastio, "CHUNK_BYTES", CHUNK)


def write_random(path, size: int) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: f"{s.mode}-{s.threads}")
def test_every_strategy_reads_the_bytes_and_crc32_of_files_of_ragged_sizes(tmp_path, small_chunks, strategy):
    for size in SIZES:
        data = write_random(tmp_path / "f", size)
        buffer, got_size, crc = fastio.read_file(str(tmp_path / "f"), strategy=strategy)
        assert (got_size, crc, bytes(buffer[:got_size])) == (size, zlib.crc32(data), data), size
        assert fastio.read_file(str(tmp_path / "f"), keep=False, strategy=strategy) == (None, size, zlib.crc32(data))


@pytest.mark.parametrize("mode", fastio.READ_STRATEGIES)
def test_one_flipped_byte_changes_the_crc32_in_every_strategy(tmp_path, small_chunks, mode):
    original = write_random(tmp_path / "f", 3 * CHUNK + 5)
    with open(tmp_path / "f", "r+b") as f:
        f.seek(2 * CHUNK + 7)
        f.write(bytes([original[2 * CHUNK + 7] ^ 0x01]))
    damaged = (tmp_path / "f").read_bytes()
    _, _, crc = fastio.read_file(str(tmp_path / "f"), strategy=fastio.ReadStrategy(mode, 2))
    assert crc == zlib.crc32(damaged) != zlib.crc32(original)


@pytest.mark.parametrize("mode", fastio.READ_STRATEGIES)
def test_a_corrupted_shard_is_refused_by_load_file_in_every_strategy(tmp_path, small_chunks, monkeypatch, mode):
    import torch

    monkeypatch.setenv(fastio.READ_STRATEGY_ENV, mode)
    relpath = model_shard_path(0, 0)
    save_files(str(tmp_path), 1, {relpath: {"w": torch.arange(20_000, dtype=torch.float32)}}, None, None)
    path = tmp_path / "iter_0000001" / relpath
    assert torch.equal(load_file(str(tmp_path), 1, relpath)["w"], torch.arange(20_000, dtype=torch.float32))
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(path.stat().st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointIntegrityError, match="failed its crc32 checksum"):
        load_file(str(tmp_path), 1, relpath)


@pytest.mark.parametrize("mode", fastio.READ_STRATEGIES)
def test_a_file_cut_short_while_it_is_read_raises_eof(tmp_path, small_chunks, monkeypatch, mode):
    write_random(tmp_path / "f", 4 * CHUNK + 100)
    real_fstat = os.fstat
    # the file looks a chunk longer than it is, as when another process truncates it during the read
    monkeypatch.setattr(fastio.os, "fstat", lambda fd: os.stat_result(
        tuple(real_fstat(fd))[:6] + (real_fstat(fd).st_size + CHUNK,) + tuple(real_fstat(fd))[7:]))
    with pytest.raises(EOFError, match=r"became shorter while it was read \(\d+ of 41060 bytes\); something else "
                                       r"is writing it"):
        fastio.read_file(str(tmp_path / "f"), strategy=fastio.ReadStrategy(mode, 2))


def test_direct_reads_fall_back_to_buffered_where_o_direct_is_refused(tmp_path, small_chunks, monkeypatch):
    data = write_random(tmp_path / "f", 2 * CHUNK + 3)
    opened = []
    real_open = os.open

    def refusing_open(path, flags, *args):
        opened.append(bool(flags & getattr(os, "O_DIRECT", 0)))
        if flags & getattr(os, "O_DIRECT", 0):   # as tmpfs does
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(fastio.os, "open", refusing_open)
    buffer, size, crc = fastio.read_file(str(tmp_path / "f"), strategy=fastio.ReadStrategy("direct", 2))
    assert (bytes(buffer[:size]), crc, opened) == (data, zlib.crc32(data), [True, False])


def test_direct_reads_fall_back_when_the_first_aligned_read_is_refused(tmp_path, small_chunks, monkeypatch):
    data = write_random(tmp_path / "f", CHUNK + 1)
    real_preadv, refused = os.preadv, []

    def preadv(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(fastio.os, "preadv", preadv)
    _, size, crc = fastio.read_file(str(tmp_path / "f"), strategy=fastio.ReadStrategy("direct", 2))
    assert (size, crc) == (CHUNK + 1, zlib.crc32(data))
    assert refused == ([0] if hasattr(os, "O_DIRECT") else [])


def mapped(address: int) -> bool:
    with open("/proc/self/maps") as f:
        return any(int(lo, 16) <= address < int(hi, 16)
                   for lo, hi in (line.split()[0].split("-") for line in f))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings from /proc")
def test_a_read_buffer_is_unmapped_in_the_background_once_its_last_tensor_is_freed(tmp_path, small_chunks):
    import ctypes

    import torch

    data = write_random(tmp_path / "f", 3 * CHUNK + 5)
    buffer, size, _ = fastio.read_file(str(tmp_path / "f"), strategy=fastio.ReadStrategy("direct", 2))
    anchor = ctypes.c_char.from_buffer(buffer)
    address = ctypes.addressof(anchor)
    del anchor
    tensor = torch.frombuffer(buffer, dtype=torch.uint8, count=size)
    del buffer
    fastio.wait_for_released_buffers()
    assert mapped(address) and bytes(tensor.numpy()) == data
    del tensor
    fastio.wait_for_released_buffers()
    assert not mapped(address)


def test_read_strategy_comes_from_the_environment_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.delenv(fastio.READ_STRATEGY_ENV, raising=False)
    monkeypatch.delenv(fastio.READ_THREADS_ENV, raising=False)
    assert fastio.read_strategy() == fastio.ReadStrategy("direct", fastio.READ_THREADS)
    monkeypatch.setenv(fastio.READ_STRATEGY_ENV, "sequential")
    monkeypatch.setenv(fastio.READ_THREADS_ENV, "16")
    assert fastio.read_strategy() == fastio.ReadStrategy("sequential", 16)
    assert fastio.read_strategy("parallel", 4) == fastio.ReadStrategy("parallel", 4)
    monkeypatch.setenv(fastio.READ_STRATEGY_ENV, "mmap")
    with pytest.raises(ValueError, match="MEGATRON_LITE_CKPT_READ='mmap' is not a checkpoint read strategy; use "
                                         "one of direct, parallel, sequential"):
        fastio.read_strategy()
    monkeypatch.setenv(fastio.READ_STRATEGY_ENV, "direct")
    monkeypatch.setenv(fastio.READ_THREADS_ENV, "eight")
    with pytest.raises(ValueError, match="MEGATRON_LITE_CKPT_READ_THREADS='eight' is not a thread count"):
        fastio.read_strategy()
    with pytest.raises(ValueError, match="at least one thread, got 0"):
        fastio.read_strategy("direct", 0)
