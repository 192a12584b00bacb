"""Writing checkpoint files so that a crash at any moment leaves the previous checkpoint loadable.

The commit protocol of `save_files` (every step is what makes the next crash point safe):

1. rank 0 removes `iter_X.tmp-<token>` left by an earlier attempt of this run and creates it afresh; all ranks
   check their arguments together, so a bad file on one rank stops every rank before anything
   is written.
2. every rank writes its files into `iter_X.tmp` in torch.save's format, in parallel chunks
   straight from the tensors' devices, each chunk checksummed on its way out (torchfile.py,
   fastio.py), then fsyncs each file and its directory.
3. rank 0 gathers (path, size, checksum) from every rank and writes `metadata.json`,
   fsynced: the directory now describes itself.
4. rank 0 renames `iter_X.tmp` to `iter_X` and fsyncs the save directory. An `iter_X` that
   already exists is first renamed to `iter_X.old` and deleted only after the new rename.
5. for a full checkpoint rank 0 writes the tracker to a temporary file, fsyncs it and
   renames it over `latest_checkpointed_iteration.txt` (never empty, never partial).
6. rank 0 broadcasts the outcome: no rank returns before the commit is durable, and if any
   rank failed, every rank raises the same CheckpointSaveError.

A crash before 4 leaves only `iter_X.tmp`, which loading never uses; between 4 and 5 the
tracker still names the previous checkpoint, which is intact. With an AsyncSaver steps 2-5
run in a background thread (see async_save.py).
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.io.integrity import (CHECKSUM_ALGORITHM, FORMAT_VERSION, CheckpointIntegrityError,
                                                CheckpointMetadataError, VerifiedFile, read_metadata, read_verified,
                                                METADATA_CHECKSUM_KEY, take_verified, with_metadata_checksum)
from megatron_lite.checkpoint.io.layout import (METADATA_FILENAME, TRACKER_FILENAME, Iteration, check_iteration,
                                                check_relpath, iteration_dir_name, parse_shard_dir, replaced_dir_name,
                                                resolve_iteration_dir, tmp_dir_name, tracker_tmp_path)
from megatron_lite.checkpoint.io.torchfile import unpickle_torch_file, write_torch_file
from megatron_lite.parallel.state import ParallelState

KINDS = ("full", "weights")
RESERVED_METADATA_KEYS = ("format_version", "iteration", "kind", "checksum_algorithm", "layout", "saved_at", "files",
                          METADATA_CHECKSUM_KEY)


class DamagedPickleError(CheckpointIntegrityError, pickle.UnpicklingError):
    """A damaged (or replaced) file whose pickle also fails torch's weights-only load: either kind of
    handler catches it."""

    def __init__(self, problem: str, iter_dir: str, unpickling_error: Exception) -> None:
        super().__init__(problem, iter_dir)
        self.args = (f"{self.args[0]}; its pickle does not load either ({unpickling_error})",)


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; nothing was committed and the previous checkpoint is untouched."""


@dataclass
class SaveResult:
    iteration: Iteration
    iter_dir: str
    seconds: float          # until the commit was durable; for an asynchronous save, the time training was blocked
    bytes_written: int      # over all ranks; 0 while an asynchronous save is pending (finalize() has the total)
    committed: bool         # False while an asynchronous save's commit is still pending


@dataclass
class CommitSpec:
    """What rank 0 needs to commit a save once every rank's files are written."""
    save_dir: str
    iteration: Iteration
    kind: str
    metadata: dict          # the caller's, already checked to be JSON
    layout: dict            # TP/PP/DP sizes the files belong to
    world_size: int
    token: str = ""         # the writing run's (io/lock.py): its temporary directory is its own

    @property
    def tmp_dir(self) -> str:
        return os.path.join(self.save_dir, tmp_dir_name(self.iteration, self.token))

    @property
    def iter_dir(self) -> str:
        return os.path.join(self.save_dir, iteration_dir_name(self.iteration))


# ---- collectives over all ranks (no-ops in a single process) ----------------------------------

def _rank(state: Optional[ParallelState]) -> int:
    return 0 if state is None else state.rank


