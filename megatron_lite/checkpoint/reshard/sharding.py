"""Global <-> per-rank model state, and the global tensor index that maps one onto the other.

A global tensor is a parameter of the whole, unsplit model under its global name
(`GPTModel.global_name`: layer numbers counted over all stages; the output layer of a tied
model named as the word embedding it copies). Rank (tp, pp) holds a piece of every global
tensor its stage uses, under the stage-local state_dict key. Which piece is computed by
`parallel.tensor.shard` alone; everything here is derived from skeletons of the ranks'
GPTModels built on the meta device, so the index of any layout costs no memory.

The index (metadata.json "tensors"), in model order:

    {"decoder.layers.5.mlp.linear_fc1.weight": {
        "shape": [2 * ffn, hidden],          global shape
        "dtype": "bfloat16",
        "partition_dim": 0,                  -1: every TP rank holds the whole tensor
        "partition_chunks": 2,               SwiGLU fc1 is [gate; up], each half split over TP
        "pieces": [                          one per rank holding it, in (pp_rank, tp_rank) order
            {"file": "mp_rank_00_001/model_optim_rng.pt", "key": "decoder.layers.1.mlp.linear_fc1.weight",
             "tp_rank": 0, "pp_rank": 1, "shape": [ffn, hidden],
             "ranges": [[0, ffn/2], [ffn, 3*ffn/2]]},    global [start, stop) along partition_dim, in local order
            ...]}}

A tied model with PP > 1 keeps a copy of the word embedding on its last stage
(`output_layer.weight`); those pieces are listed under the embedding's entry too, with
pp_rank = PP - 1. Readers take the pieces of the lowest pp_rank.

Vocabulary tensors (word embedding, output layer) may change rows between layouts, since
the padded vocabulary is a multiple of make_vocab_size_divisible_by * TP. As Megatron's
converter does, surplus rows are cut and missing rows are copies of the source's last row;
both only ever touch padding, because every padded size is at least the true vocabulary.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import torch

from megatron_lite.checkpoint.io.layout import model_shard_path
from megatron_lite.config import ModelConfig
from megatron_lite.model.gpt import GPTModel
from megatron_lite.model.lora import is_adapter
from megatron_lite.parallel.state import ParallelState
from megatron_lite.parallel.tensor import shard, unshard

VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")

ReadPiece = Callable[[str, str], torch.Tensor]          # (file, key) -> the stored local tensor


@dataclass(frozen=True)
class LocalParam:
    """One parameter of one rank's stage, and where it sits in its global tensor."""
    key: str                  # stage-local state_dict key
    global_name: str
    shape: Tuple[int, ...]    # local
    global_shape: Tuple[int, ...]
    partition_dim: int        # -1 when replicated over TP
    partition_chunks: int
    dtype: torch.dtype


def _check_layout(model_cfg: ModelConfig, tp: int, pp: int) -> None:
    if model_cfg.padded_vocab_size is None:
        raise ValueError("model config has no padded_vocab_size; set it with "
                         "arguments.pad_vocab_size(vocab_size, make_vocab_size_divisible_by, tp)")
    if model_cfg.padded_vocab_size % tp:
        raise ValueError(f"padded_vocab_size {model_cfg.padded_vocab_size} is not divisible by TP {tp}; pad it "
                         f"for this TP with arguments.pad_vocab_size")
    if model_cfg.num_layers % pp:
        raise ValueError(f"num_layers {model_cfg.num_layers} is not divisible by PP {pp}; pick a PP size that "
                         f"divides the layers")
    for what, n in (("num_query_groups", model_cfg.query_groups), ("ffn_hidden_size", model_cfg.ffn_size),
                    ("num_attention_heads", model_cfg.num_attention_heads)):
        if n % tp:
            raise ValueError(f"{what} {n} is not divisible by TP {tp}; pick a TP size that divides it")


def skeleton_state(tp: int, pp: int, tp_rank: int, pp_rank: int) -> ParallelState:
    """A ParallelState of rank (tp_rank, pp_rank) with no process groups, to build a skeleton."""
    return ParallelState(world_size=tp * pp, rank=pp_rank * tp + tp_rank, tp_size=tp, pp_size=pp, dp_size=1,
                         tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=0, tp_group=None, pp_group=None,
                         dp_group=None, mp_group=None, embedding_group=None,
                         pp_ranks=[p * tp + tp_rank for p in range(pp)],
                         tp_ranks=[pp_rank * tp + t for t in range(tp)], dp_ranks=[pp_rank * tp + tp_rank],
                         device=torch.device("meta"))


