"""Run a test body in N gloo processes on CPU and collect what each rank returns.

One `spawn` per call: put several checks inside one body where you can, since starting
8 ranks costs seconds on a 2-core machine.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args):
    """Call fn(rank, world_size, *args) in `world_size` processes; return the list of results.

    fn must be a module-level function (it is pickled); results must be torch.save-able.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        try:
            mp.spawn(_worker, args=(world_size, port, fn, args, out_dir), nprocs=world_size, join=True)
        except Exception:
            errors = []
            for r in range(world_size):
                p = os.path.join(out_dir, f"rank{r}.pt")
                if os.path.exists(p):
                    res = torch.load(p, weights_only=False)
                    if not res["ok"]:
                        errors.append(f"rank {r}:\n{res['error']}")
            raise RuntimeError("distributed test failed\n" + "\n".join(errors))
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)["result"]
                for r in range(world_size)]