def all_gather_object(obj, state: Optional[ParallelState]) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in a single process."""
    if state is None or not state.is_distributed:
        return [obj]
    out = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, state: Optional[ParallelState]):
    """Rank 0's `obj` on every rank."""
    if state is None or not state.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- what may be saved ------------------------------------------------------------------------

_LEAF_TYPES = {int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, torch.Size}
_CONTAINERS = {dict, collections.OrderedDict, list, tuple, set}


def saveable(obj, where: str, *, buffer_for: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             memo: Optional[dict] = None):
    """A copy of the containers of `obj` with detached tensors, checked to be loadable by
    torch.load(weights_only=True).

    The tensors stay where they are (the writer reads them from their device; of a view it
    writes only the viewed bytes). With `buffer_for` every tensor is copied (non-blocking from
    a GPU) into the CPU tensor it returns, laid out like `torch.empty_like`, so that training
    may change the originals at once. The same tensor object reached twice stays one tensor.
    `where` names `obj` in error messages.
    """
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, torch.nn.Parameter):
        if id(obj) not in memo:
            t = obj.detach()
            memo[id(obj)] = t if buffer_for is None else buffer_for(t).copy_(t, non_blocking=True)
        return memo[id(obj)]
    if type(obj) in _LEAF_TYPES:
        return obj
    if type(obj) in _CONTAINERS:
        if isinstance(obj, dict):
            for k in obj:
                if type(k) not in _LEAF_TYPES:
                    raise TypeError(f"{where} has a key of type {type(k).__qualname__}; use str or int keys")
            return type(obj)((k, saveable(v, f"{where}[{k!r}]", buffer_for=buffer_for, memo=memo))
                             for k, v in obj.items())
        items = [saveable(v, f"{where}[{i}]", buffer_for=buffer_for, memo=memo) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else type(obj)(items)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
                    f"torch.load(weights_only=True) cannot read back; store a tensor, a number, a string, "
                    f"or a list/dict of those instead")


def _check_save_args(iteration: Iteration, kind: str, files: Dict[str, object]) -> None:
    check_iteration(iteration)
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(files, dict):
        raise TypeError(f"files must map a relative path to the object saved there, got {type(files).__qualname__}")
    for relpath in files:
        check_relpath(relpath)


def _frozen_metadata(metadata: Optional[dict]) -> dict:
    """A JSON round-tripped copy of the caller's metadata, so later changes to the dict cannot leak in."""
    metadata = {} if metadata is None else metadata
    clash = sorted(set(metadata) & set(RESERVED_METADATA_KEYS))
    if clash:
        raise ValueError(f"checkpoint metadata keys {clash} are written by the checkpoint itself; rename them")
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON (dicts, lists, str, numbers, bool, None): {e}") from e


def _parallel_layout(state: Optional[ParallelState], relpaths) -> dict:
    """The TP/PP/DP layout the files belong to: from `state`, or from the shard names in one process."""
    if state is not None:
        tp, pp, dp = state.tp_size, state.pp_size, state.dp_size
    else:
        shards = [parse_shard_dir(r.split("/")[0]) for r in relpaths]
        shards = [s for s in shards if s is not None]
        tp = 1 + max((s[0] for s in shards), default=0)
        pp = 1 + max((s[1] for s in shards), default=0)
        dp = 1 + max((s[2] for s in shards if s[2] is not None), default=0)
    return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "data_parallel_size": dp, "world_size": tp * pp * dp}


# ---- durable file operations --------------------------------------------------------------------

