"""The load decision: which checkpoint each part of the state comes from, made before the model exists
(so --use-checkpoint-args can shape it) and identical on every rank, and the check of the flags'
model config against the chosen checkpoints.

Modes (the mode a run *requests* comes from its flags; the mode a checkpoint *records* is the
mode of the run that wrote it):
    resume         no mode flags: everything restored
    finetune       --finetune: weights only; iteration, optimizer, scheduler, RNG fresh
    further-train  --reset-sample-stat: weights, optimizer, scheduler (unless
                   --no-load-lr-scheduler), RNG; iteration and consumed samples reset
    weights        --pretrained-checkpoint DIR: weights only, used when --load has nothing
--load-weights-from DIR2 replaces the weights of a resume or further-train with DIR2's (weights_from.py).
A run whose own --save (or --load) directory already holds a checkpoint recorded in the mode it
requests has already done that mode's reset: it resumes plainly, so one launch script serves the
first start and every restart.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import List, Optional

from megatron_lite.arguments import ConfigError, validate
from megatron_lite.checkpoint.formats import OWN_FORMAT, SourceCheckpoint, format_module
from megatron_lite.checkpoint.formats.megatron_lite import OwnCheckpoint
from megatron_lite.checkpoint.io.layout import BEST_FILENAME
from megatron_lite.checkpoint.io.storage import read_metadata
from megatron_lite.checkpoint.recovery import choose_checkpoint, read_tracker
from megatron_lite.checkpoint.weights_from import STEP_FLAG, WeightsSource
from megatron_lite.config import ModelConfig, RunConfig
from megatron_lite.parallel.state import ParallelState


# Fields that change the shape or meaning of the weights: a checkpoint and the flags must agree.
ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "max_position_embeddings", "vocab_size", "normalization", "swiglu",
    "position_embedding_type", "rotary_base", "rotary_percent", "use_rope_scaling", "rope_scaling_factor",
    "add_bias_linear", "add_qkv_bias", "untie_embeddings_and_output_weights", "apply_layernorm_1p",
    "qk_layernorm", "squared_relu", "rotary_interleaved",
)
# what --use-checkpoint-args takes from a checkpoint where the flags leave it unset: Megatron-LM's
# load_args_from_checkpoint list (the architecture, the sequence length, the dropouts, the
# deprecated position-embedding flags) and the norms' epsilon and the vocabulary padding
CHECKPOINT_ARGS = tuple(f for f in ARCHITECTURE_FIELDS if f != "vocab_size") + (
    "seq_length", "norm_epsilon", "make_vocab_size_divisible_by", "apply_query_key_layer_scaling",
    "hidden_dropout", "attention_dropout", "add_position_embedding", "use_rotary_position_embeddings")
# and, unless --no-use-tokenizer-model-from-checkpoint-args, the tokenizer
CHECKPOINT_TOKENIZER_ARGS = ("tokenizer_type", "tokenizer_model", "tiktoken_pattern", "vocab_file", "merge_file")


def requested_mode(cfg: RunConfig) -> str:
    c = cfg.checkpoint
    if c.finetune:
        return "finetune"
    if c.reset_sample_stat:
        return "further-train"
    return "pretrain"


@dataclass
class LoadDecision:
    """Where to load from and what to restore; made before the model exists (for
    --use-checkpoint-args) and identical on every rank."""
    load_dir: Optional[str] = None
    plan: object = None
    metadata: Optional[dict] = None
    action: str = "none"            # none | resume | finetune | further-train | weights
    own_restart: bool = False       # resuming a finetune/further-train run's own checkpoint
    source: Optional[SourceCheckpoint] = None   # the reader of the chosen checkpoint, whatever its format
    weights: Optional[WeightsSource] = None     # --load-weights-from's checkpoint, when the weights come from it

    @property
    def iteration(self):
        return self.plan.iteration if self.plan is not None else None


def _plan(directory: str, ckpt_step, state, best: bool = False, step_flag: str = "--ckpt-step"):
    """The checkpoint to load from `directory` (verified once, here), or None when it has none."""
    plan = choose_checkpoint(directory, ckpt_step, state, allow_weights_only=True, step_flag=step_flag)
    if best and plan.iteration is not None:
        plan.reason = "best"
    return plan if plan.iteration is not None else None


def open_chosen(directory: str, plan) -> tuple:
    """(metadata, reader) of a chosen checkpoint: megatron_lite's metadata.json (its verified files
    travel in the reader), or the metadata one of Megatron-LM's formats derives from its args."""
    if plan.format == OWN_FORMAT:
        meta = plan.metadata or read_metadata(plan.iter_dir)
        return meta, OwnCheckpoint(directory, plan, meta)
    source = format_module(plan.format).open_checkpoint(plan.iter_dir)
    return source.metadata, source


