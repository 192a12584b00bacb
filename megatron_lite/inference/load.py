"""A Run for generation from any checkpoint the CheckpointManager reads (megatron_lite's own, converted
from Hugging Face by megatron_lite.tools.convert, Megatron-LM's torch and torch_dist), at the TP/PP
of this launch.

    cfg = parse_args(["--load", DIR, "--tensor-model-parallel-size", "2"])
    run = load_for_inference(cfg)

The configuration is the checkpoint's: every model field, the tokenizer flags and the weights'
dtype (--bf16, --fp16) that the flags leave unset, taken as --use-checkpoint-args takes them, but
before validation, so that the sizes it checks against TP and PP are the checkpoint's. The
recomputation settings only shape training and stay as the flags say. The weights load through the
CheckpointManager in finetune mode (weights only, verified and resharded as for training); sequence
parallelism is off.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional

from megatron_lite.arguments import ConfigError
from megatron_lite.checkpoint.formats import OWN_FORMAT, describe_contents, format_module
from megatron_lite.checkpoint.io.integrity import read_metadata
from megatron_lite.checkpoint.io.layout import is_iteration_number
from megatron_lite.checkpoint.recovery import find_checkpoints, read_tracker
from megatron_lite.config import ModelConfig, RunConfig
from megatron_lite.initialize import Run, build_run, setup_parallel

# model fields that only training reads (a checkpoint's recompute layers may not fit this PP)
TRAINING_ONLY_FIELDS = ("padded_vocab_size", "recompute_activations", "recompute_granularity", "recompute_method",
                        "recompute_num_layers", "recompute_modules")
TOKENIZER_FIELDS = ("tokenizer_type", "tokenizer_model", "tiktoken_pattern", "tiktoken_num_special_tokens",
                    "tokenizer_special_tokens", "vocab_file", "merge_file")
_MISSING = object()


class IdsOnlyTokenizer:
    """Token ids without text, for a checkpoint whose tokenizer cannot be built here (e.g. one
    converted from a Hugging Face directory without tokenizer files): text is a ConfigError that
    says why. No end-of-document token, so generation runs to --max-new-tokens."""

    eod = None

    def __init__(self, vocab_size: int, problem: str):
        self.vocab_size, self.problem = vocab_size, problem
        self.description = f"IdsOnlyTokenizer({vocab_size})"

    def _refuse(self):
        raise ConfigError(f"{self.problem}; give the prompt as --prompt-ids, or pass the tokenizer flags "
                          f"(--tokenizer-type, --tokenizer-model, ...)")

    def tokenize(self, text: str) -> List[int]:
        self._refuse()

    def detokenize(self, ids: List[int]) -> str:
        self._refuse()


def checkpoint_metadata(load_dir: str, ckpt_step: Optional[str] = None) -> dict:
    """The metadata (config, layout) of the checkpoint in `load_dir` that --ckpt-step N, else the
    tracker, else the newest names; read without verifying it: the CheckpointManager verifies the
    one it loads, and stops on any model field that differs from it."""
    if not os.path.isdir(load_dir):
        raise ConfigError(f"--load {load_dir}: no such directory; pass a checkpoint directory (pretrain_gpt.py's "
                          f"--save, megatron_lite.tools.convert's --save-dir, or Megatron-LM's --save)")
    committed = [c for c in find_checkpoints(load_dir) if c.state == "committed"]
    if not committed:
        raise ConfigError(f"--load {load_dir}: no checkpoint in it (it holds {describe_contents(load_dir)}); pass "
                          f"the directory that holds iter_*/ or release/")
    wanted = int(ckpt_step) if ckpt_step is not None and is_iteration_number(str(ckpt_step)) else read_tracker(load_dir)[0]
    chosen = next((c for c in committed if c.iteration == wanted), committed[0])
    if chosen.format == OWN_FORMAT:
        return read_metadata(chosen.path)
    return format_module(chosen.format).open_checkpoint(chosen.path).metadata


def take_checkpoint_config(cfg: RunConfig, saved: dict) -> None:
    """Copy the checkpoint's model fields, tokenizer flags and weights' dtype into the fields no flag set."""
    fields = [("model", f.name) for f in dataclasses.fields(ModelConfig) if f.name not in TRAINING_ONLY_FIELDS]
    fields += [("data", name) for name in TOKENIZER_FIELDS] + [("optimizer", "bf16"), ("optimizer", "fp16")]
    for section, name in fields:
        value = saved.get(section, {}).get(name, _MISSING)
        if value is not _MISSING and f"{section}.{name}" not in cfg.explicit:
            setattr(getattr(cfg, section), name, value)


def inference_tokenizer(cfg: RunConfig, saved_model: dict):
    """The checkpoint's tokenizer (as the flags and its config describe it) when it can be built here
    and has as many tokens as the model; otherwise an IdsOnlyTokenizer of the model's vocabulary. A
    checkpoint that records no vocabulary size (Megatron-LM's args) takes the tokenizer's, or without
    one the padded size."""
    from megatron_lite.data import build_tokenizer
    d, vocab_size = cfg.data, saved_model.get("vocab_size")
    ids_only_size = vocab_size or saved_model.get("padded_vocab_size")
    # only NullTokenizer and TikTokenizer are sized by --vocab-size; NullTokenizer adds its eod to it,
    # and a checkpoint records the sum
    size = {"NullTokenizer": vocab_size - 1 if vocab_size else None, "TikTokenizer": vocab_size}.get(d.tokenizer_type)
    try:
        tokenizer = build_tokenizer(d, size)
    except (ValueError, OSError, ImportError) as e:
        return IdsOnlyTokenizer(ids_only_size, f"the checkpoint's tokenizer ({d.tokenizer_type}) cannot be built: {e}")
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        return IdsOnlyTokenizer(vocab_size, f"the checkpoint's model has {vocab_size} tokens but its tokenizer "
                                            f"({d.tokenizer_type}) has {tokenizer.vocab_size}")
    return tokenizer


def load_for_inference(cfg: RunConfig) -> Run:
    """The Run of --load's checkpoint at this launch's TP/PP, in eval mode: the model config and the
    tokenizer from the checkpoint (flags override them), the weights through the CheckpointManager,
    which prints its recovery report on rank 0. Collective: every rank calls it."""
    from megatron_lite.checkpoint.manager import CheckpointManager

    c = cfg.checkpoint
    if not c.load:
        raise ConfigError("generation needs --load DIR: the checkpoint to generate from")
    saved = checkpoint_metadata(c.load, c.ckpt_step).get("config", {})
    take_checkpoint_config(cfg, saved)
    c.finetune, c.load_optim, c.load_rng, c.use_checkpoint_args = True, False, False, False   # weights only
    cfg.parallel.sequence_parallel = False
    cfg.model.fp8 = None   # decoding in the checkpoint's precision: FP8 GEMMs need 16-token multiples
    if cfg.train.train_iters is None and cfg.train.train_samples is None:
        cfg.train.train_iters = 1   # the Run's LR schedule needs a length; nothing trains
    state = setup_parallel(cfg)
    checkpoints = CheckpointManager(cfg, state)
    checkpoints.decide()
    run = build_run(cfg, state, inference_tokenizer(cfg, saved.get("model", {})))
    run.checkpoints, run.mode = checkpoints, checkpoints.mode
    checkpoints.restore(run)
    run.model.eval()
    return run
