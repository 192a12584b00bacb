"""Checkpoint save and load bandwidth of megatron_lite against the raw disk, torch.save and
torch.distributed.checkpoint, all in one run on the same disk.

The state is the reference model's (bench/common.py) full training state after one megatron_lite
train_step on the GPU: bf16 weights, fp32 main params and both Adam moments, LR scheduler and
counters. GB/s is the bytes of its tensors (the same numerator for every row; dd's own byte count
for dd) over the seconds the operation took; 1 GB = 1e9 bytes. Every write is durable when its
time stops (dd with O_DIRECT; fsync for the others), and every read starts from a cold page cache
(`echo 3 > /proc/sys/vm/drop_caches`, or where that is not permitted posix_fadvise(DONTNEED) on
the files read; the output says which, or "page cache not dropped").

    dd oflag=direct / iflag=direct   dd if=/dev/zero bs=64M of the same size, and back (conv=fsync
                                     and a plain read where the filesystem refuses O_DIRECT)
    megatron_lite save_checkpoint    CheckpointManager.save: the synchronous save of pretrain_gpt.py (tensors streamed from
                                     the GPU through pinned chunks, checksummed and written in
                                     parallel, fsync, commit)
    megatron_lite decide_load + restore   CheckpointManager.decide and .restore: the load of pretrain_gpt.py: choose the checkpoint, read
                                     and checksum this rank's shard once, then weights and
                                     optimizer state into the GPU run (the note splits the time)
    megatron_lite load_file          the raw read: storage.load_file of the shard to CPU (read once
                                     with its checksum, tensors built on the read memory)
    megatron_lite read_file MODE xN  fastio.read_file of the same shard with each read strategy
                                     (MEGATRON_LITE_CKPT_READ=sequential|parallel|direct) and N
                                     threads (--read-threads): the bytes and their CRC-32, nothing
                                     else, so the fastest row names the default for this disk
    megatron_lite async save (1st, 2nd)   --async-save (AsyncSaver): "blocked" until CheckpointManager.save
                                     returns and training may go on, "committed" until finalize() has
                                     the checkpoint on disk; the first save also allocates the pinned
                                     host buffers that later saves reuse (--use-persistent-ckpt-worker)
    torch.save + fsync / torch.load  of the same tensors, one file; loaded to CPU with weights_only
    dcp.save / dcp.load              torch.distributed.checkpoint in one process without a process
                                     group; loaded in place into the live (GPU) state

The measurements run in this order; with --budget-s those that would start after the budget is
spent are reported as skipped.

    python bench/checkpoint_io.py [--dir PARENT] [--budget-s 270] [--page-cache drop|fadvise|keep]
                                  [--read-threads 4,8,16]
    python bench/checkpoint_io.py --tiny        # 2-layer model on a CPU
    python bench/checkpoint_io.py --num-layers 1 --seq-length 256   # the reference width, ~2.5 GB of state

Files go to a fresh directory under --dir (default: the current directory, which should be on the
disk being measured, not a tmpfs) that is removed at the end. Prints a table with the ratios of
megatron_lite's rows to dd, torch.save/torch.load and dcp; writes checkpoint_io.json to $OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from bench.common import (REFERENCE, TINY, ModelDims, bench_device, build_megatron_lite_run, environment,  # noqa: E402
                          format_number, format_table, megatron_lite_flags, mock_batches, synchronize, write_json)
from megatron_lite.checkpoint.io import fastio, layout  # noqa: E402
from megatron_lite.checkpoint.io.async_save import AsyncSaver  # noqa: E402
from megatron_lite.checkpoint.manager import CheckpointManager  # noqa: E402
from megatron_lite.checkpoint.io.storage import load_file  # noqa: E402
from megatron_lite.training import train_step  # noqa: E402

GB = 1e9


# --------------------------------------------------------------------------------- the disk

def tensor_bytes(obj) -> int:
    """Bytes of the distinct tensor storages in a nested dict/list (what any format must write)."""
    seen: Dict[int, int] = {}

    def visit(o):
        if isinstance(o, torch.Tensor):
            seen[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        elif isinstance(o, dict):
            for v in o.values():
                visit(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v)

    visit(obj)
    return sum(seen.values())


def filesystem_of(path: str) -> dict:
    """Mount point, filesystem type and device that hold `path` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best = {"mount": "/", "type": "unknown", "device": "unknown"}
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best["mount"]):
                    best = {"mount": mount, "type": fstype, "device": device}
    except OSError:
        pass
    return best


