"""Megatron-Core's `torch_dist` checkpoint format (megatron.core.dist_checkpointing), read and written.

    <dir>/latest_checkpointed_iteration.txt
    <dir>/iter_0000100/metadata.json      {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    <dir>/iter_0000100/.metadata          torch.distributed.checkpoint (DCP) index
    <dir>/iter_0000100/__R_0.distcp       each rank's pieces

Every tensor is stored once, whole, under a global key (megatron-core 0.19.2, as Megatron-LM's
training saves it, i.e. without `singleton_local_shards`): the layers of a homogeneous decoder
are stacked on a leading axis of size num_layers, so `decoder.layers.{i}.self_attention.linear_qkv.weight`
is row i of `decoder.layers.self_attention.linear_qkv.weight` [L, (heads + 2 groups) * head_dim, hidden].
Norms carry the Transformer Engine names (`decoder.layers.self_attention.linear_qkv.layer_norm_weight`
for input_layernorm). TP pieces sit at their global offsets: fused QKV is the concatenation of
the ranks' per-group pieces, SwiGLU's fc1 [gate; up] is split into its two halves, each placed
at its own offset. Objects are pickled lists stored as DCP bytes under `{key}/shard_{offset}_{shape}`:
`common_state/shard_0_1` ([{args, iteration, checkpoint_version, opt_param_scheduler,
num_floating_point_operations_so_far, ...}]; older versions kept it in common.pt),
`rng_state/shard_{pp}.{tp}_{PP}.{TP}` (a list over DP ranks) and one `_extra_state` per linear layer
and layer (`decoder.layers.mlp.linear_fc1._extra_state/shard_{i}_{L}`, None for the local spec),
which Megatron-Core's load asks for.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import types
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, TensorProperties
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

from megatron_lite.checkpoint.formats import SourceCheckpoint
from megatron_lite.checkpoint.formats.megatron_args import MODE_ARG, megatron_args_from_config, metadata_from_megatron
from megatron_lite.checkpoint.formats.megatron_legacy import (CHECKPOINT_VERSION, TE_NAMES, numpy_globals,
                                                              iteration_dir_name, rng_from_megatron, rng_to_megatron)
from megatron_lite.checkpoint.io.layout import tmp_dir_name
from megatron_lite.checkpoint.io.storage import fsync_dir, write_tracker
from megatron_lite.checkpoint.recovery import CheckpointLoadError
from megatron_lite.checkpoint.reshard.sharding import rank_indices, runs_of, rank_params, rank_state
from megatron_lite.config import ModelConfig
from megatron_lite.parallel.state import ParallelState

FORMAT = "torch_dist"
CONFIG_FILENAME = "metadata.json"
COMMON_KEY = "common_state/shard_0_1"
LEGACY_COMMON_FILENAME = "common.pt"
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def detect(iter_dir: str) -> bool:
    """Megatron's metadata.json names its sharded backend; megatron_lite's holds config and tensors."""
    path = os.path.join(iter_dir, CONFIG_FILENAME)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("sharded_backend") == FORMAT


def core_key(global_name: str) -> Tuple[str, Optional[int]]:
    """(Megatron-Core's checkpoint key, layer row or None) of one of our global tensor names."""
    m = LAYER.fullmatch(global_name)
    if m is None:
        return global_name, None
    rest = m.group(2)
    for te, local in TE_NAMES:
        if rest == local:
            rest = te
    return f"decoder.layers.{rest}", int(m.group(1))


def object_key(key: str, offset, shape) -> str:
    """DCP key of a Megatron-Core ShardedObject (its `unique_key`)."""
    return f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}"


# --------------------------------------------------------------------------- reading

def _unpickle(data: bytes, where: str):
    """A pickled object list with weights_only=True; only the classes Megatron's args and RNG
    states need (argparse.Namespace, numpy's random-state array, Megatron's enums) are allowed."""
    import argparse
    allowed = [argparse.Namespace, *numpy_globals()]
    if b"megatron.core" in data:      # args name Megatron-Core's AttnBackend enum
        try:
            from megatron.core.transformer.enums import AttnBackend
        except ImportError:
            raise CheckpointLoadError(f"{where} holds args with Megatron-Core's enums (AttnBackend); install "
                                      f"megatron-core to read them") from None
        allowed.append(AttnBackend)
    # classes registered process-wide already (megatron.core does so at import) must stay registered
    allowed = [c for c in allowed if c not in torch.serialization.get_safe_globals()]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the class {found.group(1)}" if found else str(e).splitlines()[0]
        raise CheckpointLoadError(f"{where} holds {what}, which a Megatron-LM checkpoint does not need and is "
                                  f"not unpickled; re-save it without that object") from None