def _step(step: Optional[str], directory: str, flag: str) -> Optional[int]:
    """A step flag (--ckpt-step, --load-weights-from-step) as an iteration of `directory`: None for
    `auto` or unset (the tracker's, else the newest intact), a number, or `best`, the iteration
    best_checkpointed_iteration.txt names."""
    if step in (None, "auto"):
        return None
    if step != "best":
        return int(step)
    best, problem = read_tracker(directory, BEST_FILENAME)
    if best is None:
        raise ConfigError(f"{flag} best: {directory}/{BEST_FILENAME} is {problem}; it names the checkpoint with "
                          f"the lowest validation loss once a run with --eval-interval has saved after an evaluation")
    return best


def decide_load(cfg: RunConfig, state: ParallelState, resume_own: bool = True) -> LoadDecision:
    """Where the training state comes from, and with --load-weights-from where the weights do.
    `resume_own=False` looks only at --load and starts its mode afresh from it (a finetune started
    again from its base, whatever its --save holds)."""
    decision = _decide_training_state(cfg, state, resume_own)
    decision.weights = _decide_weights(cfg, state, decision)
    return decision


def _decide_weights(cfg: RunConfig, state: ParallelState, decision: LoadDecision) -> Optional[WeightsSource]:
    """--load-weights-from's checkpoint; its weights are not taken again when --load's chosen
    checkpoint records that it was trained from them (a restart of the same command line)."""
    c = cfg.checkpoint
    if not c.load_weights_from:
        return None
    if not os.path.isdir(c.load_weights_from):
        raise ConfigError(f"--load-weights-from {c.load_weights_from}: no such directory; check the path")
    if decision.action == "none":
        raise ConfigError(f"--load-weights-from {c.load_weights_from}: --load {c.load} holds no checkpoint whose "
                          f"training state would go with the weights; pass --load a directory of full checkpoints, "
                          f"or --pretrained-checkpoint {c.load_weights_from} to start from the weights afresh")
    plan = _plan(c.load_weights_from, _step(c.load_weights_from_step, c.load_weights_from, STEP_FLAG), state,
                 best=c.load_weights_from_step == "best", step_flag=STEP_FLAG)
    if plan is None:
        raise ConfigError(f"--load-weights-from {c.load_weights_from} holds no intact checkpoint; check the path")
    meta, source = open_chosen(c.load_weights_from, plan)
    weights = WeightsSource(c.load_weights_from, plan, meta, source)
    weights.applied = decision.metadata.get("weights_from") != weights.record
    return weights


def _decide_training_state(cfg: RunConfig, state: ParallelState, resume_own: bool = True) -> LoadDecision:
    c, mode = cfg.checkpoint, requested_mode(cfg)
    if c.load and not os.path.isdir(c.load) and (
            not c.save or os.path.abspath(c.load) != os.path.abspath(c.save)):
        raise ConfigError(f"--load {c.load}: no such directory; check the path (a first run that will save "
                          f"there passes the same directory to --save), or drop --load to train from scratch")
    # 1. this run's own checkpoints (a restart of the same command line) or --load's
    for directory in [d for d in dict.fromkeys([c.save if resume_own else None, c.load]) if d]:
        plan = _plan(directory, _step(c.ckpt_step, c.load, "--ckpt-step") if directory == c.load else None, state,
                     best=directory == c.load and c.ckpt_step == "best")
        if plan is None:
            continue
        meta, source = open_chosen(directory, plan)
        found = dict(load_dir=directory, plan=plan, metadata=meta, source=source)
        if plan.kind == "weights":   # never resumed from: only a finetune starts from it
            if directory != c.load:
                continue
            if mode == "finetune":
                return LoadDecision(**found, action="finetune")
            if not c.pretrained_checkpoint:
                fix = ("--load names the full checkpoint whose training state goes with the weights: pass this "
                       "directory as --load-weights-from and a directory of full checkpoints as --load"
                       if c.load_weights_from else "take its weights with --load-weights-from (with a full "
                       "checkpoint as --load), --finetune or --pretrained-checkpoint")
                raise ConfigError(f"{c.load} holds only a weights-only checkpoint ({plan.iter_dir}): it has no "
                                  f"optimizer state to resume; {fix}")
            continue
        if mode == "pretrain" or (resume_own and meta.get("mode", "pretrain") == mode):
            # a restart of a finetune/further-train run: its mode flags (--no-load-optim, ...) were
            # for the first start; everything it saved is restored
            return LoadDecision(**found, action="resume", own_restart=mode != "pretrain")
        if directory == c.load:
            return LoadDecision(**found, action=mode)
    # 2. weights from elsewhere
    if c.pretrained_checkpoint:
        plan = _plan(c.pretrained_checkpoint, None, state)
        if plan is None:
            raise ConfigError(f"--pretrained-checkpoint {c.pretrained_checkpoint} holds no intact checkpoint")
        meta, source = open_chosen(c.pretrained_checkpoint, plan)
        return LoadDecision(c.pretrained_checkpoint, plan, meta, "weights", source=source)
    if c.load and (c.exit_on_missing_checkpoint or mode != "pretrain" or c.ckpt_step not in (None, "auto")):
        raise ConfigError(f"--load {c.load}: no checkpoint found; check the path (or drop --load to start from "
                          f"scratch)")
    return LoadDecision()


