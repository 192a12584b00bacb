"""--keep-last-n-checkpoints: delete old full checkpoints, but only once newer intact ones exist."""

from __future__ import annotations

import os
import shutil
from typing import List, Set

from megatron_lite.checkpoint.io.integrity import verify_checkpoint
from megatron_lite.checkpoint.io.layout import tmp_dir_name
from megatron_lite.checkpoint.recovery import find_checkpoints, read_tracker


def _delete(path: str, tmp_path: str) -> None:
    """Rename to the temporary name first, so that a crash mid-delete leaves an incomplete leftover
    (never loaded, removed next time) rather than a committed directory with files missing."""
    if os.path.isdir(tmp_path):
        shutil.rmtree(tmp_path)
    os.rename(path, tmp_path)
    shutil.rmtree(tmp_path)


def apply_retention(save_dir: str, keep_last_n: int, protect: Set[int]) -> List[int]:
    """Rank 0, after a commit: delete full checkpoints older than the `keep_last_n` newest intact ones.

    An older checkpoint goes only when `keep_last_n` newer full checkpoints pass the cheap
    integrity check (committed, every file present at its recorded size; the checksums were
    taken from the bytes as they were written, moments ago). Never deleted: the iterations in
    `protect` (the one this run loaded from), the tracker's, weights-only checkpoints,
    `release`, and anything newer than the kept ones. Also removes leftovers of saves that did
    not finish and are older than the newest committed checkpoint, and stale `.old` copies.
    Returns the deleted iterations, oldest first.
    """
    if isinstance(keep_last_n, bool) or not isinstance(keep_last_n, int) or keep_last_n < 1:
        raise ValueError(f"--keep-last-n-checkpoints must be a positive integer, got {keep_last_n!r}")
    checkpoints = find_checkpoints(save_dir)
    tracker_iteration, _ = read_tracker(save_dir)
    committed = [c for c in checkpoints if c.state == "committed" and isinstance(c.iteration, int)]
    newest = max((c.iteration for c in committed), default=None)

    deleted, intact_newer = [], 0
    for c in committed:                       # newest first
        if c.kind != "full":
            continue
        if intact_newer < keep_last_n:
            intact_newer += not verify_checkpoint(c.path, deep=False)
        elif c.iteration not in protect and c.iteration != tracker_iteration:
            _delete(c.path, os.path.join(save_dir, tmp_dir_name(c.iteration)))
            deleted.append(c.iteration)

    for c in checkpoints:
        stale_tmp = c.state == "incomplete" and newest is not None and isinstance(c.iteration, int) \
            and c.iteration < newest
        if stale_tmp or c.state == "replaced":
            shutil.rmtree(c.path, ignore_errors=True)   # an asynchronous commit may remove a stale copy too
    return sorted(deleted)
