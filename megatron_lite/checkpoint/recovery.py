"""Which checkpoint to load: find them, check them, choose, and say why in one report.

`choose_checkpoint` gives every rank the same LoadPlan: rank 0 lists the directory and reads
the tracker and broadcasts what it saw; then for each candidate every rank checksums its
share of the files and the problems are gathered, so the decision is made from the same facts
everywhere. A damaged or incomplete checkpoint is never chosen.

A rank's share: when the checkpoint was saved at the current TP/PP/DP layout, the model files
(model_optim_rng.pt) of its own shard, which it loads in any mode; these it reads whole and
keeps in memory (integrity.keep_verified, held by the LoadPlan), so that storage.load_file
takes them without reading them again. Every other file is checksummed by one rank, in turn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_lite.checkpoint.formats import FORMAT_NAMES, OWN_FORMAT, detect_format, foreign_problems
from megatron_lite.checkpoint.io.integrity import (CheckpointIntegrityError, CheckpointMetadataError, VerifiedFile,
                                                check_files, committed_metadata, keep_verified, read_metadata)
from megatron_lite.checkpoint.io.layout import (BEST_FILENAME, MODEL_FILENAME, RELEASE, TRACKER_FILENAME, Iteration,
                                                format_iteration, is_iteration_number, iteration_dir_name, parse_dir_name, parse_shard_dir)
from megatron_lite.checkpoint.io.storage import all_gather_object, broadcast_object
from megatron_lite.parallel.state import ParallelState

INTACT = "intact, every checksum verified"
NOT_CHECKED = "not checked"
WEIGHTS_ONLY = "weights only: not used to resume"
WEIGHTS_ONLY_REASON = ("weights only: it has no optimizer state to resume from; load it with --finetune or "
                       "--pretrained-checkpoint")


class CheckpointLoadError(RuntimeError):
    """The requested checkpoint cannot be loaded; the message says why and what to do."""


@dataclass
class CheckpointInfo:
    name: str                  # directory name
    path: str
    iteration: Iteration
    state: str                 # "committed"; "incomplete" (temporary name); "replaced" (stale copy of a re-save)
    kind: Optional[str]        # "full" or "weights" from metadata.json; None when it cannot be read
    size_bytes: int
    saved_at: Optional[str] = None
    status: str = NOT_CHECKED  # set by choose_checkpoint: INTACT, NOT_CHECKED, or why it is not loaded
    format: str = OWN_FORMAT   # or one of Megatron-LM's (formats.MEGATRON_FORMATS)


@dataclass
class LoadPlan:
    load_dir: str
    iteration: Optional[Iteration]   # None: nothing to load
    iter_dir: Optional[str]
    reason: str                      # "tracker", "--ckpt-step", "fallback", or "none"
    kind: Optional[str] = None
    tracker_iteration: Optional[Iteration] = None
    rejected: List[Tuple[str, str]] = field(default_factory=list)   # (directory or file name, why)
    checkpoints: List[CheckpointInfo] = field(default_factory=list)
    metadata: Optional[dict] = None   # the chosen checkpoint's metadata.json
    verified_files: List[VerifiedFile] = field(default_factory=list)   # this rank's model files, read and kept
    format: str = OWN_FORMAT
    step_flag: str = "--ckpt-step"   # the flag that picks an iteration of load_dir, named in messages
    notes: List[str] = field(default_factory=list)   # more lines for the report (the local snapshots)


def _order_key(iteration: Iteration) -> int:
    return -1 if iteration == RELEASE else iteration


def bytes_on_disk(path: str) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total


def find_checkpoints(load_dir: str) -> List[CheckpointInfo]:
    """Committed checkpoints newest first (`release` after the numbered ones), then leftovers.

    Leftovers are incomplete saves (temporary name) and stale `.old` copies. An `.old` copy
    whose iteration has no final directory is the only committed copy of that iteration (a
    re-save died between its two renames) and is listed as committed.
    """
    if not os.path.isdir(load_dir):
        return []
    names = set(os.listdir(load_dir))
    found = []
    for name in names:
        parsed = parse_dir_name(name)
        path = os.path.join(load_dir, name)
        if parsed is None or not os.path.isdir(path):
            continue
        iteration, dir_state = parsed
        if dir_state == "tmp":
            state = "incomplete"
        elif dir_state == "old" and iteration_dir_name(iteration) in names:
            state = "replaced"
        else:
            state = "committed"
        kind, size, saved_at, fmt = None, None, None, OWN_FORMAT
        if state == "committed":
            fmt = detect_format(path)
        if fmt != OWN_FORMAT:
            kind = "full"
        elif state == "committed":
            try:
                meta = read_metadata(path)
                kind, saved_at = meta.get("kind"), meta.get("saved_at")
                size = sum(e.get("size", 0) for e in meta["files"].values() if isinstance(e, dict))
            except CheckpointMetadataError:
                pass
        found.append(CheckpointInfo(name, path, iteration, state, kind,
                                    bytes_on_disk(path) if size is None else size, saved_at, format=fmt))
    found.sort(key=lambda c: (c.state != "committed", -_order_key(c.iteration)))
    return found


def read_tracker(load_dir: str, name: str = TRACKER_FILENAME) -> Tuple[Optional[Iteration], Optional[str]]:
    """(iteration named by latest_checkpointed_iteration.txt, or by another tracker such as
    best_checkpointed_iteration.txt, None) or (None, what is wrong with it)."""
    try:
        with open(os.path.join(load_dir, name), encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot be read: {e}"
    if text == RELEASE:
        return RELEASE, None
    if is_iteration_number(text):
        return int(text), None
    return None, f"says {text!r}, which is not an iteration number"


def _model_file_ranks(relpath: str) -> Optional[Tuple[int, int]]:
    """(tp, pp) of a model_optim_rng.pt path, None for any other file."""
    shard_dir, _, name = relpath.partition("/")
    parsed = parse_shard_dir(shard_dir)
    return parsed[:2] if name == MODEL_FILENAME and parsed is not None and parsed[2] is None else None


def _own_model_files(meta: dict, state: Optional[ParallelState]) -> Tuple[List[str], List[str]]:
    """(model files this rank loads, model files some rank loads), when the checkpoint's layout is the
    current one; ([], []) otherwise."""
    sizes = (1, 1, 1) if state is None else (state.tp_size, state.pp_size, state.dp_size)
    ranks = (0, 0) if state is None else (state.tp_rank, state.pp_rank)
    saved = meta.get("layout", {})
    if (saved.get("tensor_model_parallel_size"), saved.get("pipeline_model_parallel_size"),
            saved.get("data_parallel_size")) != sizes:
        return [], []
    loaded = [r for r in sorted(meta["files"]) if _model_file_ranks(r) is not None]
    return [r for r in loaded if _model_file_ranks(r) == ranks], loaded


def _check(info: CheckpointInfo, state: Optional[ParallelState]) -> Tuple[Optional[dict], List[str], list]:
    """(metadata, problems, this rank's verified model files) of one candidate, every rank checking its share.
    A checkpoint in one of Megatron-LM's formats has no checksums: only its files' presence is checked."""
    if info.format != OWN_FORMAT:
        return None, foreign_problems(info.format, info.path), []
    meta, problems = committed_metadata(info.path)
    kept = []
    if not problems:
        rank, world = (0, 1) if state is None else (state.rank, state.world_size)
        mine, loaded = _own_model_files(meta, state)
        rest = [r for r in sorted(meta["files"]) if r not in loaded]
        problems = check_files(info.path, meta, rest[rank::world], deep=True)
        for relpath in mine:
            try:
                kept.append(keep_verified(info.path, meta, relpath))
            except CheckpointIntegrityError as e:
                problems.append(e.problem)
    merged = []
    for rank_problems in all_gather_object(problems, state):
        merged += [p for p in rank_problems if p not in merged]
    return meta, merged, kept


def choose_checkpoint(load_dir: str, ckpt_step: Optional[int] = None, state: Optional[ParallelState] = None, *,
                      allow_weights_only: bool = False, step_flag: str = "--ckpt-step") -> LoadPlan:
    """The checkpoint to load from `load_dir`; collective over all ranks when `state` is distributed.

    With `ckpt_step`, that iteration or CheckpointLoadError if it is missing or fails its
    checks. Without, the tracker's iteration if intact, else the newest intact one
    ("fallback"); checkpoints newer than an intact tracker iteration are left alone (the
    tracker may have been moved back on purpose). Weights-only checkpoints count only with
    `allow_weights_only`; skipped ones are listed in `rejected` when nothing else is found.
    Iteration None means nothing to load; a directory whose checkpoints all fail their
    checks is an error rather than a silent fresh start. `step_flag` is the flag messages name
    for `ckpt_step` (--load-weights-from-step for the weights' directory).
    """
    survey = broadcast_object((find_checkpoints(load_dir), read_tracker(load_dir))
                              if state is None or state.rank == 0 else None, state)
    checkpoints, (tracker_iteration, tracker_problem) = survey
    plan = LoadPlan(load_dir, None, None, "none", tracker_iteration=tracker_iteration, checkpoints=checkpoints,
                    step_flag=step_flag)
    committed = {c.iteration: c for c in checkpoints if c.state == "committed"}
    for c in checkpoints:
        if c.state == "incomplete":
            c.status = "incomplete: still has its temporary name, so the save did not finish"
            plan.rejected.append((c.name, c.status))
        elif c.state == "replaced":
            c.status = f"stale copy left by a re-save of {iteration_dir_name(c.iteration)}"
        elif c.kind == "weights" and not allow_weights_only:
            c.status = WEIGHTS_ONLY

    if ckpt_step is not None:
        info = committed.get(ckpt_step)
        if info is None:
            available = ", ".join(str(i) for i in committed) or "none"
            raise CheckpointLoadError(f"{step_flag} {ckpt_step}: {load_dir} has no committed checkpoint "
                                      f"{iteration_dir_name(ckpt_step)} (committed iterations: {available})")
        meta, problems, kept = _check(info, state)
        if problems:
            raise CheckpointLoadError(f"checkpoint {info.name} in {load_dir} failed its checks: {'; '.join(problems)}; "
                                      f"pick another with {step_flag} or drop it to load the newest intact one")
        candidates, reason_of = [info], {id(info): "--ckpt-step"}
    else:
        if tracker_problem is not None and any(c.kind == "full" for c in committed.values()):
            plan.rejected.append((TRACKER_FILENAME, tracker_problem))
        tracker_info = committed.get(tracker_iteration)
        if tracker_iteration is not None and tracker_info is None:
            plan.rejected.append((format_iteration(tracker_iteration), f"named by {TRACKER_FILENAME} but not in "
                                                                      f"{load_dir}"))
        rest = [c for c in committed.values() if c is not tracker_info]
        candidates = ([tracker_info] if tracker_info is not None else []) + rest
        reason_of = {id(c): "fallback" for c in rest}
        if tracker_info is not None:
            reason_of[id(tracker_info)] = "tracker"
        meta, kept = None, []

    for info in candidates:
        if info.status == WEIGHTS_ONLY:
            continue
        if reason_of[id(info)] != "--ckpt-step":
            meta, problems, kept = _check(info, state)
            if problems:
                info.status = "failed its checks: " + "; ".join(problems)
                plan.rejected.append((info.name, info.status))
                continue
        info.status = INTACT if info.format == OWN_FORMAT else f"{FORMAT_NAMES[info.format]}: complete (no checksums)"
        plan.format = info.format
        plan.iteration, plan.iter_dir, plan.kind, plan.metadata = info.iteration, info.path, info.kind, meta
        plan.verified_files = kept
        plan.reason = reason_of[id(info)]
        break

    if plan.iteration is None:
        damaged = [f"{c.name}: {c.status}" for c in committed.values() if c.status.startswith("failed")]
        if damaged:
            raise CheckpointLoadError(f"no intact checkpoint in {load_dir}:\n  " + "\n  ".join(damaged) +
                                      "\nrestore or move away the damaged ones, or start without --load")
        plan.rejected += [(c.name, WEIGHTS_ONLY_REASON) for c in candidates if c.status == WEIGHTS_ONLY]
    if plan.reason == "tracker":
        for c in checkpoints:
            newer = c.state == "committed" and _order_key(c.iteration) > _order_key(plan.iteration)
            if newer and c.status == NOT_CHECKED:
                c.status = (f"newer than the tracker's {format_iteration(plan.iteration)}, not loaded "
                            f"(load it with {step_flag} {c.iteration})")
    return plan


def human_bytes(n: float) -> str:
    """`812 B`, `12.3 MB`: decimal units, as storage is sold."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"


_MAX_LISTED = 12


def _load_reason(plan: LoadPlan) -> str:
    """Why the plan's checkpoint was chosen, in the report's words."""
    return {"tracker": f"named by {TRACKER_FILENAME}", "--ckpt-step": f"requested with {plan.step_flag}",
            "best": f"{plan.step_flag} best: named by {BEST_FILENAME}",
            "fallback": "fallback: the newest intact checkpoint",
            "local": "the newest state: every rank's in-memory snapshot (--local-ckpt-interval), newer than the "
                     "persistent checkpoints"}[plan.reason]


def _survey(plan: LoadPlan, indent: str) -> List[str]:
    """The report's lines on one directory: trackers, what was found, what was not loaded and why, the choice."""
    tracker = format_iteration(plan.tracker_iteration) if plan.tracker_iteration is not None else "nothing"
    lines = [f"tracker {TRACKER_FILENAME} names {tracker}"]
    best, _ = read_tracker(plan.load_dir, BEST_FILENAME)
    if best is not None:
        lines.append(f"best    {BEST_FILENAME} names {format_iteration(best)} (lowest validation loss)")
    if plan.checkpoints:
        lines.append("found (newest first):")
        width = max(len(c.name) for c in plan.checkpoints)
        for c in plan.checkpoints[:_MAX_LISTED]:
            mark = "   <- loaded" if c.path == plan.iter_dir else ""
            lines.append(f"  {c.name:<{width}}  {c.kind or '?':<7}  {human_bytes(c.size_bytes):>9}  "
                         f"{c.status}{mark}")
        if len(plan.checkpoints) > _MAX_LISTED:
            lines.append(f"  ... and {len(plan.checkpoints) - _MAX_LISTED} older")
    else:
        lines.append("found: no checkpoints")
    if plan.rejected:
        lines.append("not loaded:")
        lines += [f"  {name}: {why}" for name, why in plan.rejected]
    lines += plan.notes
    if plan.iteration is None:
        lines.append("loading: nothing, training starts from scratch")
    else:
        lines.append(f"loading: {os.path.basename(plan.iter_dir)} ({plan.kind}), {_load_reason(plan)}")
    return [indent + line for line in lines]


def format_recovery_report(plan: LoadPlan, restored: Dict[str, str], weights_plan: Optional[LoadPlan] = None) -> str:
    """One block for rank 0's log: what was found, what is loaded and why, and what was restored or reset;
    with `weights_plan` (--load-weights-from), the same survey of the directory the weights come from."""
    lines = [f"checkpoint recovery report for {plan.load_dir}"] + _survey(plan, "  ")
    if weights_plan is not None:
        lines.append(f"  weights from {weights_plan.load_dir} (--load-weights-from):")
        lines += _survey(weights_plan, "    ")
    if restored:
        lines.append("  restored:")
        width = max(len(k) for k in restored)
        lines += [f"    {k:<{width}}  {v}" for k, v in restored.items()]
    return "\n".join(lines)