def files_under(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(root, n) for root, _, names in os.walk(path) for n in names]


def remove(path: str) -> None:
    """Delete a file or directory if it is there (a measurement skipped by the budget wrote nothing)."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def drop_page_cache(path: str, mode: str) -> str:
    """Evict `path`'s pages before a read: drop_caches (root), else fadvise DONTNEED per file.
    Returns what was done, for the report."""
    if mode == "keep":
        return "page cache not dropped (--page-cache keep)"
    os.sync()
    refused = ""
    if mode == "drop":
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "page cache dropped (drop_caches)"
        except OSError as e:
            refused = f"drop_caches refused ({e.strerror}); "
    try:
        for name in files_under(path):
            fd = os.open(name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return refused + "page cache of the files evicted (fadvise DONTNEED)"
    except (OSError, AttributeError) as e:
        return refused + f"page cache not dropped (fadvise failed: {e})"


def run_dd(args: List[str], fallback: List[str]) -> tuple:
    """(seconds, note): dd with O_DIRECT, or with `fallback` flags instead where that is refused."""
    start = time.perf_counter()
    done = subprocess.run(["dd", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode == 0:
        return seconds, ""
    why = (done.stderr.strip().splitlines() or ["no message"])[0]
    plain = [a for a in args if not a.endswith("=direct")] + fallback
    start = time.perf_counter()
    subprocess.run(["dd", *plain], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, f"O_DIRECT refused ({why}): dd {' '.join(plain)}"


# ------------------------------------------------------------------------------ measuring

class Results:
    """Rows of (name, op, seconds, bytes); skips what is left once --budget-s is spent."""

    def __init__(self, budget_s: Optional[float], on_row: Callable[[], None]):
        self.rows: List[dict] = []
        self.start, self.budget_s, self.on_row = time.monotonic(), budget_s, on_row

    def measure(self, name: str, op: str, nbytes: int, fn: Callable[[], object], note: str = "") -> None:
        """Time fn(); a string it returns is appended to the row's note, anything else is dropped."""
        if self.over_budget(name, op, nbytes):
            return
        start = time.perf_counter()
        extra = fn()
        seconds = time.perf_counter() - start
        self.add(name, op, seconds, nbytes, "; ".join(x for x in (note, extra) if isinstance(x, str) and x))

    def over_budget(self, name: str, op: str, nbytes: int) -> bool:
        """True, after adding a 'skipped' row, once the time budget is spent."""
        if self.budget_s is None or time.monotonic() - self.start <= self.budget_s:
            return False
        self.add(name, op, None, nbytes, f"skipped: the --budget-s {self.budget_s:g} s was spent")
        return True

    def add(self, name: str, op: str, seconds: Optional[float], nbytes: int, note: str = "") -> None:
        gbps = nbytes / seconds / GB if seconds and op in ("write", "read", "committed") else None
        self.rows.append({"name": name, "op": op, "seconds": seconds, "bytes": nbytes, "gb_per_s": gbps,
                          "note": note})
        print(f"{name} [{op}]: " + (f"{seconds:.3f} s" if seconds is not None else "-") +
              (f", {gbps:.2f} GB/s" if gbps else "") + (f" ({note})" if note else ""), flush=True)
        self.on_row()

    def find(self, name: str, op: str) -> Optional[dict]:
        return next((r for r in self.rows if r["name"] == name and r["op"] == op and r["seconds"]), None)