def rank_params(model_cfg: ModelConfig, tp: int, pp: int, tp_rank: int, pp_rank: int,
                dtype: torch.dtype = torch.float32) -> List[LocalParam]:
    """The parameters of rank (tp_rank, pp_rank), in state_dict order, from a meta-device skeleton.

    Of a LoRA model (--lora-rank) only the adapters: what such a run trains, saves and reshards
    (`lora.base_config` gives the frozen base model's)."""
    _check_layout(model_cfg, tp, pp)
    with torch.device("meta"):
        model = GPTModel(model_cfg, skeleton_state(tp, pp, tp_rank, pp_rank), None, dtype=dtype,
                         init_weights=False)
    params = dict(model.named_parameters())
    out = []
    for key in model.state_dict(keep_vars=True):
        p = params[key]
        if model_cfg.lora_rank and not is_adapter(key):
            continue
        out.append(LocalParam(key, model.global_name(key), tuple(p.shape), tuple(model.global_shape(key, p)),
                              p.partition_dim if p.tensor_model_parallel else -1, p.partition_chunks, p.dtype))
    return out


def runs_of(indices: torch.Tensor) -> List[List[int]]:
    """[[start, stop), ...]: the contiguous runs of a list of indices, in order."""
    runs: List[List[int]] = []
    for i in indices.tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _owned(t: torch.Tensor) -> torch.Tensor:
    """`t` if it is exactly its own storage, else a compact copy (torch.save writes a tensor's
    whole storage, so a piece must never view a larger tensor)."""
    exact = t.is_contiguous() and t.storage_offset() == 0
    if exact and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


def _take(source: torch.Tensor, dim: int, positions: torch.Tensor) -> torch.Tensor:
    """The entries `positions` of `source` along `dim`. Runs of consecutive positions are copied
    as slices (memcpy speed, unlike index_select); a tensor taken whole is not copied at all."""
    runs = runs_of(positions)
    if runs == [[0, source.shape[dim]]]:
        return _owned(source)
    if len(runs) > 64:      # e.g. a vocabulary extended by repeating its last row
        return source.index_select(dim, positions)
    return torch.cat([source.narrow(dim, a, b - a) for a, b in runs], dim=dim)


def rank_indices(length: int, param: LocalParam, tp: int, tp_rank: int) -> torch.Tensor:
    """Global positions along partition_dim of this rank's local slots, in local order."""
    return shard(torch.arange(length), 0, tp_rank, tp, param.partition_chunks)


def build_tensor_index(model_cfg: ModelConfig, tp: int, pp: int, dtype: torch.dtype = torch.float32) -> dict:
    """The global tensor index of a TP x PP layout (format in the module docstring); no weights needed."""
    index: Dict[str, dict] = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            for p in rank_params(model_cfg, tp, pp, tp_rank, pp_rank, dtype):
                entry = index.setdefault(p.global_name, {
                    "shape": list(p.global_shape), "dtype": str(p.dtype).replace("torch.", ""),
                    "partition_dim": p.partition_dim, "partition_chunks": p.partition_chunks, "pieces": []})
                piece = {"file": model_shard_path(tp_rank, pp_rank), "key": p.key, "tp_rank": tp_rank,
                         "pp_rank": pp_rank, "shape": list(p.shape)}
                if p.partition_dim >= 0:
                    piece["ranges"] = runs_of(rank_indices(p.global_shape[p.partition_dim], p, tp, tp_rank))
                entry["pieces"].append(piece)
    return index


# --------------------------------------------------------------------------- global -> rank

def _wanted_rows(p: LocalParam, source_rows: int, tp: int, tp_rank: int) -> torch.Tensor:
    """Positions in the source tensor (along partition_dim) of this rank's local slots. The
    source may differ in length only for a vocabulary tensor: positions past its end take its
    last row."""
    length = p.global_shape[p.partition_dim]
    if source_rows != length and p.global_name not in VOCAB_TENSORS:
        raise ValueError(f"{p.global_name} has {source_rows} entries along dim {p.partition_dim} in the source "
                         f"but the model needs {length}: the model config differs from the checkpoint's")
    return rank_indices(length, p, tp, tp_rank).clamp_(max=source_rows - 1)


