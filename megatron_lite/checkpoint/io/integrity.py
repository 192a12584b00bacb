"""Whether a checkpoint directory is committed and intact: metadata.json, file sizes, checksums.

The checksum is CRC-32 (zlib) of the whole file, the fastest of the checksums compared in
docs/PERFORMANCE.md ("Measurements behind defaults"). Files are written and read in parallel chunks whose CRC-32s are combined (fastio), so
the checksum costs no extra pass. CRC-32 catches every error burst up to 32 bits and any other
random corruption with probability 1 - 2^-32; truncation is caught by the size check before it.
The algorithm's name is recorded in metadata.json so that it can change without breaking
old checkpoints.

A file verified whole by `keep_verified` stays in memory, held by the load plan (and so by the
manager's load decision), until `storage.load_file(verified=...)` takes it or the plan is
dropped: choosing a checkpoint and loading it then read each byte once.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional, Tuple

from megatron_lite.checkpoint.io import fastio
from megatron_lite.checkpoint.io.layout import METADATA_FILENAME, format_iteration, parse_dir_name
from megatron_lite.checkpoint.io.torchfile import file_pickle_problem, pickle_problem

CHECKSUM_ALGORITHM = "crc32"
FORMAT_VERSION = 1
_MAX_VERIFY_FILES = 4   # small files are checked several at a time; a large one is read in parallel chunks


class CheckpointMetadataError(ValueError):
    """metadata.json is missing, unreadable, or from a newer format."""


class CheckpointIntegrityError(ValueError):
    """A file of a committed checkpoint is missing, or differs in size or checksum from metadata.json.

    `problem` is the sentence verify_checkpoint reports for it.
    """

    def __init__(self, problem: str, iter_dir: str) -> None:
        super().__init__(f"{problem}; checkpoint {iter_dir} is damaged: load another with --ckpt-step, or "
                         f"check it with `python -m megatron_lite.tools.inspect_checkpoint {iter_dir}`")
        self.problem = problem


def checksum_file(path: str) -> Tuple[int, str]:
    """(size in bytes, checksum) of the file at `path`, read in parallel chunks."""
    _, size, crc = fastio.read_file(path, keep=False)
    return size, f"{crc:08x}"


def size_problem(relpath: str, entry, size: Optional[int]) -> Optional[str]:
    """Why a file of `size` bytes (None: missing) does not match its metadata.json `entry`, or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
        return f"metadata.json is damaged: the entry of {relpath} has no size"
    if size is None:
        return f"{relpath} is missing"
    if size != entry["size"]:
        what = "truncated" if size < entry["size"] else "longer than written"
        return f"{relpath} is {what}: {size} bytes on disk, {entry['size']} in metadata.json"
    return None


def checksum_problem(relpath: str, entry: dict, checksum: str, algorithm: str = CHECKSUM_ALGORITHM) -> Optional[str]:
    if checksum == entry.get("checksum"):
        return None
    return (f"{relpath} failed its {algorithm} checksum: {checksum} on disk, "
            f"{entry.get('checksum')} in metadata.json (the file is corrupted)")


def _algorithm_problem(meta: dict) -> Optional[str]:
    algorithm = meta.get("checksum_algorithm")
    if algorithm == CHECKSUM_ALGORITHM:
        return None
    return (f"metadata.json records checksum algorithm {algorithm!r}; this megatron_lite checks "
            f"{CHECKSUM_ALGORITHM!r} only: upgrade megatron_lite")


# ---- files read whole and verified, waiting for the loader --------------------------------------

class VerifiedFile:
    """A checkpoint file read into memory whose size and checksum matched metadata.json.

    `buffer` is the file's bytes (None once the loader took them); `fingerprint` identifies the
    file on disk, so that a file replaced since is read again.
    """

    def __init__(self, path: str, buffer: mmap.mmap, fingerprint: tuple) -> None:
        self.path, self.buffer, self.fingerprint = path, buffer, fingerprint

    def take(self) -> Optional[mmap.mmap]:
        """The bytes, if the file is unchanged on disk since they were verified; once only."""
        buffer, self.buffer = self.buffer, None
        if buffer is None:
            return None
        try:
            unchanged = _fingerprint(os.stat(self.path)) == self.fingerprint
        except OSError:
            unchanged = False
        return buffer if unchanged else None