def add_ratios(results: Results) -> None:
    """megatron_lite's rows over dd, torch and dcp of the same direction (bandwidth ratios)."""
    baselines = {"write": ("dd oflag=direct", "torch.save + fsync", "dcp.save"),
                 "committed": ("dd oflag=direct", "torch.save + fsync", "dcp.save"),
                 "read": ("dd iflag=direct", "torch.load", "dcp.load")}
    for r in results.rows:
        if r["gb_per_s"] is None:
            continue
        direction = "write" if r["op"] in ("write", "committed") else "read"
        dd, torch_row, dcp_row = (results.find(n, direction) for n in baselines[r["op"]])
        if r["name"].startswith("dd "):
            continue
        r["vs_dd"] = r["gb_per_s"] / dd["gb_per_s"] if dd else None
        if r["name"].startswith("megatron_lite"):
            r["vs_torch"] = r["gb_per_s"] / torch_row["gb_per_s"] if torch_row else None
            r["vs_dcp"] = r["gb_per_s"] / dcp_row["gb_per_s"] if dcp_row else None


def report(results: Results) -> str:
    def ratio(r, key):
        return f"{r[key]:.2f}x" if r.get(key) else "-"

    table = [[r["name"], r["op"], format_number(r["seconds"]), format_number(r["gb_per_s"]),
              ratio(r, "vs_dd"), ratio(r, "vs_torch"), ratio(r, "vs_dcp")] for r in results.rows]
    notes = sorted({r["note"] for r in results.rows if r["note"]})
    return format_table(["measurement", "op", "seconds", "GB/s", "vs dd", "vs torch", "vs dcp"], table) + \
        "".join(f"\n  note: {n}" for n in notes)


# ------------------------------------------------------------------------------ the run

def training_state(run) -> dict:
    """The tensors a full megatron_lite checkpoint holds, as one dict for torch.save and dcp."""
    return {"model": run.module.state_dict(), "optimizer": run.optimizer.state_dict(),
            "opt_param_scheduler": run.scheduler.state_dict(), "progress": run.progress.state_dict()}


def measure_dd(results: Results, work: str, nbytes: int, bs_mib: int, cache: Callable[[str], str]) -> None:
    path, count = os.path.join(work, "dd.bin"), math.ceil(nbytes / (bs_mib << 20))
    dd_bytes = count * (bs_mib << 20)
    results.measure("dd oflag=direct", "write", dd_bytes, lambda: run_dd(
        ["if=/dev/zero", f"of={path}", f"bs={bs_mib}M", f"count={count}", "oflag=direct"], ["conv=fsync"])[1])
    results.measure("dd iflag=direct", "read", dd_bytes, lambda: run_dd(
        [f"if={path}", "of=/dev/null", f"bs={bs_mib}M", "iflag=direct"], [])[1], cache(path))
    remove(path)


def measure_megatron_lite(results: Results, run, work: str, nbytes: int, cache: Callable[[str], str]) -> str:
    """save_checkpoint, then the load of pretrain_gpt.py; returns the checkpoint directory (kept for load_file)."""
    cfg, directory = run.cfg, os.path.join(work, "megatron_lite")
    cfg.checkpoint.save, cfg.checkpoint.load = directory, None
    results.measure("megatron_lite save_checkpoint", "write", nbytes,
                    lambda: CheckpointManager(cfg, run.state).save(run))
    cfg.checkpoint.save, cfg.checkpoint.load = None, directory

    def load_as_pretrain() -> str:
        start = time.perf_counter()
        checkpoints = CheckpointManager(cfg, run.state)
        checkpoints.decide()
        chosen = time.perf_counter()
        checkpoints.restore(run)
        synchronize(run.state.device)
        return f"decide_load {chosen - start:.2f} s (reads and verifies the shard), " \
               f"restore {time.perf_counter() - chosen:.2f} s"

    results.measure("megatron_lite decide_load + restore", "read", nbytes, load_as_pretrain, cache(directory))
    return directory