def _check_shape(name: str, got, want, dims_that_may_differ=()) -> None:
    got, want = tuple(got), tuple(want)
    same = len(got) == len(want) and all(g == w or d in dims_that_may_differ
                                         for d, (g, w) in enumerate(zip(got, want)))
    if not same:
        raise ValueError(f"{name} has shape {got} in the source but the model needs {want}: the model config "
                         f"differs from the checkpoint's (fix the flags, or pass --use-checkpoint-args)")


def rank_tensors(model_cfg: ModelConfig, tp: int, pp: int, tp_rank: int, pp_rank: int,
                 get_global: Callable[[str], torch.Tensor]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(state_dict key, tensor) of rank (tp_rank, pp_rank), one at a time, from
    `get_global(global name) -> full global tensor`.

    No tensor views a larger one (a piece that is a whole global tensor is that tensor), so
    the caller may drop the global tensors as it goes. Vocabulary tensors may come with any
    number of rows.
    """
    for p in rank_params(model_cfg, tp, pp, tp_rank, pp_rank):
        full = get_global(p.global_name)
        vocab_dim = (p.partition_dim,) if p.global_name in VOCAB_TENSORS else ()
        _check_shape(p.global_name, full.shape, p.global_shape, vocab_dim)
        if p.partition_dim < 0:
            yield p.key, _owned(full)
        else:
            yield p.key, _take(full, p.partition_dim, _wanted_rows(p, full.shape[p.partition_dim], tp, tp_rank))


def rank_state(model_cfg: ModelConfig, tp: int, pp: int, tp_rank: int, pp_rank: int,
               get_global: Callable[[str], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rank (tp_rank, pp_rank)'s state_dict from full global tensors (see `rank_tensors`)."""
    return OrderedDict(rank_tensors(model_cfg, tp, pp, tp_rank, pp_rank, get_global))


def shard_global_state(global_items: Iterable[Tuple[str, torch.Tensor]], model_cfg: ModelConfig, tp: int,
                       pp: int) -> Iterator[Tuple[int, List[Dict[str, torch.Tensor]]]]:
    """Split a stream of (global name, tensor) into per-rank state_dicts.

    Yields (pp_rank, [state_dict of tp_rank 0, 1, ...]) for each stage in order, as soon as
    the stream has delivered every tensor the stage needs; a global tensor is dropped once
    no later stage needs it. With the stream in model order, memory holds one stage (plus
    a tied model's word embedding, which the last stage needs again).
    """
    needs = [{p.global_name for p in rank_params(model_cfg, tp, pp, 0, s)} for s in range(pp)]
    have: Dict[str, torch.Tensor] = {}
    stage = 0
    for name, tensor in global_items:
        if not any(name in n for n in needs):
            raise ValueError(f"{name} is not a parameter of this model; the tensors do not match the model config")
        have[name] = tensor
        while stage < pp and needs[stage] <= have.keys():
            yield stage, [rank_state(model_cfg, tp, pp, t, stage, have.__getitem__) for t in range(tp)]
            stage += 1
            later = set().union(*needs[stage:])
            for done in [k for k in have if k not in later]:
                del have[done]
    if stage < pp:
        missing = sorted(needs[stage] - have.keys())
        raise ValueError(f"the tensors end before pipeline stage {stage} is complete; missing {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


# --------------------------------------------------------------------------- rank -> global

def _holder_pieces(name: str, entry: dict) -> List[dict]:
    """The pieces of the first stage that holds `name` (a tied embedding has two), by tp_rank."""
    if not entry["pieces"]:
        raise ValueError(f"the tensor index lists no piece of {name}; metadata.json is damaged")
    first = min(p["pp_rank"] for p in entry["pieces"])
    return sorted((p for p in entry["pieces"] if p["pp_rank"] == first), key=lambda p: p["tp_rank"])


def global_tensor(name: str, entry: dict, read_piece: ReadPiece) -> torch.Tensor:
    """One global tensor, assembled from its pieces."""
    pieces = _holder_pieces(name, entry)
    if entry["partition_dim"] < 0:
        full = read_piece(pieces[0]["file"], pieces[0]["key"])
    else:
        full = unshard([read_piece(p["file"], p["key"]) for p in pieces], entry["partition_dim"],
                       entry["partition_chunks"])
    _check_shape(name, full.shape, entry["shape"])
    return full


def merge_to_global(index: dict, read_piece: ReadPiece) -> Iterator[Tuple[str, torch.Tensor]]:
    """(global name, tensor) for every tensor of the index, in model order, one at a time."""
    for name, entry in index.items():
        yield name, global_tensor(name, entry, read_piece)


def _rows_from_pieces(name: str, entry: dict, read_piece: ReadPiece, wanted: torch.Tensor) -> torch.Tensor:
    """Rows `wanted` (global positions along partition_dim) of a global tensor, reading only
    the pieces that hold them."""
    dim = entry["partition_dim"]
    pieces = _holder_pieces(name, entry)
    owner = torch.full((entry["shape"][dim],), -1, dtype=torch.long)
    offset = torch.zeros_like(owner)
    for i, p in enumerate(pieces):
        idx = torch.cat([torch.arange(a, b) for a, b in p["ranges"]])
        owner[idx] = i
        offset[idx] = torch.arange(len(idx))
    if (owner < 0).any():
        raise ValueError(f"the pieces of {name} in the tensor index do not cover it; metadata.json is damaged")
    who = owner[wanted]
    parts = []
    for i in who.unique().tolist():
        slots = (who == i).nonzero().squeeze(1)
        parts.append((slots, _take(read_piece(pieces[i]["file"], pieces[i]["key"]), dim, offset[wanted[slots]])))
    if len(parts) == 1:
        return parts[0][1]
    shape = list(parts[0][1].shape)
    shape[dim] = len(wanted)
    out = parts[0][1].new_empty(shape)
    for slots, part in parts:
        done = 0
        for a, b in runs_of(slots):
            out.narrow(dim, a, b - a).copy_(part.narrow(dim, done, b - a))
            done += b - a
    return out


def reshard_rank_tensors(index: dict, read_piece: ReadPiece, model_cfg: ModelConfig, tp: int, pp: int,
                         tp_rank: int, pp_rank: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """(state_dict key, tensor) of rank (tp_rank, pp_rank) of a TP x PP layout, one at a time,
    from a checkpoint saved at any layout; see `reshard_rank_state`."""
    for p in rank_params(model_cfg, tp, pp, tp_rank, pp_rank):
        entry = index.get(p.global_name)
        if entry is None:
            raise ValueError(f"the checkpoint has no {p.global_name}: it was saved from a model with another "
                             f"architecture; fix the flags or pass --use-checkpoint-args")
        vocab_dim = (p.partition_dim,) if p.global_name in VOCAB_TENSORS else ()
        _check_shape(p.global_name, entry["shape"], p.global_shape, vocab_dim)
        if p.partition_dim < 0 or entry["partition_dim"] < 0:
            if p.partition_dim != entry["partition_dim"]:
                raise ValueError(f"{p.global_name} is split along dim {entry['partition_dim']} in the checkpoint "
                                 f"but along {p.partition_dim} in the model; the checkpoint is from another model")
            pieces = _holder_pieces(p.global_name, entry)
            same = pieces[tp_rank % len(pieces)]     # every copy is equal: read the nearest
            yield p.key, _owned(read_piece(same["file"], same["key"]))
            continue
        wanted = _wanted_rows(p, entry["shape"][p.partition_dim], tp, tp_rank)
        yield p.key, _rows_from_pieces(p.global_name, entry, read_piece, wanted)


def reshard_rank_state(index: dict, read_piece: ReadPiece, model_cfg: ModelConfig, tp: int, pp: int,
                       tp_rank: int, pp_rank: int) -> Dict[str, torch.Tensor]:
    """State_dict of rank (tp_rank, pp_rank) of a TP x PP layout, from a checkpoint saved at any layout.

    Reads only the source pieces that overlap this rank's pieces. `read_piece(file, key)`
    may return any tensor stored under the index's names (parameters, or an optimizer
    moment kept under the same keys). A vocabulary padded differently is cut or extended as
    the module docstring says.
    """
    return OrderedDict(reshard_rank_tensors(index, read_piece, model_cfg, tp, pp, tp_rank, pp_rank))


# --------------------------------------------------------------------------- reading rank files

def open_piece_reader(iter_dir: str) -> ReadPiece:
    """read_piece(file, key) over the rank files of `iter_dir`.

    Each call memory-maps the file (torch.load(mmap=True, weights_only=True): ~20 ms for a
    file of a few hundred tensors), copies out the one piece and lets the map go, so the
    process holds only the pieces it keeps: a map kept open would hold every page read
    through it in the process's resident memory.
    """
    def read_piece(file: str, key: str) -> torch.Tensor:
        path = os.path.join(iter_dir, file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
        model = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
        if key not in model:
            raise KeyError(f"{file} has no tensor {key}; the checkpoint does not match its metadata.json")
        return model[key].clone()

    return read_piece