def fsync_dir(path: str) -> None:
    """Make the directory entries of `path` (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_files(tmp_dir: str, payload: Dict[str, object], rank: int) -> Dict[str, dict]:
    """Write each object to its file durably (torchfile.py), checksummed as it goes; {relpath: {size, checksum, rank}}."""
    entries, dirs = {}, {tmp_dir}
    for relpath, obj in payload.items():
        path = os.path.join(tmp_dir, relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        dirs.add(os.path.dirname(path))
        size, crc = write_torch_file(path, obj)
        entries[relpath] = {"size": size, "checksum": f"{crc:08x}", "rank": rank}
    for d in sorted(dirs, key=len, reverse=True):
        fsync_dir(d)
    return entries


def write_tracker(save_dir: str, iteration: Iteration, name: str = TRACKER_FILENAME) -> None:
    """Replace latest_checkpointed_iteration.txt (or another tracker: best_checkpointed_iteration.txt)
    atomically: write a temporary file, fsync, rename."""
    tmp = tracker_tmp_path(save_dir, name)
    write_durably(tmp, str(iteration).encode())
    os.replace(tmp, os.path.join(save_dir, name))
    fsync_dir(save_dir)


def prepare_tmp_dir(spec: CommitSpec) -> None:
    """Rank 0, before any rank writes: a fresh, empty temporary directory for this save."""
    os.makedirs(spec.save_dir, exist_ok=True)
    if spec.kind == "weights":
        existing = resolve_iteration_dir(spec.save_dir, spec.iteration)
        try:
            existing_kind = read_metadata(existing).get("kind") if os.path.isdir(existing) else None
        except CheckpointMetadataError:
            existing_kind = None
        if existing_kind == "full":
            raise ValueError(f"{existing} already holds a full checkpoint, which a weights-only save of the same "
                             f"iteration would replace; the full checkpoint has the weights already, so skip the "
                             f"weights-only save at this iteration or write it to another directory")
    if os.path.isdir(spec.tmp_dir):
        shutil.rmtree(spec.tmp_dir)
    os.makedirs(spec.tmp_dir)


def commit(spec: CommitSpec, entries_by_rank: List[Dict[str, dict]]) -> None:
    """Rank 0, once every rank's files are durable: metadata.json, the rename, the tracker."""
    files = {}
    for entries in entries_by_rank:
        files.update(entries)
    meta = {"format_version": FORMAT_VERSION, "iteration": spec.iteration, "kind": spec.kind,
            "checksum_algorithm": CHECKSUM_ALGORITHM, "layout": spec.layout,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": dict(sorted(files.items())), **spec.metadata}
    write_durably(os.path.join(spec.tmp_dir, METADATA_FILENAME), json.dumps(with_metadata_checksum(meta),
                                                                           indent=1).encode())
    fsync_dir(spec.tmp_dir)
    old = os.path.join(spec.save_dir, replaced_dir_name(spec.iteration))
    if os.path.isdir(spec.iter_dir):
        shutil.rmtree(old, ignore_errors=True)     # stale: its re-save completed but the cleanup did not
        os.rename(spec.iter_dir, old)
    os.rename(spec.tmp_dir, spec.iter_dir)
    fsync_dir(spec.save_dir)
    shutil.rmtree(old, ignore_errors=True)         # retention may be removing it at the same moment
    if spec.kind == "full":
        write_tracker(spec.save_dir, spec.iteration)


def raise_if_failed(errors: List[Optional[str]], spec: CommitSpec, rank: int,
                    cause: Optional[BaseException] = None) -> None:
    """Raise one CheckpointSaveError, the same on every rank, if any rank reported an error.

    Called once no rank touches the temporary directory any more, so rank 0 removes it:
    a failed save leaves nothing behind. `cause` is this rank's own exception, chained for
    its traceback.
    """
    failed = [e for e in errors if e]
    if not failed:
        return
    if rank == 0 and os.path.isdir(spec.tmp_dir):
        shutil.rmtree(spec.tmp_dir, ignore_errors=True)
    raise CheckpointSaveError(f"saving {spec.iter_dir} failed, so this save did not complete; checkpoints saved "
                              f"before it are untouched:\n  " + "\n  ".join(failed)) from cause


def _check_no_duplicates(relpaths_by_rank: List[List[str]]) -> Optional[str]:
    owner = {}
    for rank, relpaths in enumerate(relpaths_by_rank):
        for r in relpaths:
            if r in owner:
                return (f"{r} is passed by ranks {owner[r]} and {rank}; a shard replicated over data-parallel "
                        f"ranks must be passed by its dp_rank 0 only")
            owner[r] = rank
    return None


# ---- the public entry points ------------------------------------------------------------------

def save_files(save_dir: str, iteration: Iteration, files: Dict[str, object], state: Optional[ParallelState],
               metadata: Optional[dict], *, kind: str = "full", async_saver=None, token: str = "") -> SaveResult:
    """Save one checkpoint: collective over all ranks; see the module docstring for the protocol.

    `files` maps a path inside the iteration directory (`mp_rank_00_000/model_optim_rng.pt`)
    to what this rank writes there. `metadata` (JSON) is merged into metadata.json.
    `state=None` means one process; the layout is then read from the shard names.
    kind "full" moves the tracker; "weights" does not. With `async_saver`, this returns
    once every tensor is copied to the CPU and the rest runs in the background (a synchronous
    save streams the tensors from their device through the writer's pinned buffers); the
    AsyncSaver's `finalize()` (called here first) waits for the previous commit. `token` (the
    same on every rank) names the temporary directory as this run's.
    """
    if async_saver is not None:
        async_saver.finalize()
    start = time.perf_counter()
    rank = _rank(state)
    spec = CommitSpec(save_dir, iteration, kind, {}, {}, 1 if state is None else state.world_size, token)
    payload, local_error = {}, None
    try:
        _check_save_args(iteration, kind, files)
        payload = (async_saver.snapshot(files) if async_saver is not None else
                   {r: saveable(obj, f"files[{r!r}]") for r, obj in files.items()})
        if rank == 0:
            spec.metadata = _frozen_metadata(metadata)
            spec.layout = _parallel_layout(state, files)
            prepare_tmp_dir(spec)
    except Exception as e:   # reported to every rank below, so that all stop together
        local_error = e
    gathered = all_gather_object((None if local_error is None else f"rank {rank}: {local_error}",
                                  sorted(payload)), state)
    errors = [g[0] for g in gathered] + [_check_no_duplicates([g[1] for g in gathered])]
    raise_if_failed(errors, spec, rank, local_error)

    if async_saver is not None:
        async_saver.start(spec, payload, state, start)
        return SaveResult(iteration, spec.iter_dir, time.perf_counter() - start, 0, committed=False)

    entries, local_error = {}, None
    try:
        entries = write_files(spec.tmp_dir, payload, rank)
    except Exception as e:
        local_error = e
    gathered = all_gather_object((None if local_error is None else f"rank {rank}: {local_error}", entries), state)
    outcome = None
    if rank == 0 and not any(g[0] for g in gathered):
        try:
            commit(spec, [g[1] for g in gathered])
        except Exception as e:
            local_error, outcome = e, f"rank 0: commit failed: {e}"
    outcome = broadcast_object(outcome, state)
    raise_if_failed([g[0] for g in gathered] + [outcome], spec, rank, local_error)
    return SaveResult(iteration, spec.iter_dir, time.perf_counter() - start,
                      sum(e["size"] for g in gathered for e in g[1].values()), committed=True)


def load_file(load_dir: str, iteration: Iteration, relpath: str, verified: Iterable[VerifiedFile] = ()):
    """One file of a committed checkpoint, loaded on the CPU without unpickling code, checked against
    metadata.json while it is read.

    The file is read once (or taken from `verified`, the files that choosing the checkpoint
    verified and kept, when it is one of them) and its tensors are windows of that memory. A damaged file raises
    CheckpointIntegrityError and returns nothing; a file holding code raises
    pickle.UnpicklingError.
    """
    check_relpath(relpath)
    iter_dir = resolve_iteration_dir(load_dir, iteration)
    path = os.path.join(iter_dir, relpath)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: the checkpoint was saved with another parallel layout or "
                                f"without this part; see what it holds with "
                                f"`python -m megatron_lite.tools.inspect_checkpoint {iter_dir}`")
    buffer, problem = take_verified(path, verified), None
    if buffer is None:
        buffer, problem = read_verified(iter_dir, read_metadata(iter_dir), relpath)
    try:
        obj = unpickle_torch_file(buffer)
    except pickle.UnpicklingError as e:
        if problem:
            raise DamagedPickleError(problem, iter_dir, e) from e
        raise
    except Exception as e:
        if problem:
            raise CheckpointIntegrityError(problem, iter_dir) from e
        raise
    if problem:
        raise CheckpointIntegrityError(problem, iter_dir)
    return obj