def check_model_config(cfg: RunConfig, decision: LoadDecision, world_size: int = 1) -> None:
    """Stop on any architecture field that differs from the checkpoint's.

    With --use-checkpoint-args, first take the checkpoint's value of every field the command line
    and the YAML file left unset (Megatron-LM's `_set_arg(force=False)`), then validate the whole
    configuration again: an explicit `--seq-length 64` on a checkpoint saved at 128 trains at 64."""
    if decision.metadata is None:
        return
    saved_cfg = decision.metadata.get("config", {})
    saved = saved_cfg.get("model", {})
    if cfg.checkpoint.use_checkpoint_args:
        taken = _take_checkpoint_args(cfg, saved_cfg)
        try:
            validate(cfg, world_size)
        except ConfigError as e:
            raise ConfigError(f"{e} (--use-checkpoint-args took {', '.join(taken)} from "
                              f"{decision.plan.iter_dir})") from None
    diffs = _architecture_diffs(cfg.model, saved)
    if diffs:
        fix = ("drop those flags to take the checkpoint's values" if cfg.checkpoint.use_checkpoint_args else
               "pass --use-checkpoint-args to take the checkpoint's model config, or fix the flags")
        raise ConfigError(f"checkpoint {decision.plan.iter_dir} was saved with " + ", ".join(diffs) + "; " + fix)
    weights = decision.weights
    diffs = _architecture_diffs(cfg.model, weights.metadata.get("config", {}).get("model", {})) if weights else []
    if diffs:
        raise ConfigError(f"checkpoint {weights.plan.iter_dir} (--load-weights-from) was saved with "
                          f"{', '.join(diffs)}, unlike --load's {decision.plan.iter_dir} and the flags; the weights "
                          f"must be of the model whose training state is resumed: pick another --load-weights-from "
                          f"directory or --load-weights-from-step")


def _architecture_diffs(model: ModelConfig, saved: dict) -> List[str]:
    """`name=saved (flags say mine)` for every architecture field a checkpoint's model config differs in."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved_model = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    diffs = []
    for name in ARCHITECTURE_FIELDS:
        if name == "vocab_size" or name not in saved:
            continue
        if saved[name] is None and getattr(model, name) is None:
            continue   # both derive it from the fields above, which are compared themselves
        mine, theirs = _effective(model, name), _effective(saved_model, name)
        if mine != theirs:
            diffs.append(f"{name}={saved[name] if saved[name] is not None else theirs} (flags say "
                         f"{getattr(model, name) if getattr(model, name) is not None else mine})")
    return diffs


def _effective(m: ModelConfig, name: str):
    """The value a field has in the built model: a size left unset (None) is the one derived from
    the others, so a checkpoint that spells it out (Megatron-LM's args do) agrees with flags that
    leave it to the default."""
    derived = {"ffn_hidden_size": lambda: m.ffn_size, "kv_channels": lambda: m.head_dim,
               "num_query_groups": lambda: m.query_groups,
               "max_position_embeddings": lambda: (m.max_position_embeddings or m.seq_length
                                                   if m.position_embedding_type == "learned_absolute" else None)}
    return derived[name]() if name in derived else getattr(m, name)


def _take_checkpoint_args(cfg: RunConfig, saved_cfg: dict) -> List[str]:
    """Copy the checkpoint's values into the fields no flag set; returns the names copied."""
    fields = [("model", name) for name in CHECKPOINT_ARGS]
    if cfg.checkpoint.use_tokenizer_model_from_checkpoint_args:
        fields += [("data", name) for name in CHECKPOINT_TOKENIZER_ARGS]
    taken = []
    for section, name in fields:
        value = saved_cfg.get(section, {}).get(name, _MISSING)
        if value is _MISSING or f"{section}.{name}" in cfg.explicit:
            continue
        if getattr(getattr(cfg, section), name) != value:
            setattr(getattr(cfg, section), name, value)
            taken.append(name)
    return taken or ["nothing"]


_MISSING = object()