class _RawBytesPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that stored objects come back as raw bytes (DCP's own would
    unpickle them with weights_only=False)."""

    def load_bytes(self, read_item, value):
        self.original_state_dict[read_item.dest_index.fqn] = value.read()


def _load(iter_dir: str, wanted: dict) -> dict:
    """DCP load of `wanted` (key -> tensor to fill, or None for an object's bytes) in this process."""
    for k, v in wanted.items():
        if v is None:
            wanted[k] = io.BytesIO()
    dcp.load(wanted, storage_reader=dcp.FileSystemReader(iter_dir), planner=_RawBytesPlanner(), no_dist=True)
    return wanted


class TorchDistCheckpoint(SourceCheckpoint):
    """One iteration directory of Megatron-Core's torch_dist format.

    Tensors are read by DCP in this process, whole and one key at a time, and cut with the
    sharding helpers; a stacked decoder key is kept until the rank's stage has taken its rows,
    so a rank holds at most its stage's parameters at full TP width (all layers of the keys
    its stage reads).
    """
    format = FORMAT

    def __init__(self, iter_dir: str):
        self.iter_dir = iter_dir
        self._index = dcp.FileSystemReader(iter_dir).read_metadata().state_dict_metadata
        common = self._common()
        if "args" not in common or common["args"] is None:
            raise CheckpointLoadError(f"{iter_dir} has no args in its common state; pass a checkpoint saved by "
                                      f"Megatron-LM's training (pretrain_gpt.py --ckpt-format torch_dist)")
        self.common = common
        args = common["args"]
        self.args = args
        self.iteration = common.get("iteration", 0)
        self.tp = args.tensor_model_parallel_size
        self.pp = args.pipeline_model_parallel_size
        self._rng_keys = {k for k in self._index if k.startswith("rng_state/shard_")}
        self.distributed_optimizer = any(k.startswith("optimizer.") for k in self._index)
        self.metadata = metadata_from_megatron(
            FORMAT, self.iteration, args, common, has_optimizer=self.distributed_optimizer,
            has_rng=bool(self._rng_keys),
            distributed_optimizer=bool(getattr(args, "use_distributed_optimizer", False)))

    def _common(self) -> dict:
        legacy = os.path.join(self.iter_dir, LEGACY_COMMON_FILENAME)
        if os.path.isfile(legacy):
            with open(legacy, "rb") as f:
                return _unpickle(f.read(), legacy)
        if COMMON_KEY not in self._index:
            raise CheckpointLoadError(f"{self.iter_dir} has neither {LEGACY_COMMON_FILENAME} nor {COMMON_KEY}; the "
                                      f"checkpoint is incomplete: pick another iteration")
        return _unpickle(_load(self.iter_dir, {COMMON_KEY: None})[COMMON_KEY], f"{self.iter_dir}:{COMMON_KEY}")[0]

    def _tensor(self, key: str) -> torch.Tensor:
        meta = self._index.get(key)
        if meta is None or not hasattr(meta, "size"):
            raise CheckpointLoadError(f"{self.iter_dir} has no tensor {key}: the checkpoint is from another "
                                      f"architecture; fix the flags or pass --use-checkpoint-args")
        out = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        return _load(self.iter_dir, {key: out})[key]

    def model_state(self, model_cfg: ModelConfig, tp: int, pp: int, tp_rank: int,
                    pp_rank: int) -> Dict[str, torch.Tensor]:
        loaded: Dict[str, torch.Tensor] = {}

        def get_global(name: str) -> torch.Tensor:
            key, row = core_key(name)
            if key not in loaded:
                loaded[key] = self._tensor(key)
            return loaded[key] if row is None else loaded[key][row]

        return rank_state(model_cfg, tp, pp, tp_rank, pp_rank, get_global)

    def scheduler_state(self) -> Tuple[Optional[dict], str]:
        sd = self.common.get("opt_param_scheduler")
        if sd is None:
            return None, "the checkpoint has no opt_param_scheduler"
        return dict(sd), "Megatron-LM's opt_param_scheduler"

    def optimizer_state(self, run) -> Tuple[Optional[dict], str]:
        return None, ("Megatron-Core's sharded optimizer state (torch_dist, distributed optimizer) is not "
                      "mapped onto megatron_lite's; the optimizer starts fresh")

    def rng_state(self, state: ParallelState) -> Tuple[Optional[dict], str]:
        layout = self.metadata["parallel"]
        if (layout["tp"], layout["pp"], layout["dp"]) != (state.tp_size, state.pp_size, state.dp_size):
            return None, (f"saved at TP{layout['tp']} PP{layout['pp']} DP{layout['dp']}, loaded at "
                          f"TP{state.tp_size} PP{state.pp_size} DP{state.dp_size}: each rank's generators are fresh")
        key = object_key("rng_state", (state.pp_rank, state.tp_rank), (state.pp_size, state.tp_size))
        if key not in self._rng_keys:
            return None, "the checkpoint has no rng_state"
        rng = _unpickle(_load(self.iter_dir, {key: None})[key], f"{self.iter_dir}:{key}")[0]
        mine = rng[state.dp_rank] if len(rng) == state.dp_size else rng[0] if state.dp_size == 1 else None
        if mine is None:
            return None, "the checkpoint's rng_state does not hold one entry per DP rank (--data-parallel-random-init?)"
        return rng_from_megatron(mine), "Megatron-LM's rng_state"


def open_checkpoint(iter_dir: str) -> TorchDistCheckpoint:
    return TorchDistCheckpoint(iter_dir)


# --------------------------------------------------------------------------- writing

class _PickledBytesPlanner(DefaultSavePlanner):
    """DCP's save planner, except that objects are already pickled into BytesIO (as Megatron-Core
    stores them) and are written as they are, not pickled a second time."""

    def transform_object(self, write_item, object):
        return object


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _pickled(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save([obj], buf)
    buf.seek(0)
    return buf


def _local_shards(run) -> Dict[str, Tuple[Tuple[int, ...], List[Tuple[List[int], torch.Tensor]]]]:
    """{core key: (global shape, [(global offset, piece)])} of the tensors this rank writes: every
    piece it holds whose copy on a lower TP rank (replicated tensors) or on stage 0 (a tied output
    layer) does not exist."""
    st: ParallelState = run.state
    model_cfg = run.cfg.model
    state = run.module.state_dict()
    out: Dict[str, tuple] = {}
    for p in rank_params(model_cfg, st.tp_size, st.pp_size, st.tp_rank, st.pp_rank):
        if p.key == "output_layer.weight" and p.global_name != p.key:
            continue
        if p.partition_dim < 0 and st.tp_rank != 0:
            continue
        key, row = core_key(p.global_name)
        tensor = state[p.key].detach().cpu()
        shape = list(p.global_shape)
        ranges = ([[0, p.shape[p.partition_dim]]] if p.partition_dim < 0 else
                  runs_of(rank_indices(p.global_shape[p.partition_dim], p, st.tp_size, st.tp_rank)))
        dim = max(p.partition_dim, 0)
        done = 0
        pieces = []
        for a, b in ranges:
            piece = tensor.narrow(dim, done, b - a).contiguous() if p.partition_dim >= 0 else tensor.contiguous()
            offset = [0] * len(shape)
            if p.partition_dim >= 0:
                offset[dim] = a
            done += b - a
            if row is not None:
                piece, offset = piece.unsqueeze(0), [row] + offset
            pieces.append((offset, piece))
        global_shape = tuple(shape) if row is None else (model_cfg.num_layers, *shape)
        entry = out.setdefault(key, (global_shape, []))
        entry[1].extend(pieces)
    return out


def _sharded_tensors(local: dict, state: ParallelState) -> Dict[str, ShardedTensor]:
    """torch ShardedTensors of this rank's pieces; the global shard list is gathered from all ranks."""
    mine = {k: [(off, list(t.shape)) for off, t in pieces] for k, (_, pieces) in local.items()}
    everyone = [mine]
    if _distributed():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    out = {}
    for key, (shape, pieces) in local.items():
        metas = [ShardMetadata(off, size, f"rank:{r}/cpu")
                 for r, theirs in enumerate(everyone) for off, size in theirs.get(key, [])]
        t = pieces[0][1]
        props = TensorProperties(dtype=t.dtype, layout=t.layout, requires_grad=False,
                                 memory_format=torch.contiguous_format, pin_memory=False)
        shards = [Shard.from_tensor_and_offsets(piece, off, state.rank) for off, piece in pieces]
        out[key] = ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, sharded_tensor_metadata=ShardedTensorMetadata(metas, torch.Size(shape), props),
            process_group=None)
    return out


def save(run, save_dir: str, rng: Optional[dict] = None) -> None:
    """See `_save`; a single process without torch.distributed gets a process group of one for the
    save (torch's ShardedTensor wants one)."""
    if dist.is_initialized():
        return _save(run, save_dir, rng)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return _save(run, save_dir, rng)
    finally:
        dist.destroy_process_group()


def _save(run, save_dir: str, rng: Optional[dict] = None) -> None:
    """Collective: every rank calls it. DP rank 0 of each (tp, pp) writes its own pieces at their
    global offsets with DCP into a temporary iteration directory (nothing is gathered), rank 0
    adds the common state, the `_extra_state` objects and metadata.json, renames the directory
    once every rank is done and writes the tracker. The optimizer state is not written."""
    from megatron_lite.parallel.random import get_rng_state

    st: ParallelState = run.state
    iteration = run.progress.iteration
    final = os.path.join(save_dir, iteration_dir_name(iteration))
    tmp = os.path.join(save_dir, tmp_dir_name(iteration, getattr(getattr(run, "checkpoints", None), "token", "")))
    with_rng = run.cfg.checkpoint.save_rng
    if st.rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    local_rng = rng_to_megatron(rng if rng is not None else get_rng_state(st.rng)) if with_rng else None
    rng_all = [None] * st.dp_size
    if st.dp_size > 1 and _distributed():
        dist.all_gather_object(rng_all, local_rng, group=st.dp_group)
    else:
        rng_all = [local_rng]
    local = _local_shards(run) if st.dp_rank == 0 else {}
    payload: Dict[str, object] = dict(_sharded_tensors(local, st))
    if st.dp_rank == 0 and with_rng:
        payload[object_key("rng_state", (st.pp_rank, st.tp_rank), (st.pp_size, st.tp_size))] = _pickled(rng_all)
    if st.dp_rank == 0:
        if st.tp_rank == 0:
            first = st.pp_rank * (run.cfg.model.num_layers // st.pp_size)
            for i in range(first, first + run.cfg.model.num_layers // st.pp_size):
                for linear in LINEARS:
                    payload[object_key(f"decoder.layers.{linear}._extra_state", (i,),
                                       (run.cfg.model.num_layers,))] = _pickled(None)
    if st.rank == 0:
        args = megatron_args_from_config(run.cfg, st)
        args.iteration = iteration
        args.consumed_train_samples = run.progress.consumed_train_samples
        args.consumed_valid_samples = run.progress.consumed_valid_samples
        setattr(args, MODE_ARG, run.mode)
        payload[COMMON_KEY] = _pickled({
            "args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
            "opt_param_scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "num_floating_point_operations_so_far": run.progress.floating_point_operations_so_far})
    dcp.save(payload, storage_writer=dcp.FileSystemWriter(tmp), planner=_PickledBytesPlanner(),
             no_dist=not _distributed())
    if st.rank == 0:
        with open(os.path.join(tmp, CONFIG_FILENAME), "w") as f:
            json.dump({"sharded_backend": FORMAT, "sharded_backend_version": 1}, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(save_dir)
        write_tracker(save_dir, iteration)
    _barrier()


def write_weights(save_dir: str, iteration: int, run_cfg, model: Dict[str, torch.Tensor]) -> None:
    """One process, no process group: a converted model's whole (TP1 x PP1) state_dict as a
    weights-only torch_dist checkpoint, which Megatron-Core loads at any TP/PP."""
    from megatron_lite.checkpoint.reshard.sharding import skeleton_state
    from megatron_lite.initialize import Progress

    cfg = copy.deepcopy(run_cfg)
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    cfg.checkpoint.save_rng = False
    run = types.SimpleNamespace(cfg=cfg, state=skeleton_state(1, 1, 0, 0), mode="converted", scheduler=None,
                                module=types.SimpleNamespace(state_dict=lambda: model),
                                progress=Progress(iteration=iteration))
    save(run, save_dir)
