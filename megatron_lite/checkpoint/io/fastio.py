"""Writing and reading one large file at the disk's bandwidth: parallel chunks, CRC-32 on the fly.

A file is written from segments (bytes, or the bytes of a tensor on any device) that tile it.
Each of IO_THREADS threads takes the next CHUNK_BYTES of the file, copies the segments it covers
into its own page-aligned staging buffer (pinned when a segment is on the GPU, so the
device-to-host copy runs at full speed and the buffer is reused), computes the chunk's CRC-32
and pwrites it at its offset. The copy, zlib.crc32 and pwrite all release the GIL, so the
threads keep the disk busy while the CPU works; the chunk checksums are combined into the
CRC-32 of the whole file (`crc32_combine`), the one metadata.json records.

Writes bypass the page cache (O_DIRECT, whole aligned blocks; the file is cut to its length at
the end) where the filesystem allows it: buffered writes pile up as dirty pages that the
closing fsync then writes at disk speed, so the two times add up. Where O_DIRECT is refused
(tmpfs, some network filesystems) the writes are buffered, and each chunk's writeback is
started at once (posix_fadvise DONTNEED) so that it overlaps the next chunks. Either way the
file is fsynced before `write_segments` returns.

Reads come in three strategies, chosen with the environment variable MEGATRON_LITE_CKPT_READ
(and MEGATRON_LITE_CKPT_READ_THREADS, default READ_THREADS) or `read_strategy`:

    direct      (default) READ_THREADS threads each take the next CHUNK_BYTES of the file and pread
                them with O_DIRECT straight into their place in the destination, CRC-32 on the
                same thread. Several large requests stay in flight, which is what a virtual disk
                scales with (the writes above reach 1.4x dd's single stream on the GPU machine),
                and no byte passes through the page cache. Buffered where the filesystem refuses
                O_DIRECT (tmpfs, some network filesystems).
    parallel    the same threads and chunks through the page cache.
    sequential  one thread reads front to back through the page cache (torch.load's access
                pattern, which the kernel's readahead streams), the chunks' CRC-32s on helper
                threads.

bench/checkpoint_io.py measures every strategy on the same shard, so the default can follow the
disk.

The buffer is pageable memory. (Page-locking it chunk by chunk as it is read, with
cudaHostRegister, was tried: the GPU machine refused the copy of every tensor that spans two
registrations, "CUDA error: invalid argument", and one registration of the whole buffer would
pin 12 GB on one thread before the first read.) When the last tensor on a read buffer is freed,
a background thread unmaps the memory, so the load does not wait for that.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import functools
import os
import queue
import threading
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

IO_THREADS = 8
READ_THREADS = 16   # docs/PERFORMANCE.md, "Measurements behind defaults"
CHUNK_BYTES = 32 << 20
ALIGN = 4096                  # O_DIRECT: buffer address, file offset and length are multiples of this


@dataclass
class Segment:
    """`data` placed at byte `offset` of the file: bytes, or a contiguous 1-D uint8 tensor (CPU or GPU)."""
    offset: int
    data: Union[bytes, torch.Tensor]

    @property
    def size(self) -> int:
        return self.data.numel() if isinstance(self.data, torch.Tensor) else len(self.data)


# ---- CRC-32 of concatenated data from the CRC-32s of the parts (zlib's crc32_combine) ----------

_CRC_POLY = 0xEDB88320   # CRC-32 (reflected); bit 31 is x^0


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


def _x2n_table() -> List[int]:
    table = [1 << 30]   # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table


_X2N = _x2n_table()   # x^(2^k) modulo the polynomial


@functools.lru_cache(maxsize=256)
def _shift_operator(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial: what appending `nbytes` bytes does to a CRC."""
    p, k, n = 1 << 31, 3, nbytes
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib.crc32(a + b) from crc1 = zlib.crc32(a), crc2 = zlib.crc32(b) and len2 = len(b)."""
    return _multmodp(_shift_operator(len2), crc1) ^ crc2


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def anonymous_buffer(nbytes: int) -> mmap.mmap:
    """Zero-filled, page-aligned memory of at least `nbytes` (huge pages where the kernel offers them,
    so that filling it costs few page faults)."""
    buf = mmap.mmap(-1, max(_round_up(nbytes, ALIGN), ALIGN))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


class _Staging:
    """One thread's chunk buffer, as a tensor (the target of tensor copies) and a memoryview (bytes, I/O)."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        if pinned:   # from the caching host allocator: the next save gets the same pages back
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            if self.tensor.data_ptr() % ALIGN:
                raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True)
                skip = (-raw.data_ptr()) % ALIGN
                self.tensor = raw[skip:skip + nbytes]
            self.view = memoryview(self.tensor.numpy())
        else:
            self._mmap = anonymous_buffer(nbytes)
            self.view = memoryview(self._mmap)[:nbytes]
            self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8, count=nbytes)


