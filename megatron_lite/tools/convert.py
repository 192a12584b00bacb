"""Convert checkpoints: Hugging Face <-> megatron_lite <-> Megatron-LM (torch, torch_dist), at any TP/PP.

    python -m megatron_lite.tools.convert --loader hf --saver megatron_lite --load-dir HF_DIR --save-dir OUT \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 [--params-dtype bf16]
    python -m megatron_lite.tools.convert --loader megatron_lite --saver hf --load-dir OUT --save-dir HF_OUT
    python -m megatron_lite.tools.convert --loader megatron_lite --saver megatron_lite --load-dir OUT \\
        --save-dir OUT_TP1 --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1
    python -m megatron_lite.tools.convert --loader megatron --saver megatron_lite --load-dir MEGATRON_SAVE_DIR \
        --save-dir OUT [--target-tensor-parallel-size 2]
    python -m megatron_lite.tools.convert --loader megatron_lite --saver megatron --saver-ckpt-format torch_dist \
        --load-dir OUT --save-dir MEGATRON_OUT

`--loader megatron` reads Megatron-LM's legacy `torch` or Megatron-Core's `torch_dist` checkpoints
(the format is detected); `--saver megatron` writes either, weights only, with the args Megatron-LM's
load code checks (load it there with --finetune, or --no-load-optim --no-load-rng).

Hugging Face -> megatron_lite writes a weights-only checkpoint `OUT/release` (load it with
`--finetune --load OUT` or `--pretrained-checkpoint OUT`) and copies the Hugging Face directory
to `OUT/hf`, so OUT serves both worlds; megatron_lite -> Hugging Face reuses that `hf/` folder's
config and tokenizer when it is there. megatron_lite -> megatron_lite converts the weights of
the loaded iteration (resharding optimizer state is the loader's job: see checkpoint/reshard/sharding.py).

Tensors stream one at a time: memory holds one output rank file (megatron_lite) or one
safetensors shard (Hugging Face). Everything is written into a temporary directory beside
--save-dir and renamed at the end, so a conversion that stops writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from collections import OrderedDict
from typing import Callable, Iterator, Optional, Tuple

import torch

from megatron_lite.arguments import pad_vocab_size
from megatron_lite.checkpoint import adapters
from megatron_lite.checkpoint.manager import shard_contents
from megatron_lite.checkpoint.hf import peft
from megatron_lite.checkpoint.hf import (UnsupportedModelError, architecture_for, architecture_of,
                                         megatron_to_hf, plan_hf_to_megatron)
from megatron_lite.checkpoint.hf.io import (CONFIG_FILE, GENERATION_CONFIG_FILE, HFCheckpointReader,
                                            SafetensorsShardWriter, copy_files, parse_size, read_json,
                                            tokenizer_files, write_json, write_safetensors)
from megatron_lite.checkpoint.io.integrity import CheckpointMetadataError, read_metadata, verify_checkpoint
from megatron_lite.checkpoint.io.layout import (MODEL_FILENAME, METADATA_FILENAME, RELEASE,
                                                iteration_dir_name, model_shard_path)
from megatron_lite.checkpoint.recovery import CheckpointLoadError, choose_checkpoint
from megatron_lite.checkpoint.formats import (MEGATRON_FORMATS, OWN_FORMAT, SourceCheckpoint,
                                              describe_contents, detect_format, format_module)
from megatron_lite.checkpoint.formats import megatron_legacy, torch_dist
from megatron_lite.checkpoint.formats.megatron_args import megatron_args_from_config
from megatron_lite.checkpoint.io.layout import TRACKER_FILENAME
from megatron_lite.checkpoint.reshard.sharding import (build_tensor_index, merge_to_global, open_piece_reader,
                                                       rank_params, rank_tensors, reshard_rank_tensors,
                                                       skeleton_state)
from megatron_lite.checkpoint.io.storage import (CommitSpec, _parallel_layout, commit, prepare_tmp_dir,
                                              write_files)
from megatron_lite.config import ModelConfig, RunConfig
from megatron_lite.model.lora import base_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HF_SUBDIR = "hf"
MODE = "converted"

RankTensors = Callable[[int, int], Iterator[Tuple[str, torch.Tensor]]]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--loader", required=True, choices=["hf", "megatron_lite", "megatron"],
                   help="format of --load-dir (megatron: Megatron-LM's torch or torch_dist, detected)")
    p.add_argument("--saver", required=True, choices=["hf", "megatron_lite", "megatron", "peft"],
                   help="format to write (megatron: Megatron-LM's, in --saver-ckpt-format; peft: a LoRA "
                        "checkpoint's adapters as adapter_model.safetensors + adapter_config.json)")
    p.add_argument("--merge-lora", action="store_true",
                   help="megatron_lite loader, LoRA checkpoint: write its base model with the adapters merged "
                        "into the weights (W + alpha/r * B A), in any saver's format")
    p.add_argument("--saver-ckpt-format", choices=list(MEGATRON_FORMATS), default="torch",
                   help="megatron saver: legacy torch (mp_rank_* files, Megatron-LM's converter's format) or "
                        "torch_dist (Megatron-Core's, any TP/PP on load)")
    p.add_argument("--load-dir", required=True, help="Hugging Face model directory or megatron_lite save directory")
    p.add_argument("--save-dir", required=True, help="output directory; must not exist yet (or be empty)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="TP of the megatron_lite output (default: 1 from Hugging Face, else the source's)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                   help="PP of the megatron_lite output (default: 1 from Hugging Face, else the source's)")
    p.add_argument("--true-vocab-size", type=int, default=None,
                   help="rows of the vocabulary that are real tokens (default: Hugging Face's vocab_size, or the "
                        "checkpoint's vocab_size); the rest is padding")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocabulary to a multiple of this times TP (default: 128, or the checkpoint's)")
    p.add_argument("--params-dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the written weights (default: the source's)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="Hugging Face loader: the training sequence length to record (default: "
                        "max_position_embeddings)")
    p.add_argument("--ckpt-step", type=int, default=None,
                   help="megatron_lite loader: convert this iteration (default: the latest)")
    p.add_argument("--max-shard-size", default="5GB", help="Hugging Face saver: largest safetensors shard")
    return p.parse_args(argv)


class Progress:
    """A status line on stderr (percent, GB, MB/s, ETA) while tensors go out, and a summary line."""

    def __init__(self, label: str, total_bytes: int):
        self.label, self.total, self.done = label, max(total_bytes, 1), 0
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self.last >= (0.5 if self.tty else 10.0):
            self.last = now
            elapsed = now - self.start
            rate = self.done / elapsed
            line = (f"{self.label}: {100 * self.done / self.total:5.1f}% | {self.done / 1e9:.2f}/"
                    f"{self.total / 1e9:.2f} GB | {rate / 1e6:.1f} MB/s | ETA {(self.total - self.done) / rate:.0f} s")
            print("\r" + line if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.tty:
            print(file=sys.stderr)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
        return (f"{self.label}: {self.done / 1e9:.2f} GB in {elapsed:.1f} s ({self.done / 1e6 / elapsed:.1f} MB/s), "
                f"peak RSS {peak_rss / 1e9:.2f} GB")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _index_bytes(index: dict, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(size * torch.Size(pc["shape"]).numel() for e in index.values() for pc in e["pieces"])


# --------------------------------------------------------------------------- megatron_lite side

def write_megatron(staging: str, iteration, run_cfg: RunConfig, index: dict, dtype: torch.dtype,
                   tensors_of: RankTensors, extra_metadata: dict) -> str:
    """A weights-only checkpoint `staging/<iteration dir>` through storage's commit protocol,
    one rank file at a time; returns the progress summary."""
    tp, pp = run_cfg.parallel.tensor_model_parallel_size, run_cfg.parallel.pipeline_model_parallel_size
    metadata = {"config": run_cfg.to_dict(), "parallel": {"tp": tp, "pp": pp, "dp": 1}, "mode": MODE,
                "has_optimizer": False, "has_rng": False, "tensors": index, **extra_metadata}
    relpaths = [model_shard_path(t, p) for p in range(pp) for t in range(tp)]
    spec = CommitSpec(save_dir=staging, iteration=iteration, kind="weights",
                      metadata=json.loads(json.dumps(metadata)), layout=_parallel_layout(None, relpaths),
                      world_size=tp * pp)
    prepare_tmp_dir(spec)
    progress = Progress("writing megatron_lite shards", _index_bytes(index, dtype))
    entries = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            model = OrderedDict()
            for key, tensor in tensors_of(tp_rank, pp_rank):
                model[key] = tensor.to(dtype)
                progress.add(_nbytes(model[key]))
            shard = shard_contents(0 if iteration == RELEASE else iteration, MODE, model)
            entries.update(write_files(spec.tmp_dir, {model_shard_path(tp_rank, pp_rank): shard},
                                       rank=pp_rank * tp + tp_rank))
    commit(spec, [entries])
    return progress.summary()


def find_megatron(load_dir: str, ckpt_step: Optional[int]) -> Tuple[str, str, dict]:
    """(save directory, iteration directory, metadata) of the checkpoint to convert; --load-dir may
    name the save directory or one iteration directory in it."""
    if os.path.isfile(os.path.join(load_dir, METADATA_FILENAME)):
        problems = verify_checkpoint(load_dir)
        if problems:
            raise CheckpointLoadError(f"{load_dir} failed its checks: {'; '.join(problems)}")
        iter_dir = load_dir
    else:
        plan = choose_checkpoint(load_dir, ckpt_step, None, allow_weights_only=True)
        if plan.iteration is None:
            raise CheckpointLoadError(f"--load-dir {load_dir} holds no megatron_lite checkpoint")
        iter_dir = plan.iter_dir
    meta = read_metadata(iter_dir)
    if "tensors" not in meta or "config" not in meta:
        raise CheckpointMetadataError(f"{iter_dir}/metadata.json has no global tensor index or config; it was not "
                                      f"written by megatron_lite's checkpointing")
    return os.path.dirname(os.path.normpath(iter_dir)), iter_dir, meta


def _set_layout(run_cfg: RunConfig, tp: int, pp: int, dtype: torch.dtype) -> None:
    m = run_cfg.model
    m.padded_vocab_size = pad_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    run_cfg.parallel.tensor_model_parallel_size, run_cfg.parallel.pipeline_model_parallel_size = tp, pp
    run_cfg.optimizer.bf16, run_cfg.optimizer.fp16 = dtype == torch.bfloat16, dtype == torch.float16


def _set_true_vocab(cfg: ModelConfig, true_vocab_size: Optional[int], rows: int) -> None:
    if true_vocab_size is None:
        return
    if not 0 < true_vocab_size <= rows:
        raise ValueError(f"--true-vocab-size {true_vocab_size} must be between 1 and the {rows} rows of the "
                         f"source's word embedding")
    cfg.vocab_size = true_vocab_size


# --------------------------------------------------------------------------- Megatron-LM side

def find_megatron_lm(load_dir: str, ckpt_step: Optional[int]) -> SourceCheckpoint:
    """The reader of the Megatron-LM checkpoint to convert (torch or torch_dist, detected); --load-dir
    may name the save directory or one iteration directory in it."""
    iter_dir = load_dir
    if detect_format(load_dir) == OWN_FORMAT:
        found = megatron_legacy.find_iteration(load_dir, ckpt_step)
        if found is None:
            raise CheckpointLoadError(f"--load-dir {load_dir} holds no checkpoint (it holds "
                                      f"{describe_contents(load_dir)})")
        iter_dir = found[1]
    fmt = detect_format(iter_dir)
    if fmt == OWN_FORMAT:
        raise CheckpointLoadError(f"{iter_dir} is not a Megatron-LM checkpoint (torch or torch_dist); it holds "
                                  f"{describe_contents(iter_dir)} (a megatron_lite checkpoint converts with "
                                  f"--loader megatron_lite)")
    return format_module(fmt).open_checkpoint(iter_dir)


def megatron_lm_config(source: SourceCheckpoint) -> RunConfig:
    """The run config that a Megatron-LM checkpoint's args describe; a vocabulary size the args do
    not record is taken as the padded one (--true-vocab-size gives the real one)."""
    run_cfg = RunConfig.from_dict(source.metadata["config"])
    m = run_cfg.model
    if m.vocab_size is None:
        m.vocab_size = m.padded_vocab_size
    return run_cfg


def write_megatron_lm(staging: str, iteration, run_cfg: RunConfig, fmt: str, tensors_of: RankTensors,
                      dtype: torch.dtype) -> str:
    """A weights-only Megatron-LM checkpoint `staging/<iteration dir>` in `fmt`, one rank at a time
    (torch), or as whole tensors in one DCP save (torch_dist, which any TP/PP reads: `run_cfg`'s
    layout is TP1 x PP1 then)."""
    tp, pp = run_cfg.parallel.tensor_model_parallel_size, run_cfg.parallel.pipeline_model_parallel_size
    it = 0 if iteration == RELEASE else iteration
    progress = Progress(f"writing Megatron-LM {fmt}", _index_bytes(build_tensor_index(run_cfg.model, tp, pp, dtype),
                                                                    dtype))
    if fmt == "torch_dist":
        model = OrderedDict()
        for key, tensor in tensors_of(0, 0):
            model[key] = tensor.to(dtype)
            progress.add(_nbytes(model[key]))
        torch_dist.write_weights(staging, it, run_cfg, model)
        with open(os.path.join(staging, TRACKER_FILENAME)) as f:
            assert f.read().strip() == str(it)
        return progress.summary()
    iter_dir = os.path.join(staging, megatron_legacy.iteration_dir_name(it))
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            model = OrderedDict()
            for key, tensor in tensors_of(tp_rank, pp_rank):
                model[key] = tensor.to(dtype)
                progress.add(_nbytes(model[key]))
            model.update(megatron_legacy.extra_state_keys(model))
            args = megatron_args_from_config(run_cfg, skeleton_state(tp, pp, tp_rank, pp_rank))
            args.iteration = it
            rank_dir = os.path.join(iter_dir, megatron_legacy.shard_dir_name(tp_rank, pp_rank, pp))
            os.makedirs(rank_dir)
            torch.save({"args": args, "checkpoint_version": megatron_legacy.CHECKPOINT_VERSION, "iteration": it,
                        "model": model}, os.path.join(rank_dir, MODEL_FILENAME))
    with open(os.path.join(staging, TRACKER_FILENAME), "w") as f:
        f.write(str(it))
    return progress.summary()


def _target_layout(args, source_layout: dict) -> Tuple[int, int]:
    if args.saver == "hf":
        return 1, 1
    if args.saver == "megatron" and args.saver_ckpt_format == "torch_dist":
        if args.target_tensor_parallel_size or args.target_pipeline_parallel_size:
            raise ValueError("--target-tensor/pipeline-parallel-size: a torch_dist checkpoint holds whole tensors "
                             "and loads at any TP/PP; drop the flags")
        return 1, 1
    return (args.target_tensor_parallel_size or source_layout["tp"],
            args.target_pipeline_parallel_size or source_layout["pp"])


def _config_dtype(run_cfg: RunConfig) -> torch.dtype:
    o = run_cfg.optimizer
    return torch.bfloat16 if o.bf16 else torch.float16 if o.fp16 else torch.float32


def from_megatron_lm(args, staging: str, save_dir: str) -> str:
    """Megatron-LM (torch or torch_dist) -> megatron_lite, hf or Megatron-LM, at any TP/PP."""
    source = find_megatron_lm(args.load_dir, args.ckpt_step)
    run_cfg = megatron_lm_config(source)
    cfg = run_cfg.model
    _set_true_vocab(cfg, args.true_vocab_size, cfg.padded_vocab_size)
    if args.make_vocab_size_divisible_by:
        cfg.make_vocab_size_divisible_by = args.make_vocab_size_divisible_by
    saved_layout = dict(source.metadata["parallel"])
    tp, pp = _target_layout(args, saved_layout)
    dtype = DTYPES[args.params_dtype] if args.params_dtype else _config_dtype(run_cfg)
    _set_layout(run_cfg, tp, pp, dtype)

    def tensors_of(t: int, p: int):
        return iter(source.model_state(cfg, tp, pp, t, p).items())

    origin = {"format": source.format, "directory": os.path.abspath(source.iter_dir), "parallel": saved_layout}
    if args.saver == "megatron_lite":
        return write_megatron(staging, source.iteration, run_cfg, build_tensor_index(cfg, tp, pp, dtype), dtype,
                              tensors_of, {"converted_from": origin})
    if args.saver == "megatron":
        return write_megatron_lm(staging, source.iteration, run_cfg, args.saver_ckpt_format, tensors_of, dtype)
    return write_hf(args, staging, run_cfg, dtype, tensors_of(0, 0))


def megatron_lite_to_megatron_lm(args, staging: str, save_dir: str) -> str:
    root, iter_dir, meta = find_megatron(args.load_dir, args.ckpt_step)
    run_cfg = RunConfig.from_dict(meta["config"])
    cfg, index = run_cfg.model, meta["tensors"]
    _set_true_vocab(cfg, args.true_vocab_size, index["embedding.word_embeddings.weight"]["shape"][0])
    tp, pp = _target_layout(args, meta["parallel"])
    dtype = DTYPES[args.params_dtype] if args.params_dtype else getattr(
        torch, index["embedding.word_embeddings.weight"]["dtype"])
    _set_layout(run_cfg, tp, pp, dtype)
    read_piece = open_piece_reader(iter_dir)
    return write_megatron_lm(staging, meta["iteration"], run_cfg, args.saver_ckpt_format,
                             lambda t, p: reshard_rank_tensors(index, read_piece, cfg, tp, pp, t, p), dtype)


# --------------------------------------------------------------------------- the directions

def hf_to_megatron(args, staging: str, save_dir: str) -> str:
    reader = HFCheckpointReader(args.load_dir)
    arch = architecture_of(reader.config)
    cfg = arch.model_config(reader.config, args.seq_length)
    _set_true_vocab(cfg, args.true_vocab_size, cfg.vocab_size)
    cfg.make_vocab_size_divisible_by = args.make_vocab_size_divisible_by or 128
    tp, pp = args.target_tensor_parallel_size or 1, args.target_pipeline_parallel_size or 1
    embedding = arch.rules(cfg, reader.names)["embedding.word_embeddings.weight"].hf_names[0]
    dtype = DTYPES[args.params_dtype] if args.params_dtype else reader.dtype(embedding)
    run_cfg = RunConfig(model=cfg)
    _set_layout(run_cfg, tp, pp, dtype)
    index = build_tensor_index(cfg, tp, pp, dtype)
    plan = plan_hf_to_megatron(arch, cfg, index, reader.names)
    if tokenizer_files(args.load_dir):
        run_cfg.data.tokenizer_type, run_cfg.data.tokenizer_model = "HuggingFaceTokenizer", os.path.join(
            save_dir, HF_SUBDIR)

    def get_global(name: str) -> torch.Tensor:
        rule = plan[name]
        return rule.to_megatron([reader.get(n) for n in rule.hf_names]).to(dtype)

    summary = write_megatron(
        staging, RELEASE, run_cfg, index, dtype, lambda t, p: rank_tensors(cfg, tp, pp, t, p, get_global),
        {"converted_from": {"format": "hf", "model_type": arch.model_type,
                            "directory": os.path.abspath(args.load_dir)}})
    copy_files(args.load_dir, os.path.join(staging, HF_SUBDIR), weights=True)
    return summary


def megatron_to_megatron(args, staging: str, save_dir: str) -> str:
    root, iter_dir, meta = find_megatron(args.load_dir, args.ckpt_step)
    run_cfg = RunConfig.from_dict(meta["config"])
    cfg = run_cfg.model
    index = meta["tensors"]
    _set_true_vocab(cfg, args.true_vocab_size, index["embedding.word_embeddings.weight"]["shape"][0])
    if args.make_vocab_size_divisible_by:
        cfg.make_vocab_size_divisible_by = args.make_vocab_size_divisible_by
    tp = args.target_tensor_parallel_size or meta["parallel"]["tp"]
    pp = args.target_pipeline_parallel_size or meta["parallel"]["pp"]
    dtype = DTYPES[args.params_dtype] if args.params_dtype else getattr(
        torch, index["embedding.word_embeddings.weight"]["dtype"])
    _set_layout(run_cfg, tp, pp, dtype)
    source_hf = os.path.join(root, HF_SUBDIR)
    if run_cfg.data.tokenizer_model and os.path.abspath(run_cfg.data.tokenizer_model) == os.path.abspath(source_hf):
        run_cfg.data.tokenizer_model = os.path.join(save_dir, HF_SUBDIR)
    read_piece = open_piece_reader(iter_dir)
    summary = write_megatron(
        staging, meta["iteration"], run_cfg, build_tensor_index(cfg, tp, pp, dtype), dtype,
        lambda t, p: reshard_rank_tensors(index, read_piece, cfg, tp, pp, t, p),
        {"converted_from": {"format": "megatron_lite", "directory": os.path.abspath(iter_dir),
                            "parallel": meta["parallel"]}})
    if os.path.isdir(source_hf):
        copy_files(source_hf, os.path.join(staging, HF_SUBDIR), weights=True)
    return summary


# --------------------------------------------------------------------------- LoRA checkpoints

def _global_state(fmt: str, iter_dir: str, model_cfg: ModelConfig):
    """(global name, tensor) of every tensor of a checkpoint in any format."""
    if fmt == OWN_FORMAT:
        return merge_to_global(read_metadata(iter_dir)["tensors"], open_piece_reader(iter_dir))
    return iter(format_module(fmt).open_checkpoint(iter_dir).model_state(model_cfg, 1, 1, 0, 0).items())


def lora_source(args, meta: dict, iter_dir: str) -> Tuple[RunConfig, dict, str, object]:
    """What a LoRA checkpoint converts from, after checking its base is unchanged: (the base's run
    config, its tensor index, its Hugging Face folder, its global tensors with the adapters merged)."""
    base = meta["base"]
    base_iter = os.path.join(base["dir"], iteration_dir_name(base["iteration"]))
    if not os.path.isdir(base_iter):
        raise CheckpointLoadError(f"the base checkpoint {adapters.describe_base(base)} of {iter_dir} is gone")
    adapters.check_base_unchanged(base, base_iter, iter_dir)
    run_cfg = RunConfig.from_dict(meta["config"])
    run_cfg.model = base_config(run_cfg.model)
    fmt = base["format"]
    index = read_metadata(base_iter)["tensors"] if fmt == OWN_FORMAT else build_tensor_index(run_cfg.model, 1, 1)
    adapter = dict(merge_to_global(meta["tensors"], open_piece_reader(iter_dir)))
    lora = meta["lora"]
    items = peft.merged(_global_state(fmt, base_iter, run_cfg.model), adapter, lora["alpha"] / lora["rank"])
    return run_cfg, index, os.path.join(base["dir"], HF_SUBDIR), items


def megatron_to_peft(args, staging: str, save_dir: str) -> str:
    """A LoRA checkpoint's adapters in PEFT's format, for the Hugging Face export of its base."""
    _, iter_dir, meta = find_megatron(args.load_dir, args.ckpt_step)
    if "lora" not in meta:
        raise ValueError(f"{iter_dir} holds no LoRA adapters (it is a whole model): --saver peft writes the "
                         f"adapters of a run trained with --lora-rank")
    cfg = base_config(RunConfig.from_dict(meta["config"]).model)
    base_hf = os.path.join(meta["base"]["dir"], HF_SUBDIR, CONFIG_FILE)
    arch = architecture_of(read_json(base_hf)) if os.path.isfile(base_hf) else architecture_for(cfg)
    index = meta["tensors"]
    dtype = DTYPES[args.params_dtype] if args.params_dtype else getattr(torch, next(iter(index.values()))["dtype"])
    progress = Progress("writing PEFT adapters", _index_bytes(index, dtype))
    tensors = OrderedDict()
    for name, tensor in peft.peft_tensors(arch, cfg, merge_to_global(index, open_piece_reader(iter_dir))):
        tensors[name] = tensor.to(dtype)
        progress.add(_nbytes(tensors[name]))
    write_safetensors(os.path.join(staging, peft.ADAPTER_WEIGHTS_FILE), tensors)
    base_model = os.path.dirname(base_hf) if os.path.isfile(base_hf) else meta["base"]["dir"]
    write_json(os.path.join(staging, peft.ADAPTER_CONFIG_FILE),
               peft.peft_config(arch, cfg, meta["lora"], peft.target_modules(arch, cfg, index), base_model))
    return progress.summary()


def _refuse_adapters(args, meta: dict, iter_dir: str) -> None:
    if "lora" in meta and not args.merge_lora:
        raise ValueError(f"{iter_dir} holds only LoRA adapters (of the base {adapters.describe_base(meta['base'])}): "
                         f"export them with --saver peft, or pass --merge-lora to write the merged model")
    if args.merge_lora and "lora" not in meta:
        raise ValueError(f"--merge-lora: {iter_dir} holds no LoRA adapters; drop the flag")


def megatron_to_hf_dir(args, staging: str, save_dir: str) -> str:
    root, iter_dir, meta = find_megatron(args.load_dir, args.ckpt_step)
    _refuse_adapters(args, meta, iter_dir)
    if args.merge_lora:
        run_cfg, index, source_hf, items = lora_source(args, meta, iter_dir)
        dtype = DTYPES[args.params_dtype] if args.params_dtype else getattr(
            torch, index["embedding.word_embeddings.weight"]["dtype"])
        _set_true_vocab(run_cfg.model, args.true_vocab_size, index["embedding.word_embeddings.weight"]["shape"][0])
        return write_hf(args, staging, run_cfg, dtype, items, source_hf, list(index))
    run_cfg = RunConfig.from_dict(meta["config"])
    index = meta["tensors"]
    _set_true_vocab(run_cfg.model, args.true_vocab_size, index["embedding.word_embeddings.weight"]["shape"][0])
    dtype = DTYPES[args.params_dtype] if args.params_dtype else getattr(
        torch, index["embedding.word_embeddings.weight"]["dtype"])
    return write_hf(args, staging, run_cfg, dtype, merge_to_global(index, open_piece_reader(iter_dir)),
                    os.path.join(root, HF_SUBDIR), list(index))


def write_hf(args, staging: str, run_cfg: RunConfig, dtype: torch.dtype, global_items, source_hf: str = "",
             names=()) -> str:
    """A Hugging Face directory from a stream of (global name, tensor): safetensors shards, config.json
    (over the source's own HF config when `source_hf` holds one), tokenizer and generation config."""
    cfg = run_cfg.model
    base = read_json(os.path.join(source_hf, CONFIG_FILE)) if source_hf and os.path.isfile(
        os.path.join(source_hf, CONFIG_FILE)) else {}
    arch = architecture_of(base) if base else architecture_for(cfg)
    dtype_name = str(dtype).replace("torch.", "")
    hf_config = {**base, **arch.hf_config(cfg), "dtype": dtype_name, "torch_dtype": dtype_name}
    unknown = [n for n in names if n not in arch.rules(cfg)]
    if unknown:
        raise UnsupportedModelError(f"{unknown[:5]} have no {arch.hf_class} counterpart")

    writer = SafetensorsShardWriter(staging, parse_size(args.max_shard_size))
    total = sum(torch.Size(p.global_shape).numel() for p in rank_params(cfg, 1, 1, 0, 0)) * torch.empty(
        (), dtype=dtype).element_size()
    progress = Progress("writing safetensors", total)
    for name, tensor in megatron_to_hf(arch, cfg, global_items):
        tensor = tensor.to(dtype)
        writer.add(name, tensor)
        progress.add(_nbytes(tensor))
    writer.close()
    write_json(os.path.join(staging, CONFIG_FILE), hf_config)
    if source_hf and os.path.isdir(source_hf):
        copy_files(source_hf, staging, weights=False, skip=(CONFIG_FILE,))
    elif tokenizer_files(run_cfg.data.tokenizer_model):
        for name in tokenizer_files(run_cfg.data.tokenizer_model):
            shutil.copy2(os.path.join(run_cfg.data.tokenizer_model, name), staging)
    if not os.path.isfile(os.path.join(staging, GENERATION_CONFIG_FILE)):
        write_json(os.path.join(staging, GENERATION_CONFIG_FILE),
                   {"_from_model_config": True, **{k: hf_config[k] for k in ("bos_token_id", "eos_token_id",
                                                                              "pad_token_id") if k in hf_config}})
    return progress.summary()


DIRECTIONS = {("hf", "megatron_lite"): hf_to_megatron, ("megatron_lite", "megatron_lite"): megatron_to_megatron,
              ("megatron_lite", "hf"): megatron_to_hf_dir, ("megatron_lite", "megatron"): megatron_lite_to_megatron_lm,
              ("megatron", "megatron_lite"): from_megatron_lm, ("megatron", "megatron"): from_megatron_lm,
              ("megatron", "hf"): from_megatron_lm, ("megatron_lite", "peft"): megatron_to_peft}


def convert(args: argparse.Namespace) -> str:
    """Run one conversion into a temporary directory and rename it to --save-dir; the summary line."""
    direction = DIRECTIONS.get((args.loader, args.saver))
    if direction is None:
        raise ValueError(f"--loader {args.loader} --saver {args.saver} is not a conversion; use one of "
                         + ", ".join(f"{a} -> {b}" for a, b in DIRECTIONS))
    save_dir = os.path.abspath(args.save_dir)
    if args.merge_lora and (args.loader, args.saver) != ("megatron_lite", "hf"):
        raise ValueError("--merge-lora converts a megatron_lite LoRA checkpoint to Hugging Face (--loader "
                         "megatron_lite --saver hf)")
    if os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
        raise ValueError(f"--save-dir {save_dir} already exists and is not empty; pick a new directory")
    staging = f"{save_dir}.converting-{os.getpid()}"
    os.makedirs(staging)
    try:
        summary = direction(args, staging, save_dir)
        if os.path.isdir(save_dir):
            os.rmdir(save_dir)
        os.rename(staging, save_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(convert(args))
    except (UnsupportedModelError, ValueError, FileNotFoundError, CheckpointLoadError, CheckpointMetadataError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.abspath(args.save_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
