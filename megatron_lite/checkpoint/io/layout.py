"""Names of everything a checkpoint puts on disk, in Megatron-LM's layout.

```
<save>/latest_checkpointed_iteration.txt          "100" (or "release"); names the newest full checkpoint
<save>/iter_0000100/metadata.json                 written last: its presence means the save committed
<save>/iter_0000100/mp_rank_00_000/model_optim_rng.pt        (tp, pp) shard
<save>/iter_0000100/mp_rank_00_000_001/distrib_optim.pt      distributed-optimizer shard of (tp, pp, dp)
<save>/iter_0000100.tmp-<token>/                  a save in progress (or one that died): never loaded
<save>/iter_0000100.old/                          the previous copy while iter_0000100 is being replaced
```
Iteration "release" maps to the directory `release` (Megatron's name for converted checkpoints).
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Optional, Tuple, Union

Iteration = Union[int, str]   # an iteration number, or RELEASE

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
BEST_FILENAME = "best_checkpointed_iteration.txt"   # the full checkpoint with the lowest validation loss
METADATA_FILENAME = "metadata.json"
MODEL_FILENAME = "model_optim_rng.pt"
DISTRIB_OPTIM_FILENAME = "distrib_optim.pt"
RELEASE = "release"

TMP_SUFFIX = ".tmp"
REPLACED_SUFFIX = ".old"

_ITER_DIR = re.compile(r"^(?:iter_(\d{7,})|(release))(\.tmp(?:-[0-9a-f]+)?|\.old)?$")
_SHARD_DIR = re.compile(r"^mp_rank_(\d{2,})_(\d{3,})(?:_(\d{3,}))?$")
_DONE_MARKER = re.compile(r"^rank_(\d{5,})\.done$")


def is_iteration_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' and other digits that int() refuses."""
    return text.isascii() and text.isdigit()


def check_iteration(iteration: Iteration) -> None:
    """Raise ValueError unless `iteration` is a non-negative int or RELEASE."""
    if iteration == RELEASE:
        return
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"checkpoint iteration must be a non-negative int or {RELEASE!r}, got {iteration!r}")


def iteration_dir_name(iteration: Iteration) -> str:
    """`iter_0000100` for 100, `release` for RELEASE."""
    check_iteration(iteration)
    return RELEASE if iteration == RELEASE else f"iter_{iteration:07d}"


def tmp_dir_name(iteration: Iteration, token: str = "") -> str:
    """Where a save of `iteration` is written before it is renamed to `iteration_dir_name`;
    `token` (the run's, io/lock.py) makes it the writing run's own."""
    return iteration_dir_name(iteration) + TMP_SUFFIX + (f"-{token}" if token else "")


def replaced_dir_name(iteration: Iteration) -> str:
    """Where a committed `iteration` waits while a new save of the same iteration takes its name."""
    return iteration_dir_name(iteration) + REPLACED_SUFFIX


def parse_dir_name(name: str) -> Optional[Tuple[Iteration, str]]:
    """(iteration, state) for a checkpoint directory name, state in {"committed", "tmp", "old"}; else None."""
    m = _ITER_DIR.match(name)
    if m is None:
        return None
    iteration: Iteration = int(m.group(1)) if m.group(1) is not None else RELEASE
    suffix = m.group(3)
    state = "committed" if suffix is None else "old" if suffix == REPLACED_SUFFIX else "tmp"
    return iteration, state


def format_iteration(iteration: Optional[Iteration]) -> str:
    """How reports print an iteration: `iter_0000100`, `release`, or `none`."""
    return "none" if iteration is None else iteration_dir_name(iteration)


def model_shard_path(tp_rank: int, pp_rank: int) -> str:
    """Relative path of the (tp, pp) model/optimizer/RNG shard: `mp_rank_00_000/model_optim_rng.pt`."""
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}/{MODEL_FILENAME}"


def distrib_optim_shard_path(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """Relative path of one DP rank's distributed-optimizer shard: `mp_rank_00_000_001/distrib_optim.pt`."""
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}_{dp_rank:03d}/{DISTRIB_OPTIM_FILENAME}"


def parse_shard_dir(name: str) -> Optional[Tuple[int, int, Optional[int]]]:
    """(tp, pp, dp or None) for `mp_rank_TT_PPP[_DDD]`, else None."""
    m = _SHARD_DIR.match(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), None if m.group(3) is None else int(m.group(3))


def done_marker_name(rank: int) -> str:
    """The file an asynchronous save's rank writes into the temporary directory once its files are durable."""
    return f"rank_{rank:05d}.done"


def parse_done_marker(name: str) -> Optional[int]:
    m = _DONE_MARKER.match(name)
    return None if m is None else int(m.group(1))


def tracker_path(save_dir: str) -> str:
    return os.path.join(save_dir, TRACKER_FILENAME)


def tracker_tmp_path(save_dir: str, name: str = TRACKER_FILENAME) -> str:
    """A tracker's new content is written here, fsynced, then renamed over the tracker."""
    return os.path.join(save_dir, "." + name + TMP_SUFFIX + "-" + uuid.uuid4().hex[:12])   # this write's own


def check_relpath(relpath: str) -> None:
    """Raise ValueError unless `relpath` is a plain relative file path inside an iteration directory."""
    parts = relpath.split("/") if isinstance(relpath, str) else [""]
    if any(p in ("", ".", "..") for p in parts) or "\\" in relpath:
        raise ValueError(f"checkpoint file name {relpath!r} must be a relative path with '/' separators and "
                         f"no '.', '..' or empty parts, e.g. {model_shard_path(0, 0)!r}")
    if relpath == METADATA_FILENAME or parse_done_marker(parts[-1]) is not None:
        raise ValueError(f"checkpoint file name {relpath!r} is reserved for the checkpoint's own bookkeeping; "
                         f"pick another name")


def resolve_iteration_dir(load_dir: str, iteration: Iteration) -> str:
    """The directory that holds committed `iteration`.

    Normally `iter_XXXXXXX`; if a save that replaced the same iteration died between its two
    renames, the only committed copy is `iter_XXXXXXX.old`, and that is returned.
    """
    path = os.path.join(load_dir, iteration_dir_name(iteration))
    old = os.path.join(load_dir, replaced_dir_name(iteration))
    if not os.path.isdir(path) and os.path.isdir(old):
        return old
    return path