def _open_for_writing(path: str) -> Tuple[int, bool]:
    """(fd, direct): O_DIRECT when the filesystem takes an aligned write, else a buffered fd."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        else:
            probe = anonymous_buffer(ALIGN)
            try:
                os.pwrite(fd, memoryview(probe), 0)
                return fd, True
            except OSError as e:
                os.close(fd)
                if e.errno != errno.EINVAL:
                    raise
    return os.open(path, flags, 0o644), False


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_segments(path: str, segments: Sequence[Segment], size: int) -> int:
    """Write `segments` (sorted, tiling [0, size)) to a new file at `path`, durably; its CRC-32."""
    starts = [s.offset for s in segments]
    if starts != sorted(starts) or sum(s.size for s in segments) != size or (segments and starts[0] != 0):
        raise ValueError("segments must be sorted by offset and tile the file exactly")
    chunk_bytes = _round_up(CHUNK_BYTES, ALIGN)
    n_chunks = -(-size // chunk_bytes)
    threads = max(1, min(IO_THREADS, n_chunks))
    pinned = torch.cuda.is_available() and any(isinstance(s.data, torch.Tensor) and s.data.is_cuda for s in segments)
    free: "queue.SimpleQueue[_Staging]" = queue.SimpleQueue()
    for _ in range(threads):
        free.put(_Staging(chunk_bytes, pinned))
    fd, direct = _open_for_writing(path)

    def write_chunk(k: int) -> int:
        start, end = k * chunk_bytes, min((k + 1) * chunk_bytes, size)
        staging = free.get()
        try:
            i = bisect.bisect_right(starts, start) - 1
            while i < len(segments) and segments[i].offset < end:
                seg = segments[i]
                lo, hi = max(seg.offset, start), min(seg.offset + seg.size, end)
                if hi > lo:
                    src = slice(lo - seg.offset, hi - seg.offset)
                    if isinstance(seg.data, torch.Tensor) and seg.data.is_cuda:
                        staging.tensor[lo - start:hi - start].copy_(seg.data[src])
                    elif isinstance(seg.data, torch.Tensor):   # one plain memcpy (GIL released), no thread team
                        ctypes.memmove(staging.tensor.data_ptr() + lo - start, seg.data.data_ptr() + src.start,
                                       hi - lo)
                    else:
                        staging.view[lo - start:hi - start] = seg.data[src]
                i += 1
            n = end - start
            crc = zlib.crc32(staging.view[:n])
            if direct:
                padded = _round_up(n, ALIGN)
                staging.view[n:padded] = bytes(padded - n)
                _pwrite_all(fd, staging.view[:padded], start)
            else:
                _pwrite_all(fd, staging.view[:n], start)
                os.posix_fadvise(fd, start, n, os.POSIX_FADV_DONTNEED)   # start the writeback now
            return crc
        finally:
            free.put(staging)

    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="checkpoint-write") as pool:
            crcs = list(pool.map(write_chunk, range(n_chunks)))
        if direct:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return combine_chunk_crcs(crcs, size, chunk_bytes)


def combine_chunk_crcs(crcs: List[int], size: int, chunk_bytes: int) -> int:
    """The CRC-32 of a file from the CRC-32s of its consecutive `chunk_bytes` chunks."""
    total = 0
    for k, crc in enumerate(crcs):
        total = crc32_combine(total, crc, min(chunk_bytes, size - k * chunk_bytes))
    return total


READ_STRATEGY_ENV = "MEGATRON_LITE_CKPT_READ"
READ_THREADS_ENV = "MEGATRON_LITE_CKPT_READ_THREADS"
READ_STRATEGIES = ("direct", "parallel", "sequential")


@dataclass(frozen=True)
class ReadStrategy:
    """How `read_file` reads: `mode` one of READ_STRATEGIES, with `threads` readers (sequential:
    checksummers)."""
    mode: str
    threads: int


def read_strategy(mode: Optional[str] = None, threads: Optional[int] = None) -> ReadStrategy:
    """The strategy given, else the one the environment names, else direct with READ_THREADS threads."""
    mode = mode or os.environ.get(READ_STRATEGY_ENV) or READ_STRATEGIES[0]
    if mode not in READ_STRATEGIES:
        raise ValueError(f"{READ_STRATEGY_ENV}={mode!r} is not a checkpoint read strategy; use one of "
                         f"{', '.join(READ_STRATEGIES)}")
    if threads is None:
        text = os.environ.get(READ_THREADS_ENV) or str(READ_THREADS)
        if not text.isdigit():
            raise ValueError(f"{READ_THREADS_ENV}={text!r} is not a thread count; set a positive integer such as 8")
        threads = int(text)
    if threads < 1:
        raise ValueError(f"checkpoint reads need at least one thread, got {threads}; set {READ_THREADS_ENV} to "
                         f"a positive integer such as 8")
    return ReadStrategy(mode, threads)


_releases: "queue.Queue[mmap.mmap]" = queue.Queue()
_releaser_lock = threading.RLock()   # re-entrant: a release may be queued by garbage collection inside the lock
_releaser: Optional[threading.Thread] = None


def _release_forever() -> None:
    while True:
        mapping = _releases.get()
        try:
            mapping.close()
        finally:
            _releases.task_done()


def _release_later(mapping: mmap.mmap) -> None:
    """Unmap a read buffer on the release thread (started on first use, or again after a fork)."""
    global _releaser
    with _releaser_lock:
        if _releaser is None or not _releaser.is_alive():
            _releaser = threading.Thread(target=_release_forever, name="checkpoint-release", daemon=True)
            _releaser.start()
    _releases.put(mapping)


def wait_for_released_buffers() -> None:
    """Return once every read buffer dropped so far is unmapped (its memory back to the system)."""
    _releases.join()


class _ReadBuffer:
    """Page-aligned anonymous memory that a file is read into, as a memoryview (`view`).

    When the view and every tensor built on it are gone, a background thread unmaps the memory:
    unmapping takes about 0.2 s per GB of 4 KiB pages, which the load that dropped the buffer
    should not wait for.
    """

    def __init__(self, nbytes: int) -> None:
        self._mapping = anonymous_buffer(nbytes)
        anchor = ctypes.c_char.from_buffer(self._mapping)
        self._address = ctypes.addressof(anchor)
        del anchor   # no export of the mapping is left: the release may close it
        array = (ctypes.c_ubyte * len(self._mapping)).from_address(self._address)
        # at interpreter exit the process's memory goes anyway
        weakref.finalize(array, _release_later, self._mapping).atexit = False
        self.view = memoryview(array).cast("B")


def _open_for_reading(path: str, direct: bool) -> Tuple[int, bool]:
    """(fd, direct): O_DIRECT when asked for and the filesystem takes an aligned read, else a buffered fd."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        else:
            try:
                os.preadv(fd, [memoryview(anonymous_buffer(ALIGN))], 0)
                return fd, True
            except OSError as e:
                os.close(fd)
                if e.errno != errno.EINVAL:
                    raise
    return os.open(path, os.O_RDONLY), False


