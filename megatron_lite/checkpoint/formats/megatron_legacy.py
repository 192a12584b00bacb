"""Megatron-LM's legacy checkpoint format (`--ckpt-format torch`), read and written.

    <dir>/latest_checkpointed_iteration.txt          an iteration number, or `release`
    <dir>/iter_0000100/mp_rank_TT/model_optim_rng.pt       PP = 1
    <dir>/iter_0000100/mp_rank_TT_PPP/model_optim_rng.pt   PP > 1

Each file is a dict: args (argparse.Namespace), checkpoint_version 3.0, iteration, model (or
model0, model1, ... per virtual stage), optimizer, opt_param_scheduler, rng_state (a list over
DP ranks), num_floating_point_operations_so_far. The model keys are Megatron-Core's, as ours;
the Transformer Engine spec fuses the norms into the next linear layer, and both specs add
`_extra_state` entries, which carry no weights.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.checkpoint.formats import SourceCheckpoint, pickle_names
from megatron_lite.checkpoint.formats.megatron_args import (MODE_ARG, megatron_args_from_config,
                                                           metadata_from_megatron)
from megatron_lite.checkpoint.io.layout import is_iteration_number, tmp_dir_name
from megatron_lite.checkpoint.io.storage import fsync_dir, write_tracker
from megatron_lite.checkpoint.recovery import CheckpointLoadError
from megatron_lite.checkpoint.reshard.sharding import build_tensor_index, reshard_rank_state
from megatron_lite.config import ModelConfig
from megatron_lite.parallel.state import ParallelState

FORMAT = "torch"
MODEL_FILENAME = "model_optim_rng.pt"
TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
OWN_OPTIMIZER_KEY = "megatron_lite_optimizer"    # megatron_lite's optimizer state_dict, beside Megatron's keys

TE_NAMES = (  # Transformer Engine spec suffix -> local spec suffix
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
)


def iteration_dir_name(iteration) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def shard_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron's directory of one (tp, pp) rank: `mp_rank_TT` at PP = 1, `mp_rank_TT_PPP` above."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


# --------------------------------------------------------------------------- loading without pickles

def numpy_globals() -> list:
    """The numpy classes a saved np.random state (a uint32 array) needs, by name."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _enum_globals(path: str) -> list:
    """Megatron-LM's enums that its args hold (the attention backend), imported only for a file that
    names them, since importing megatron-core is slow."""
    if b"megatron.core" not in pickle_names(path):
        return []
    try:
        from megatron.core.transformer.enums import AttnBackend
    except ImportError:
        raise CheckpointLoadError(f"{path} holds args with Megatron-Core's enums (AttnBackend); install "
                                  f"megatron-core to read them") from None
    return [AttnBackend]


def load_file(path: str) -> dict:
    """One model_optim_rng.pt with weights_only=True: only argparse.Namespace, numpy's random-state
    array and Megatron's args enums are unpickled; anything else stops with the class named."""
    allowed = [argparse.Namespace, *numpy_globals(), *_enum_globals(path)]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises UnpicklingError with a page of advice: keep the class name
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the class {found.group(1)}" if found else str(e).splitlines()[0]
        raise CheckpointLoadError(f"{path} holds {what}, which a Megatron-LM checkpoint does not need and is "
                                  f"not unpickled; re-save it without that object or convert it") from None


