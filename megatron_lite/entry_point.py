"""What every command-line entry point (pretrain_gpt.py, megatron_lite.tools.generate) does around its work: a
mistake ends it with one line on rank 0's stderr and an exit code, never a traceback per rank.

Every rank finds the same problem (the checks depend only on flags and shared files, and a
non-finite loss is the reduced one), so only rank 0 says it:
    ConfigError, CheckpointLoadError   a bad flag, YAML file, dataset or checkpoint   exit 2
    NonFiniteLossError                 --check-for-nan-in-loss-and-grad stopped       exit 3
The process group is destroyed on the way out, whatever happened.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import torch.distributed as dist

from megatron_lite.arguments import ConfigError
from megatron_lite.checkpoint.recovery import CheckpointLoadError
from megatron_lite.training import NonFiniteLossError

EXIT_CODES = ((ConfigError, 2), (CheckpointLoadError, 2), (NonFiniteLossError, 3))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def run_entry_point(name: str, body: Callable[[], Optional[int]]) -> int:
    """body()'s exit code (None: 0), or the code of the mistake it raised, said in one line."""
    try:
        return body() or 0
    except tuple(error for error, _ in EXIT_CODES) as e:
        if rank() == 0:
            print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        return next(code for error, code in EXIT_CODES if isinstance(e, error))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