def _fingerprint(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_verified(iter_dir: str, meta: dict, relpath: str) -> Tuple[mmap.mmap, Optional[str]]:
    """(bytes of the file, None) or (bytes, what is wrong with them) for one file of a committed
    checkpoint, read once; the caller decides how to report a wrong size or checksum, so that it
    can say what else is wrong with the bytes."""
    problem = _algorithm_problem(meta)
    if problem:
        raise CheckpointIntegrityError(problem, iter_dir)
    entry = meta["files"].get(relpath)
    if entry is None:
        raise CheckpointIntegrityError(f"{relpath} is not listed in metadata.json, so it was not written by "
                                       f"this save", iter_dir)
    buffer, size, crc = fastio.read_file(os.path.join(iter_dir, relpath))
    return buffer, size_problem(relpath, entry, size) or checksum_problem(relpath, entry, f"{crc:08x}")


def keep_verified(iter_dir: str, meta: dict, relpath: str) -> VerifiedFile:
    """Read and verify one file whole; the caller holds the result (the load plan does, and hands it
    to `storage.load_file(verified=...)`). Raises CheckpointIntegrityError."""
    path = os.path.join(iter_dir, relpath)
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    problem = size_problem(relpath, meta["files"].get(relpath), size)   # found without reading the file
    if problem:
        raise CheckpointIntegrityError(problem, iter_dir)
    buffer, problem = read_verified(iter_dir, meta, relpath)
    if problem is None and relpath.endswith(".pt"):
        unsafe = pickle_problem(buffer)
        problem = f"{relpath} {unsafe}" if unsafe else None
    if problem:
        raise CheckpointIntegrityError(problem, iter_dir)
    return VerifiedFile(path, buffer, _fingerprint(os.stat(path)))


def take_verified(path: str, verified: Iterable[VerifiedFile]) -> Optional[mmap.mmap]:
    """The bytes of `path` from the verified files that travel with a load decision, if one of them
    is that file, unchanged since; once only."""
    real = os.path.realpath(path)
    for v in verified:
        if os.path.realpath(v.path) == real:
            return v.take()
    return None


METADATA_CHECKSUM_KEY = "metadata_checksum"


def metadata_checksum(meta: dict) -> str:
    """SHA-256 of metadata.json's content without its own checksum, in canonical JSON."""
    body = {k: v for k, v in meta.items() if k != METADATA_CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_metadata_checksum(meta: dict) -> dict:
    """`meta` carrying its own checksum, as commit writes it: every byte that decides a load is verified."""
    return {**meta, METADATA_CHECKSUM_KEY: metadata_checksum(meta)}


def read_metadata(iter_dir: str) -> dict:
    """The parsed metadata.json of a checkpoint directory; CheckpointMetadataError says what is wrong."""
    path = os.path.join(iter_dir, METADATA_FILENAME)
    if not os.path.isfile(path):
        names = sorted(os.listdir(iter_dir)) if os.path.isdir(iter_dir) else []
        found = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") or "nothing"
        raise CheckpointMetadataError(f"{iter_dir} has no {METADATA_FILENAME} and is in none of Megatron-LM's formats "
                                      f"either (it holds {found}): it was never committed (the save did not "
                                      f"finish) or the file was deleted")
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointMetadataError(f"{path} is damaged: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointMetadataError(f"{path} is damaged: it has no 'files' table")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointMetadataError(f"{path} has format_version {version!r}; this megatron_lite reads "
                                      f"versions up to {FORMAT_VERSION}: upgrade megatron_lite to load it")
    recorded = meta.get(METADATA_CHECKSUM_KEY)   # absent in checkpoints written before it existed
    if recorded is not None and recorded != metadata_checksum(meta):
        raise CheckpointMetadataError(f"{path} is damaged: its content does not match the checksum it was written "
                                      f"with (edited or corrupted after the save)")
    return meta


def check_files(iter_dir: str, meta: dict, relpaths: Iterable[str], *, deep: bool) -> List[str]:
    """Problems with the listed files of a committed checkpoint: missing, wrong size, and (deep) checksum.

    Used whole by `verify_checkpoint`, and on a share of the files per rank when all ranks
    verify a checkpoint together.
    """
    files: Dict[str, dict] = meta["files"]
    if deep and _algorithm_problem(meta):
        return [_algorithm_problem(meta)]

    def one(relpath: str) -> Optional[str]:
        entry = files[relpath]
        path = os.path.join(iter_dir, relpath)
        try:
            size = os.path.getsize(path)
        except OSError:
            size = None
        problem = size_problem(relpath, entry, size)
        if problem or not deep:
            return problem
        try:
            _, checksum = checksum_file(path)
        except OSError as e:
            return f"{relpath} cannot be read: {e}"
        problem = checksum_problem(relpath, entry, checksum)
        if problem is None and relpath.endswith(".pt"):   # intact bytes that the loader would still refuse
            unsafe = file_pickle_problem(path)
            problem = f"{relpath} {unsafe}" if unsafe else None
        return problem

    relpaths = sorted(relpaths)
    if deep and len(relpaths) > 1:
        with ThreadPoolExecutor(min(_MAX_VERIFY_FILES, len(relpaths))) as pool:
            results = list(pool.map(one, relpaths))
    else:
        results = [one(r) for r in relpaths]
    return [r for r in results if r is not None]


def committed_metadata(iter_dir: str) -> Tuple[Optional[dict], List[str]]:
    """(metadata, []) for a committed directory whose name and metadata agree, else (None or metadata, problems).

    Covers everything but the files themselves: the temporary name of an unfinished save,
    a missing or damaged metadata.json, and a directory renamed to another iteration.
    """
    parsed = parse_dir_name(os.path.basename(os.path.normpath(iter_dir)))
    if parsed is not None and parsed[1] == "tmp":
        return None, [f"incomplete: {os.path.basename(os.path.normpath(iter_dir))} still has its temporary "
                      f"name, so the save did not finish"]
    if not os.path.isdir(iter_dir):
        return None, [f"{iter_dir} does not exist"]
    try:
        meta = read_metadata(iter_dir)
    except CheckpointMetadataError as e:
        return None, [str(e)]
    if parsed is not None and meta.get("iteration") != parsed[0]:
        return meta, [f"metadata.json says {format_iteration(meta.get('iteration'))} but the directory is named "
                      f"{os.path.basename(os.path.normpath(iter_dir))}: it was renamed or copied; rename it back"]
    return meta, []


def verify_checkpoint(iter_dir: str, *, deep: bool = True) -> List[str]:
    """Every problem that makes `iter_dir` unsafe to load; [] when it is committed and intact.

    Checks, in order: committed (final name, metadata.json present and readable, iteration
    matching the name), every file listed in metadata.json present with its recorded size,
    and with `deep` its checksum (this reads every byte).
    """
    meta, problems = committed_metadata(iter_dir)
    if problems:
        return problems
    return check_files(iter_dir, meta, meta["files"], deep=deep)