def find_iteration(load_dir: str, ckpt_step: Optional[int] = None) -> Optional[Tuple[object, str]]:
    """(iteration, iter_dir) to load: `ckpt_step` if given, else the tracker file's, else the
    highest iter_* directory; None when `load_dir` holds no checkpoint."""
    if ckpt_step is not None:
        path = os.path.join(load_dir, iteration_dir_name(ckpt_step))
        return (ckpt_step, path) if os.path.isdir(path) else None
    tracker = os.path.join(load_dir, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as f:
            text = f.read().strip()
        if text == "release":
            return "release", os.path.join(load_dir, "release")
        if not is_iteration_number(text):
            raise CheckpointLoadError(f"{tracker} holds {text!r}, not an iteration number or 'release'; "
                                      f"fix the file or pass --ckpt-step")
        return int(text), os.path.join(load_dir, iteration_dir_name(int(text)))
    found = sorted(int(d[5:]) for d in (os.listdir(load_dir) if os.path.isdir(load_dir) else ())
                   if re.fullmatch(r"iter_\d{7}", d))
    return (found[-1], os.path.join(load_dir, iteration_dir_name(found[-1]))) if found else None


def detect(iter_dir: str) -> bool:
    from megatron_lite.checkpoint.formats import detect_format
    return detect_format(iter_dir) == FORMAT


# --------------------------------------------------------------------------- reader

def local_name(key: str) -> Optional[str]:
    """The local-spec key of a saved key; None for `_extra_state` entries."""
    if key.endswith("_extra_state"):
        return None
    for te, local in TE_NAMES:
        if key.endswith(te):
            return key[: -len(te)] + local
    return key


def _rank_dirs(iter_dir: str) -> Dict[Tuple[int, int], str]:
    out = {}
    for d in os.listdir(iter_dir):
        m = re.fullmatch(r"mp_rank_(\d\d)(?:_(\d\d\d))?", d)
        if m and os.path.isfile(os.path.join(iter_dir, d, MODEL_FILENAME)):
            out[(int(m.group(1)), int(m.group(2) or 0))] = d
    return out


class LegacyCheckpoint(SourceCheckpoint):
    """One iteration directory of Megatron-LM's legacy format."""
    format = FORMAT

    def __init__(self, iter_dir: str):
        self.iter_dir = iter_dir
        self._dirs = _rank_dirs(iter_dir)
        if not self._dirs:
            raise CheckpointLoadError(f"{iter_dir} has no mp_rank_*/{MODEL_FILENAME}; pass the directory of a "
                                      f"Megatron-LM checkpoint saved with --ckpt-format torch")
        self._cache: Dict[str, dict] = {}
        first = self._file(self._dirs[min(self._dirs)])
        if "model" not in first:
            models = sorted(k for k in first if re.fullmatch(r"model\d+", k))
            raise CheckpointLoadError(f"{iter_dir} holds {len(models)} virtual pipeline stages ({', '.join(models)}); "
                                      f"megatron_lite has no interleaved schedule: convert it with Megatron-LM's "
                                      f"checkpoint converter to one stage per rank")
        args = first["args"]
        self.args = args
        self.iteration = first.get("iteration", 0)
        self.tp = args.tensor_model_parallel_size
        self.pp = args.pipeline_model_parallel_size
        expected = {(t, p) for t in range(self.tp) for p in range(self.pp)}
        if set(self._dirs) != expected:
            missing = sorted(shard_dir_name(t, p, self.pp) for t, p in expected - set(self._dirs))
            raise CheckpointLoadError(f"{iter_dir} was saved at TP{self.tp} x PP{self.pp} but lacks "
                                      f"{', '.join(missing) or 'nothing'}; copy the missing rank directories")
        self.distributed_optimizer = any(os.path.isfile(os.path.join(iter_dir, d, "distrib_optim.pt"))
                                         for d in os.listdir(iter_dir))
        self.metadata = metadata_from_megatron(
            FORMAT, self.iteration, args, first,
            has_optimizer="optimizer" in first or OWN_OPTIMIZER_KEY in first or self.distributed_optimizer,
            has_rng="rng_state" in first, distributed_optimizer=self.distributed_optimizer)

    def _file(self, rank_dir: str) -> dict:
        if rank_dir not in self._cache:
            self._cache[rank_dir] = load_file(os.path.join(self.iter_dir, rank_dir, MODEL_FILENAME))
        return self._cache[rank_dir]

    def _local_model(self, rank_dir: str) -> Dict[str, torch.Tensor]:
        raw = self._file(rank_dir)["model"]
        return {local_name(k): v for k, v in raw.items() if local_name(k) is not None}

    def model_state(self, model_cfg: ModelConfig, tp: int, pp: int, tp_rank: int,
                    pp_rank: int) -> Dict[str, torch.Tensor]:
        index = build_tensor_index(model_cfg, self.tp, self.pp)
        by_piece_file = {f"mp_rank_{t:02d}_{p:03d}/{MODEL_FILENAME}": d for (t, p), d in self._dirs.items()}

        def read_piece(file: str, key: str) -> torch.Tensor:
            model = self._local_model(by_piece_file[file])
            if key not in model:
                raise CheckpointLoadError(f"{self.iter_dir}/{by_piece_file[file]} has no tensor {key}: the "
                                          f"checkpoint is from another architecture; pass --use-checkpoint-args")
            return model[key]

        return reshard_rank_state(index, read_piece, model_cfg, tp, pp, tp_rank, pp_rank)

    def scheduler_state(self) -> Tuple[Optional[dict], str]:
        sd = self._file(self._dirs[min(self._dirs)]).get("opt_param_scheduler")
        if sd is None:
            return None, "the checkpoint has no opt_param_scheduler"
        # Megatron counts num_steps, warmup and decay steps in samples, as megatron_lite does.
        return dict(sd), "Megatron-LM's opt_param_scheduler"

    def optimizer_state(self, run) -> Tuple[Optional[dict], str]:
        st, layout = run.state, self.metadata["parallel"]
        own = self._file(self._dirs[min(self._dirs)]).get(OWN_OPTIMIZER_KEY)
        if own is not None:
            if (layout["tp"], layout["pp"]) != (st.tp_size, st.pp_size) or run.cfg.parallel.use_distributed_optimizer:
                return None, (f"megatron_lite's optimizer state in this file is read at the TP{layout['tp']} "
                              f"PP{layout['pp']} layout it was saved at, without --use-distributed-optimizer")
            return self._file(self._dirs[(st.tp_rank, st.pp_rank)])[OWN_OPTIMIZER_KEY], "megatron_lite's"
        if self.distributed_optimizer:
            return None, ("Megatron-LM's distributed-optimizer shards (distrib_optim.pt) are not read; "
                          "the optimizer starts fresh")
        return None, ("Megatron-LM's optimizer state is not mapped onto megatron_lite's (its param-group "
                      "order is not verified); the optimizer starts fresh")

    def rng_state(self, state: ParallelState) -> Tuple[Optional[dict], str]:
        layout = self.metadata["parallel"]
        if (layout["tp"], layout["pp"], layout["dp"]) != (state.tp_size, state.pp_size, state.dp_size):
            return None, (f"saved at TP{layout['tp']} PP{layout['pp']} DP{layout['dp']}, loaded at "
                          f"TP{state.tp_size} PP{state.pp_size} DP{state.dp_size}: each rank's generators are fresh")
        rng = self._file(self._dirs[(state.tp_rank, state.pp_rank)]).get("rng_state")
        if not rng:
            return None, "the checkpoint has no rng_state"
        mine = rng[state.dp_rank] if isinstance(rng, list) and len(rng) == state.dp_size else None
        if mine is None:
            return None, "the checkpoint's rng_state does not hold one entry per DP rank (--data-parallel-random-init?)"
        return rng_from_megatron(mine), "Megatron-LM's rng_state"


def rng_from_megatron(m: dict) -> dict:
    """Megatron's {random_rng_state, np_rng_state, torch_rng_state, cuda_rng_state, rng_tracker_states}
    as `parallel.random.set_rng_state` takes it."""
    py_version, py_keys, py_gauss = m["random_rng_state"]
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = m["np_rng_state"]
    out = {"python": {"version": py_version, "keys": torch.tensor(py_keys, dtype=torch.int64), "gauss": py_gauss},
           "numpy": {"name": np_name, "keys": torch.from_numpy(np.asarray(np_keys).astype(np.int64)),
                     "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
           "torch": m["torch_rng_state"], "tracker": dict(m.get("rng_tracker_states") or {})}
    if m.get("cuda_rng_state") is not None:
        out["cuda"] = m["cuda_rng_state"]
    return out


def rng_to_megatron(ours: dict) -> dict:
    """`parallel.random.get_rng_state`'s dict in Megatron's rng_state entry shape."""
    py, n = ours["python"], ours["numpy"]
    return {"random_rng_state": (py["version"], tuple(py["keys"].tolist()), py["gauss"]),
            "np_rng_state": (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]),
            "torch_rng_state": ours["torch"], "cuda_rng_state": ours.get("cuda"),
            "rng_tracker_states": ours["tracker"]}


def open_checkpoint(iter_dir: str) -> LegacyCheckpoint:
    return LegacyCheckpoint(iter_dir)


# --------------------------------------------------------------------------- writer

def extra_state_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, None]:
    """The `_extra_state` entries Megatron-Core's local spec has (one per linear layer, value None),
    so that its strict load_state_dict finds every key it expects."""
    linears = {k.rsplit(".", 1)[0] for k in state_dict
               if re.search(r"\.(linear_qkv|linear_proj|linear_fc1|linear_fc2)\.weight$", k)}
    return {f"{m}._extra_state": None for m in sorted(linears)}