def measure_load_file(results: Results, run, directory: str, nbytes: int, cache: Callable[[str], str],
                      read_threads: List[int]) -> None:
    """The raw read of the shard that measure_megatron_lite saved, by load_file and then by each read
    strategy with each of `read_threads`; the directory is removed after."""
    if os.path.isdir(directory):
        shard = layout.model_shard_path(0, 0)
        results.measure("megatron_lite load_file", "read", nbytes,
                        lambda: load_file(directory, run.progress.iteration, shard), cache(directory))
        path = os.path.join(layout.resolve_iteration_dir(directory, run.progress.iteration), shard)
        strategies = ([fastio.ReadStrategy("sequential", fastio.IO_THREADS)] if read_threads else []) + [
            fastio.ReadStrategy(mode, n) for mode in ("parallel", "direct") for n in read_threads]
        for strategy in strategies:
            name = f"megatron_lite read_file {strategy.mode} x{strategy.threads}"
            results.measure(name, "read", nbytes, lambda: fastio.read_file(path, strategy=strategy), cache(path))
    remove(directory)


def measure_async_saves(results: Results, run, work: str, nbytes: int) -> None:
    """Two --async-save saves: blocked until CheckpointManager.save returns, committed when finalized."""
    cfg = run.cfg
    cfg.checkpoint.save, cfg.checkpoint.load = os.path.join(work, "async"), None
    checkpoints = CheckpointManager(cfg, run.state)
    checkpoints.async_saver = AsyncSaver(persistent=True)   # --async-save --use-persistent-ckpt-worker
    for label in ("1st", "2nd"):
        name = f"megatron_lite async save ({label})"
        if results.over_budget(name, "committed", nbytes):
            continue
        run.progress.iteration += 1
        start = time.perf_counter()
        checkpoints.save(run)
        results.add(name, "blocked", time.perf_counter() - start, nbytes)
        checkpoints.finish()
        results.add(name, "committed", time.perf_counter() - start, nbytes)
        remove(cfg.checkpoint.save)


def measure_torch_and_dcp(results: Results, state: dict, work: str, nbytes: int, cache: Callable[[str], str],
                          device: torch.device) -> None:
    """torch.save (+ fsync) / torch.load to CPU, then dcp.save / dcp.load in place, of `state`."""
    path = os.path.join(work, "state.pt")

    def torch_save():
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    results.measure("torch.save + fsync", "write", nbytes, torch_save)
    results.measure("torch.load", "read", nbytes, lambda: torch.load(path, map_location="cpu", weights_only=True),
                    cache(path))
    remove(path)

    directory = os.path.join(work, "dcp")

    def dcp_load():
        dcp.load(state, checkpoint_id=directory)
        synchronize(device)

    results.measure("dcp.save", "write", nbytes, lambda: dcp.save(state, checkpoint_id=directory))
    results.measure("dcp.load", "read", nbytes, dcp_load, cache(directory))
    remove(directory)