def _pread_exactly(fd: int, view: memoryview, offset: int, nbytes: int, direct: bool, path: str, size: int) -> None:
    """Fill view[:nbytes] with the file's bytes at `offset`; with O_DIRECT every request is whole
    ALIGN blocks (the view reaches to the next multiple of ALIGN), and only the end of the file
    returns less."""
    pos = 0
    while pos < nbytes:
        want = view[pos:_round_up(nbytes, ALIGN)] if direct else view[pos:nbytes]
        n = os.preadv(fd, [want], offset + pos)
        pos += n
        if n == 0 or (pos < nbytes and direct and pos % ALIGN):
            raise EOFError(f"{path} became shorter while it was read ({offset + min(pos, nbytes)} of {size} bytes); "
                           f"something else is writing it")


def read_file(path: str, *, keep: bool = True,
              strategy: Optional[ReadStrategy] = None) -> Tuple[Optional[memoryview], int, int]:
    """(buffer, size, crc32) of the whole file at `path`, each byte read once (see the module docstring
    for the strategies; `strategy` None: `read_strategy()`, from the environment).

    With `keep` the file lands in one page-aligned buffer of at least `size` bytes, freed in the
    background once it and every tensor on it are gone;
    without, chunks cycle through one reused buffer per thread and only the checksum is kept
    (buffer None).
    """
    strategy = strategy or read_strategy()
    fd, direct = _open_for_reading(path, strategy.mode == "direct")
    try:
        size = os.fstat(fd).st_size
        chunk_bytes = _round_up(CHUNK_BYTES, ALIGN)
        n_chunks = -(-size // chunk_bytes)
        threads = max(1, min(strategy.threads, n_chunks))
        whole = _ReadBuffer(size) if keep else None
        free: "queue.SimpleQueue[mmap.mmap]" = queue.SimpleQueue()
        for _ in range(0 if keep else threads):
            free.put(anonymous_buffer(chunk_bytes))

        def chunk_view(k: int) -> Tuple[memoryview, Optional[mmap.mmap]]:
            """Where chunk k goes, and the reused buffer to give back after its checksum (None with keep)."""
            if keep:
                return whole.view[k * chunk_bytes:], None
            buf = free.get()
            return memoryview(buf), buf

        def checksum(view: memoryview, nbytes: int, buf: Optional[mmap.mmap]) -> int:
            try:
                return zlib.crc32(view[:nbytes])
            finally:
                if buf is not None:
                    free.put(buf)

        def read_chunk(k: int) -> int:
            start, end = k * chunk_bytes, min((k + 1) * chunk_bytes, size)
            view, buf = chunk_view(k)
            try:
                _pread_exactly(fd, view, start, end - start, direct, path, size)
            except BaseException:
                if buf is not None:
                    free.put(buf)
                raise
            return checksum(view, end - start, buf)

        with ThreadPoolExecutor(threads, thread_name_prefix="checkpoint-read") as pool:
            if strategy.mode != "sequential":
                futures = [pool.submit(read_chunk, k) for k in range(n_chunks)]
                try:
                    crcs = [f.result() for f in futures]
                except BaseException:
                    pool.shutdown(cancel_futures=True)   # the chunks not started yet are not read
                    raise
            else:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                pending = []
                for k in range(n_chunks):
                    start, end = k * chunk_bytes, min((k + 1) * chunk_bytes, size)
                    view, buf = chunk_view(k)
                    _pread_exactly(fd, view, start, end - start, False, path, size)
                    pending.append(pool.submit(checksum, view, end - start, buf))
                crcs = [c.result() for c in pending]
    finally:
        os.close(fd)
    return (whole.view if keep else None), size, combine_chunk_crcs(crcs, size, chunk_bytes)
