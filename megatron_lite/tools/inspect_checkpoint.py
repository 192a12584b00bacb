"""What a checkpoint holds, its parallel layout, and whether it is intact.

    python -m megatron_lite.tools.inspect_checkpoint DIR [--json]

DIR is a save directory (every checkpoint in it is described, with the tracker and any
leftovers of unfinished saves) or one iteration directory. Every checksum is read. The exit
status is 1 when a committed checkpoint fails its checks, or when DIR is one iteration
directory that is not committed; leftovers in a save directory are reported, not failures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from megatron_lite.checkpoint.formats import (FORMAT_NAMES, OWN_FORMAT, detect_format, foreign_problems,
                                              format_module)
from megatron_lite.checkpoint.io.integrity import committed_metadata, verify_checkpoint
from megatron_lite.checkpoint.io.layout import (BEST_FILENAME, DISTRIB_OPTIM_FILENAME, METADATA_FILENAME,
                                                MODEL_FILENAME, format_iteration, parse_dir_name)
from megatron_lite.checkpoint.recovery import find_checkpoints, human_bytes, read_tracker
from megatron_lite.checkpoint.io.storage import RESERVED_METADATA_KEYS

# Top-level keys of model_optim_rng.pt and what they mean (Megatron-LM's names).
_HOLDINGS = (("weights", ("model",)), ("optimizer", ("optimizer",)),
             ("LR scheduler", ("opt_param_scheduler", "lr_scheduler")), ("RNG", ("rng_state",)))


def _model_config(meta: dict) -> Optional[dict]:
    """The model section of the config recorded in metadata.json, wherever the saver put it."""
    config = meta.get("config") or meta.get("args")
    if not isinstance(config, dict):
        return None
    model = config.get("model", config)
    return model if isinstance(model, dict) else None


def _count_tensors(obj) -> tuple:
    """(number of tensors, number of elements) anywhere inside `obj`."""
    if isinstance(obj, torch.Tensor):
        return 1, obj.numel()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    counts = [_count_tensors(v) for v in items]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def _shard_contents(iter_dir: str, relpaths: List[str]) -> dict:
    """Top-level keys of each model_optim_rng.pt and the tensors of each distrib_optim.pt, read
    memory-mapped (tensor data stays on disk)."""
    keys, model_tensors, model_elements, optimizer_elements, errors = set(), 0, 0, 0, []
    for relpath in relpaths:
        if os.path.basename(relpath) not in (MODEL_FILENAME, DISTRIB_OPTIM_FILENAME):
            continue
        try:
            shard = torch.load(os.path.join(iter_dir, relpath), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:   # a damaged file: reported, the rest is still described
            errors.append(f"{relpath} cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        if not isinstance(shard, dict):
            errors.append(f"{relpath} holds a {type(shard).__name__}, not a dict")
            continue
        if os.path.basename(relpath) == DISTRIB_OPTIM_FILENAME:
            optimizer_elements += _count_tensors(shard)[1]
            continue
        keys |= set(shard)
        n, e = _count_tensors({k: v for k, v in shard.items() if k.startswith("model")})
        model_tensors, model_elements = model_tensors + n, model_elements + e
    return {"keys": sorted(keys), "model_tensors": model_tensors, "model_elements": model_elements,
            "optimizer_elements": optimizer_elements, "errors": errors}


def describe_megatron(iter_dir: str, fmt: str) -> dict:
    """The report of a checkpoint in one of Megatron-LM's formats: read from its args (these
    formats carry no checksums, so "intact" means every file is there and readable)."""
    problems = foreign_problems(fmt, iter_dir)
    info = {"path": iter_dir, "name": os.path.basename(os.path.normpath(iter_dir)), "format": FORMAT_NAMES[fmt],
            "intact": not problems, "problems": problems}
    if problems:
        return info
    try:
        meta = format_module(fmt).open_checkpoint(iter_dir).metadata
    except Exception as e:   # unreadable args: reported as the problem
        info.update(intact=False, problems=[f"cannot be read: {e}"])
        return info
    par = meta.get("parallel", {})
    names = [os.path.join(root, n) for root, _, files in os.walk(iter_dir) for n in files]
    holds = ["weights"] + [what for what, key in (("optimizer", "has_optimizer"), ("RNG", "has_rng")) if meta.get(key)]
    info.update({
        "iteration": meta.get("iteration"), "kind": "full", "saved_at": None,
        "layout": {"tensor_model_parallel_size": par.get("tp"), "pipeline_model_parallel_size": par.get("pp"),
                   "data_parallel_size": par.get("dp")},
        "model_config": meta.get("config", {}).get("model"), "other_metadata": [], "holds": holds, "other_keys": [],
        "progress": meta.get("progress"), "files": len(names), "total_bytes": sum(os.path.getsize(n) for n in names)})
    return info


def describe(iter_dir: str) -> dict:
    """Everything the tool reports about one iteration directory, checksums included."""
    fmt = detect_format(iter_dir)
    if fmt != OWN_FORMAT:
        return describe_megatron(iter_dir, fmt)
    problems = verify_checkpoint(iter_dir, deep=True)
    meta, _ = committed_metadata(iter_dir)
    info = {"path": iter_dir, "name": os.path.basename(os.path.normpath(iter_dir)), "intact": not problems,
            "problems": problems}
    if meta is None:
        return info
    files = meta["files"]
    contents = _shard_contents(iter_dir, sorted(files))
    keys = set(contents["keys"])
    holds = [name for name, names in _HOLDINGS if any(k.startswith(n) for k in keys for n in names)]
    distrib = sorted(r for r in files if os.path.basename(r) == DISTRIB_OPTIM_FILENAME)
    if distrib and "optimizer" not in holds:
        holds.append("optimizer")
    known = {n for _, names in _HOLDINGS for n in names}
    info.update({
        "iteration": meta.get("iteration"), "kind": meta.get("kind"), "saved_at": meta.get("saved_at"),
        "validation": meta.get("validation"),
        "layout": meta.get("layout"), "model_config": _model_config(meta),
        "other_metadata": sorted(k for k in meta if k not in RESERVED_METADATA_KEYS and k != "config"),
        "holds": holds, "other_keys": sorted(k for k in keys if not any(k.startswith(n) for n in known)),
        "model_tensors": contents["model_tensors"], "model_elements": contents["model_elements"],
        "distributed_optimizer_shards": len(distrib), "distributed_optimizer_elements": contents["optimizer_elements"],
        "files": len(files), "total_bytes": sum(e.get("size", 0) for e in files.values() if isinstance(e, dict)),
    })
    if not problems:   # files whose checksums match but that torch.load cannot read
        info["problems"] = contents["errors"]
        info["intact"] = not contents["errors"]
    return info


def _print_checkpoint(info: dict) -> None:
    print(f"{info['name']}  ({info['path']})")
    if "format" in info:
        print(f"  format         {info['format']}")
    if "iteration" in info:
        par = info["layout"] or {}
        print(f"  iteration      {info['iteration']}")
        print(f"  kind           {info['kind']}" + (f", saved {info['saved_at']}" if info["saved_at"] else ""))
        print(f"  parallel       TP {par.get('tensor_model_parallel_size')} x PP "
              f"{par.get('pipeline_model_parallel_size')} x DP {par.get('data_parallel_size')}")
        if info["model_config"]:
            print("  model config   " + " ".join(f"{k}={v}" for k, v in info["model_config"].items()))
        counts = (f" ({info['model_tensors']} weight tensors, {info['model_elements']:,} elements"
                  + (f"; {info['distributed_optimizer_shards']} distributed-optimizer shards, "
                     f"{info['distributed_optimizer_elements']:,} elements" if
                     info["distributed_optimizer_shards"] else "") + ")") if "model_tensors" in info else ""
        print(f"  holds          {', '.join(info['holds']) or 'nothing recognised'}{counts}")
        if info.get("validation"):
            v = info["validation"]
            print(f"  validation     lm loss {v['lm loss']:.6E} (evaluated at iteration {v['iteration']})")
        if info.get("progress"):
            print("  progress       " + " ".join(f"{k}={v}" for k, v in info["progress"].items()))
        if info["other_keys"]:
            print(f"  other keys     {', '.join(info['other_keys'])}")
        if info["other_metadata"]:
            print(f"  metadata       {', '.join(info['other_metadata'])}")
        print(f"  files          {info['files']}, {human_bytes(info['total_bytes'])}")
    intact = "complete (this format has no checksums)" if "format" in info else "intact, every checksum verified"
    print("  integrity      " + (intact if info["intact"] else "FAILED"))
    for p in info["problems"]:
        print(f"    {p}")


def inspect_dir(path: str) -> dict:
    """The report for a save directory or a single iteration directory."""
    path = os.path.normpath(path)
    single = parse_dir_name(os.path.basename(path)) is not None or os.path.isfile(os.path.join(path, METADATA_FILENAME))
    if single:
        return {"save_dir": None, "tracker": None, "best": None, "checkpoints": [describe(path)], "leftovers": []}
    tracker, tracker_problem = read_tracker(path)
    best, _ = read_tracker(path, BEST_FILENAME)
    found = find_checkpoints(path)
    return {"save_dir": path,
            "tracker": format_iteration(tracker) if tracker is not None else f"({tracker_problem})",
            "best": format_iteration(best) if best is not None else None,
            "checkpoints": [describe(c.path) for c in found if c.state == "committed"],
            "leftovers": [{"name": c.name, "state": c.state, "bytes": c.size_bytes}
                          for c in found if c.state != "committed"]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("dir", help="a save directory (--save/--load) or one iter_XXXXXXX directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.dir):
        parser.error(f"{args.dir} is not a directory")
    report = inspect_dir(args.dir)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        if report["save_dir"] is not None:
            best = f", best (lowest validation loss) {report['best']}" if report["best"] else ""
            print(f"save directory {report['save_dir']}: tracker names {report['tracker']}{best}, "
                  f"{len(report['checkpoints'])} committed checkpoints")
        for info in report["checkpoints"]:
            _print_checkpoint(info)
        for left in report["leftovers"]:
            what = "a save that did not finish" if left["state"] == "incomplete" else "a stale copy of a re-save"
            print(f"{left['name']}: leftover of {what}, {human_bytes(left['bytes'])} (never loaded)")
    return 0 if all(c["intact"] for c in report["checkpoints"]) else 1


if __name__ == "__main__":
    sys.exit(main())