def save(run, save_dir: str, rng: Optional[dict] = None) -> None:
    """Collective: every rank calls it; DP rank 0 of each (tp, pp) writes its model_optim_rng.pt into
    a temporary iteration directory, which rank 0 renames and records in the tracker once all are done.
    The optimizer state goes under OWN_OPTIMIZER_KEY, in megatron_lite's layout, which Megatron-LM
    ignores (it is not mapped onto Megatron-LM's `optimizer`: Megatron-LM loads these files with
    --no-load-optim); megatron_lite resumes from it exactly."""
    from megatron_lite.parallel.random import get_rng_state

    st: ParallelState = run.state
    iteration = run.progress.iteration
    final = os.path.join(save_dir, iteration_dir_name(iteration))
    tmp = os.path.join(save_dir, tmp_dir_name(iteration, getattr(getattr(run, "checkpoints", None), "token", "")))
    c = run.cfg.checkpoint
    distributed = dist.is_available() and dist.is_initialized()
    if st.rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if distributed:
        dist.barrier()
    local_rng = rng if rng is not None else get_rng_state(st.rng)
    rng_all = [None] * st.dp_size
    if distributed and st.dp_size > 1:
        dist.all_gather_object(rng_all, rng_to_megatron(local_rng), group=st.dp_group)
    else:
        rng_all = [rng_to_megatron(local_rng)]
    if st.dp_rank == 0:
        args = megatron_args_from_config(run.cfg, st)
        args.iteration = iteration
        args.consumed_train_samples = run.progress.consumed_train_samples
        args.consumed_valid_samples = run.progress.consumed_valid_samples
        setattr(args, MODE_ARG, run.mode)
        model = OrderedDict((k, v.detach().cpu()) for k, v in run.module.state_dict().items()
                            if not k.endswith("_extra_state"))
        model.update(extra_state_keys(model))
        payload = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                   "model": model, "opt_param_scheduler": run.scheduler.state_dict(),
                   "num_floating_point_operations_so_far": run.progress.floating_point_operations_so_far}
        if c.save_rng:
            payload["rng_state"] = rng_all
        if c.save_optim and not run.cfg.parallel.use_distributed_optimizer:
            payload[OWN_OPTIMIZER_KEY] = run.optimizer.state_dict()
        rank_dir = os.path.join(tmp, shard_dir_name(st.tp_rank, st.pp_rank, st.pp_size))
        os.makedirs(rank_dir, exist_ok=True)
        path = os.path.join(rank_dir, MODEL_FILENAME)
        torch.save(payload, path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        fsync_dir(rank_dir)
    if distributed:
        dist.barrier()
    if st.rank == 0:
        fsync_dir(tmp)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(save_dir)
        write_tracker(save_dir, iteration)
    if distributed:
        dist.barrier()
