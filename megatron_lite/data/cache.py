"""Build-once files shared by processes that start together, without torch.distributed.

Every rank asks for the same cached files. The first to take the directory's file lock
builds them while the others wait on the lock; then everyone finds them present. Each
file is written under a temporary name and renamed into place, so a file that exists is
complete, even if a builder was killed half-way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterable

import numpy as np

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "megatron_lite")


def cache_dir(data_cache_path) -> str:
    """--data-cache-path, or ~/.cache/megatron_lite."""
    return os.path.abspath(os.path.expanduser(data_cache_path or DEFAULT_CACHE_DIR))


def description_hash(description: dict) -> str:
    """A short stable name for cached files built from `description`."""
    text = json.dumps(description, sort_keys=True)
    return hashlib.md5(text.encode("utf-8")).hexdigest()


@contextmanager
def _locked(directory: str):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_once(paths: Iterable[str], build: Callable[[], None]) -> None:
    """Run `build` (which must create every path) unless all `paths` already exist."""
    paths = list(paths)
    if all(os.path.exists(p) for p in paths):
        return
    with _locked(os.path.dirname(paths[0])):
        if all(os.path.exists(p) for p in paths):
            return
        build()
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise RuntimeError(f"building the data cache did not produce {missing}")


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to `path`; rename it to `path` if the block succeeds."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_array(path: str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def save_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def load_array(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)