def bench(args, work: str, results: Results, info: dict) -> None:
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")   # one process, on purpose
    dims = model_dims(args)
    device = bench_device()
    run = build_megatron_lite_run(megatron_lite_flags(dims, train_iters=10, clip_grad=1.0,
                                                      extra=shlex.split(args.megatron_lite_flags)))
    train_step(run, itertools.cycle(mock_batches(dims, 1, device)))   # creates the Adam moments
    run.progress.iteration = 1
    state = training_state(run)
    nbytes = tensor_bytes(state)
    info.update(state_bytes=nbytes, weight_bytes=tensor_bytes(state["model"]),
                optimizer_bytes=tensor_bytes(state["optimizer"]))
    del state   # restore() replaces the Adam moments: take the state again after it
    print(f"state: {nbytes / GB:.2f} GB ({info['weight_bytes'] / GB:.2f} GB bf16 weights, "
          f"{info['optimizer_bytes'] / GB:.2f} GB fp32 main params and Adam moments) in {work} "
          f"({info['filesystem']['type']} on {info['filesystem']['device']})", flush=True)
    free = shutil.disk_usage(work).free
    if free < 1.2 * nbytes:
        raise SystemExit(f"{work} has {free / GB:.1f} GB free but the benchmark needs {1.2 * nbytes / GB:.1f} GB; "
                         f"pass --dir on a larger disk")

    def cache(path: str) -> str:
        return drop_page_cache(path, args.page_cache)

    measure_dd(results, work, nbytes, args.dd_bs_mib, cache)
    directory = measure_megatron_lite(results, run, work, nbytes, cache)
    measure_load_file(results, run, directory, nbytes, cache, args.read_threads)
    measure_async_saves(results, run, work, nbytes)
    measure_torch_and_dcp(results, training_state(run), work, nbytes, cache, device)


def model_dims(args) -> ModelDims:
    """TINY or REFERENCE, with --num-layers / --seq-length where given (a smaller state of the same width)."""
    dims = TINY if args.tiny else REFERENCE
    changes = {k: v for k, v in (("num_layers", args.num_layers), ("seq_length", args.seq_length)) if v}
    return dataclasses.replace(dims, **changes)


class Stopped(Exception):
    """SIGTERM arrived (a time limit): stop measuring, remove the scratch directory, report."""


def stop(signum, frame):
    raise Stopped(f"stopped by signal {signum}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the 2-layer model of bench/common.py (runs on a CPU)")
    p.add_argument("--dir", default=".", help="parent of the scratch directory (on the disk to measure)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the measurements that would start after this many seconds")
    p.add_argument("--page-cache", choices=["drop", "fadvise", "keep"], default="drop",
                   help="before reads: drop_caches (falls back to fadvise), fadvise DONTNEED on the files, or keep")
    p.add_argument("--megatron-lite-flags", default="",
                   help="more pretrain_gpt.py flags for the run whose state is saved, e.g. '--no-fused-kernels'")
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers than the model's, for a smaller state")
    p.add_argument("--seq-length", type=int, default=None, help="a shorter sequence for the one training step")
    p.add_argument("--dd-bs-mib", type=int, default=None, help="dd block size in MiB (64; 1 with --tiny)")
    p.add_argument("--read-threads", default=None,
                   help="thread counts for the read_file rows of the parallel and direct strategies, e.g. 4,8,16 "
                        "(the default; none with --tiny); an empty string leaves those rows out")
    args = p.parse_args(argv)
    text = args.read_threads if args.read_threads is not None else ("" if args.tiny else "4,8,16")
    try:
        args.read_threads = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        p.error(f"--read-threads {text!r}: give thread counts separated by commas, e.g. 4,8,16")
    if any(n < 1 for n in args.read_threads):
        p.error(f"--read-threads {text!r}: thread counts must be positive")
    args.dd_bs_mib = args.dd_bs_mib or (1 if args.tiny else 64)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = bench_device()
    env = environment(device)
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="checkpoint_io_", dir=args.dir)
    info = {"environment": env, "model": dataclasses.asdict(model_dims(args)), "directory": work,
            "filesystem": filesystem_of(work), "page_cache": args.page_cache, "dd_block_mib": args.dd_bs_mib}
    print(f"{env['date']} | {env['device']} | torch {env['torch']} (CUDA {env['cuda']})", flush=True)

    def save_json():
        write_json("checkpoint_io.json", {**info, "rows": results.rows})

    results = Results(args.budget_s, save_json)
    status = 0
    signal.signal(signal.SIGTERM, stop)
    try:
        bench(args, work, results, info)
    except Exception:   # report what was measured before the failure (or the time limit's SIGTERM)
        traceback.print_exc()
        status = 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    add_ratios(results)
    save_json()
    print("\n" + report(results), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
