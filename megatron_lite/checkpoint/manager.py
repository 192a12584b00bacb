"""The CheckpointManager: the load decision, the load modes of DESIGN.md's table, restore and its
recovery report, and the saves (in --ckpt-format's writer). What a checkpoint of each format holds
is in formats/: megatron_lite.py (the default), megatron_legacy.py (torch), torch_dist.py.

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
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_lite.arguments import ConfigError, validate
from megatron_lite.checkpoint import adapters
from megatron_lite.checkpoint.formats import FORMAT_NAMES, OWN_FORMAT, SourceCheckpoint, format_module
from megatron_lite.checkpoint.formats.megatron_lite import OwnCheckpoint
from megatron_lite.checkpoint.io import layout
from megatron_lite.checkpoint.io.layout import BEST_FILENAME
from megatron_lite.checkpoint.io.async_save import AsyncSaver
from megatron_lite.checkpoint.recovery import choose_checkpoint, format_recovery_report, read_tracker
from megatron_lite.checkpoint.retention import apply_retention
from megatron_lite.checkpoint.weights_from import STEP_FLAG, WeightsSource, attribute_sources, keeping_main_params
from megatron_lite.checkpoint.io.storage import read_metadata, save_files, write_tracker
from megatron_lite.config import ModelConfig, RunConfig
from megatron_lite.initialize import Run, model_dtype, print_rank0
from megatron_lite.model.lora import lora_settings
from megatron_lite.parallel.random import get_rng_state, set_rng_state
from megatron_lite.parallel.state import ParallelState

FORMAT_VERSION = 1
WEIGHTS_SUBDIR = "weights"   # <save>/weights/iter_XXXXXXX: --save-weights-only-interval checkpoints

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


def _opened(directory: str, plan) -> tuple:
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
    meta, source = _opened(c.load_weights_from, plan)
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
        meta, source = _opened(directory, plan)
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
        meta, source = _opened(c.pretrained_checkpoint, plan)
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


# ----------------------------------------------------------------------------------- loading

def _same_layout(meta: dict, state: ParallelState) -> bool:
    p = meta.get("parallel", {})
    return p.get("tp") == state.tp_size and p.get("pp") == state.pp_size


def _cast_like(sd: Dict[str, torch.Tensor], module) -> Dict[str, torch.Tensor]:
    own = module.state_dict()
    return {k: v.to(own[k].dtype) if k in own and torch.is_tensor(v) else v for k, v in sd.items()}


def _gather_rng_over_dp(state: ParallelState) -> list:
    mine = get_rng_state(state.rng)
    if state.dp_size == 1:
        return [mine]
    everyone = [None] * state.dp_size
    dist.all_gather_object(everyone, mine, group=state.dp_group)
    return everyone


def shard_contents(iteration, mode: str, model: Dict[str, torch.Tensor], *, progress: Optional[dict] = None,
                   scheduler: Optional[dict] = None, rng: Optional[list] = None,
                   optimizer: Optional[dict] = None) -> dict:
    """What a (tp, pp) rank's model_optim_rng.pt holds (format in the module docstring): the one
    definition, used by training's saves (full: with progress and scheduler) and by
    tools/checkpoint/convert.py (weights only)."""
    shard = {"format_version": FORMAT_VERSION, "iteration": iteration, "mode": mode, "model": model}
    extra = {"progress": progress, "opt_param_scheduler": scheduler, "rng_state": rng, "optimizer": optimizer}
    shard.update({k: v for k, v in extra.items() if v is not None})
    return shard


def _loaded(state: Optional[dict], why: str, load) -> str:
    """Load `state` with `load` and say so for the report ("loaded", or the reader's "loaded, resharded
    ..."); without one, "fresh (why)"."""
    if state is None:
        return f"fresh ({why})"
    load(state)
    return why if why.startswith("loaded") else "loaded"


class CheckpointManager:
    """Everything a run does with checkpoints: the load decision (made before the model exists, so
    that --use-checkpoint-args can shape it), restore and its recovery report, interval and exit
    saves in the --ckpt-format chosen, async saves, retention.

        checkpoints = CheckpointManager(cfg, state)
        checkpoints.decide()            # before build_run
        checkpoints.restore(run)        # after it
        checkpoints.save_if_due(run)    # after each iteration; checkpoints.save_at_end(run) when it stops
    """

    def __init__(self, cfg: RunConfig, state: ParallelState):
        self.cfg, self.state = cfg, state
        self.mode = requested_mode(cfg)           # recorded in the checkpoints this run writes
        self.decision = LoadDecision()
        self.load_report: Optional[str] = None
        self.loaded_dir: Optional[str] = None
        self.loaded_iteration = None
        self.last_saved_iteration: Optional[int] = None
        self.tensor_index: Optional[dict] = None  # the global tensor index, built at the first save
        self.validation: Optional[dict] = None    # the latest evaluation: {"iteration", "lm loss"}
        self._pending_best: Optional[tuple] = None   # (iteration, loss) of the background save in flight
        self.weights_from: Optional[dict] = None     # the --load-weights-from record the saves carry on
        self.base: Optional[dict] = None          # a LoRA run's base checkpoint (adapters.base_record)
        self.base_bytes = 0
        self.nonfinite_at: Optional[int] = None   # the first iteration with a non-finite loss or grad norm
        c = cfg.checkpoint
        self.async_saver = AsyncSaver(persistent=c.use_persistent_ckpt_worker) if c.async_save else None

    # ------------------------------------------------------------------------- load

    def decide(self, load: bool = True, resume_own: bool = True) -> LoadDecision:
        """Choose what to load (identical on every rank) and check the flags against it;
        `load=False` starts from scratch whatever --load and --save hold; `resume_own=False` (see
        decide_load) ignores --save's checkpoints."""
        self.decision = decide_load(self.cfg, self.state, resume_own) if load else LoadDecision()
        if self.cfg.model.lora_rank and self.decision.action == "none":
            raise ConfigError("--lora-rank trains adapters on a base model: pass its checkpoint with "
                              "--pretrained-checkpoint DIR (or --load DIR --finetune)")
        check_model_config(self.cfg, self.decision, self.state.world_size)
        return self.decision

    def restore(self, run: Run) -> None:
        """Restore what the decision's action says; print the recovery report on rank 0."""
        d = self.decision
        c, action = run.cfg.checkpoint, d.action
        if d.own_restart:
            c = dataclasses.replace(c, load_optim=True, load_rng=True, load_lr_scheduler=True)
        if action == "none":
            if c.load or c.save:
                print_rank0(f"checkpoint: nothing to load in {c.load or c.save}; starting from scratch", run.state)
            return
        weights = d.weights if d.weights is not None and d.weights.applied else None   # else --load's own
        for chosen in (d, weights) if weights is not None else (d,):
            saved_vocab = chosen.metadata.get("config", {}).get("model", {}).get("vocab_size")
            if saved_vocab is not None and saved_vocab != run.cfg.model.vocab_size:
                raise ConfigError(f"checkpoint {chosen.plan.iter_dir} was trained with a vocabulary of {saved_vocab} "
                                  f"tokens but the tokenizer has {run.cfg.model.vocab_size}; use the checkpoint's "
                                  f"tokenizer (--tokenizer-type/--tokenizer-model/--vocab-size)")
        restored: Dict[str, str] = {}
        if d.source.format != OWN_FORMAT:
            restored["format"] = FORMAT_NAMES[d.source.format]
        if weights is not None and weights.source.format != OWN_FORMAT:
            restored["weights format"] = FORMAT_NAMES[weights.source.format]
        restored["weights"] = self._load_weights(run, weights)
        run.optimizer.reload_model_params()   # fp32 main params follow the loaded weights
        full = action in ("resume", "further-train")
        if full and c.load_optim:
            def load_optimizer(sd):   # with --load-weights-from: moments and step from --load, main params the weights'
                run.optimizer.load_state_dict(keeping_main_params(sd, run.optimizer) if weights is not None else sd)
            restored["optimizer"] = _loaded(*d.source.optimizer_state(run), load_optimizer)
        else:
            restored["optimizer"] = "fresh (" + ("--no-load-optim" if full else f"{action} mode") + ")"
        if full and (action == "resume" or c.load_lr_scheduler):
            restored["lr scheduler"] = self._load_scheduler(run)
        else:
            restored["lr scheduler"] = "fresh (" + ("--no-load-lr-scheduler" if full else f"{action} mode") + ")"
        if action == "resume":
            run.progress.load_state_dict(d.metadata["progress"])
            restored["iteration and consumed samples"] = (
                f"restored (iteration {run.progress.iteration}, {run.progress.consumed_train_samples} samples)")
        else:
            restored["iteration and consumed samples"] = f"reset to 0 ({action} mode)"
        if not full:
            restored["rng"] = "fresh seed"
        elif not c.load_rng:
            restored["rng"] = "fresh seed (--no-load-rng)"
        else:
            rng, why = d.source.rng_state(run.state)
            restored["rng"] = "fresh seed (" + why + ")" if rng is None else "restored"
            if rng is not None:
                set_rng_state(rng, run.state.rng)
        restored["data position"] = (f"from sample {run.progress.consumed_train_samples}" if action == "resume"
                                     else "from the first sample")
        run.scheduler.step(0)   # the optimizer's lr and weight decay follow the (loaded or fresh) schedule
        for chosen in (d, weights):
            if chosen is not None and isinstance(chosen.source, OwnCheckpoint):
                chosen.source.release()   # free the CPU copies
        self.loaded_iteration, self.loaded_dir = d.plan.iteration, d.load_dir
        self.weights_from = weights.record if weights is not None else d.metadata.get("weights_from")
        if action == "resume":
            self.last_saved_iteration = run.progress.iteration   # nothing new to save until it trains
        if d.weights is not None:
            restored = attribute_sources(restored, d.plan, d.weights)
        self.load_report = format_recovery_report(d.plan, {"mode": action, **restored},
                                                  weights.plan if weights is not None else None)
        print_rank0(self.load_report, run.state)

    def _load_weights(self, run: Run, weights: Optional[WeightsSource] = None) -> str:
        """The model weights of the decision's checkpoint, or of `weights` (--load-weights-from's)."""
        d, state, module = self.decision, run.state, run.module
        if run.cfg.model.lora_rank or d.metadata.get("lora"):
            return self._load_lora_weights(run)
        chosen = weights or d
        saved = chosen.metadata.get("parallel", {})
        resharded = "" if _same_layout(chosen.metadata, state) else \
            f", resharded from TP={saved.get('tp')} PP={saved.get('pp')}"
        local = chosen.source.model_state(run.cfg.model, state.tp_size, state.pp_size, state.tp_rank, state.pp_rank)
        module.load_state_dict(_cast_like(local, module), strict=True)
        return "loaded" + resharded

    def _load_lora_weights(self, run: Run) -> str:
        report, self.base, self.base_bytes = adapters.restore_lora_weights(run, self.decision, _opened)
        return report

    def _load_scheduler(self, run: Run) -> str:
        d = self.decision
        continuing = d.action == "further-train" or (d.own_restart and run.mode == "further-train")
        if continuing and not run.scheduler.override_opt_param_scheduler:
            run.scheduler.use_checkpoint_opt_param_scheduler = True   # the schedule continues as saved
        try:
            return _loaded(*d.source.scheduler_state(), run.scheduler.load_state_dict)
        except ValueError as e:   # the flags' schedule disagrees with the checkpoint's
            raise ConfigError(str(e)) from None

    # ------------------------------------------------------------------------- save

    def record_validation(self, iteration: int, loss: Optional[float]) -> None:
        """The loop's latest validation loss: the next full checkpoint records it in metadata.json and
        competes for best_checkpointed_iteration.txt with it."""
        if loss is not None:
            self.validation = {"iteration": iteration, "lm loss": float(loss)}

    def saves_due(self, iteration: int) -> List[str]:
        """The kinds of checkpoint ('full', 'weights') that the save intervals ask for at `iteration`."""
        c = self.cfg.checkpoint
        if not c.save or self.nonfinite_at is not None:
            return []
        return [kind for kind, every in (("full", c.save_interval), ("weights", c.save_weights_only_interval))
                if every and iteration % every == 0]

    def stop_saving(self, iteration: int, what: str) -> None:
        """The loop saw a non-finite loss or grad norm at `iteration`: no checkpoint from now on (so
        the tracker and retention keep the finite ones)."""
        if self.nonfinite_at is None and self.cfg.checkpoint.save:
            print_rank0(f"not saving checkpoints from iteration {iteration} on: {what}", self.state)
        self.nonfinite_at = iteration if self.nonfinite_at is None else self.nonfinite_at

    def save_if_due(self, run: Run) -> None:
        """After each iteration: the saves the intervals ask for."""
        for kind in self.saves_due(run.progress.iteration):
            self.save(run, kind)

    def save_at_end(self, run: Run) -> None:
        """When the loop stops (done, exit flag, signal): a full checkpoint unless this iteration has
        one, then wait for any background save to commit."""
        if not self.cfg.checkpoint.save:
            return
        if self.last_saved_iteration != run.progress.iteration and self.nonfinite_at is None:
            self.save(run, "full")
        self.finish()

    def save(self, run: Run, kind: str = "full") -> None:
        """Collective: every rank writes its shard; the iteration directory is committed atomically."""
        c = run.cfg.checkpoint
        if c.ckpt_format != OWN_FORMAT:   # validation allows only full, synchronous saves here
            self.finish()
            t0 = time.time()
            format_module(c.ckpt_format).save(run, c.save)
            print_rank0(f"saved checkpoint at iteration {run.progress.iteration} to {c.save} in "
                        f"{FORMAT_NAMES[c.ckpt_format]} format in {time.time() - t0:.2f} s", run.state)
        else:
            self._save_own(run, kind)
        if kind == "full":
            self.last_saved_iteration = run.progress.iteration
            self._apply_retention(run)

    def _save_own(self, run: Run, kind: str) -> None:
        from megatron_lite.checkpoint.reshard.sharding import build_tensor_index

        cfg, state, p = run.cfg, run.state, run.progress
        c = cfg.checkpoint
        if self.tensor_index is None:   # the layout does not change during a run: build it once
            self.tensor_index = build_tensor_index(cfg.model, state.tp_size, state.pp_size, model_dtype(cfg))
        full, lora = kind == "full", bool(cfg.model.lora_rank)
        files = {}
        rng = _gather_rng_over_dp(state) if full and c.save_rng else None
        if state.dp_rank == 0:
            own_optimizer = full and c.save_optim and not cfg.parallel.use_distributed_optimizer
            files[layout.model_shard_path(state.tp_rank, state.pp_rank)] = shard_contents(
                p.iteration, run.mode, adapters.adapter_state(run.module) if lora else run.module.state_dict(),
                progress=p.state_dict() if full else None,
                scheduler=run.scheduler.state_dict() if full else None, rng=rng,
                optimizer=run.optimizer.state_dict() if own_optimizer else None)
        if full and c.save_optim and cfg.parallel.use_distributed_optimizer:
            files[layout.distrib_optim_shard_path(state.tp_rank, state.pp_rank, state.dp_rank)] = \
                run.optimizer.state_dict()
        metadata = {"config": cfg.to_dict(), "mode": run.mode,
                    "parallel": {"tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size},
                    "distributed_optimizer": cfg.parallel.use_distributed_optimizer,
                    "has_optimizer": full and c.save_optim, "has_rng": full and c.save_rng,
                    "progress": p.state_dict(),
                    "tensors": self.tensor_index}
        if full and self.validation is not None:
            metadata["validation"] = self.validation
        if self.weights_from is not None:
            metadata["weights_from"] = self.weights_from
        if lora:
            metadata.update(lora=lora_settings(cfg.model), base=self.base)
        # weights-only checkpoints live apart, so they never shadow a full one of the same iteration
        directory = c.save if full else os.path.join(c.save, WEIGHTS_SUBDIR)
        self.finish()
        t0 = time.time()
        result = save_files(directory, p.iteration, files, state, metadata, kind=kind, async_saver=self.async_saver)
        what = ("adapter " if lora else "") + ("checkpoint" if full else "weights-only checkpoint")
        best = (p.iteration, self.validation["lm loss"]) if full and self.validation is not None else None
        if self.async_saver is None:
            print_rank0(f"saved {what} at iteration {p.iteration} to {directory} in {result.seconds:.2f} s "
                        f"({result.bytes_written / 1e6:.1f} MB{self._fraction_of_base(result.bytes_written)})", state)
            self._note_best(best)
        else:
            print_rank0(f"saving {what} at iteration {p.iteration} to {directory} in the background "
                        f"(training blocked {time.time() - t0:.2f} s)", state)
            self._pending_best = best

    def _fraction_of_base(self, nbytes: int) -> str:
        """`, 1.25% of the base checkpoint's 40.1 MB` for an adapter checkpoint."""
        if not self.cfg.model.lora_rank or not self.base_bytes:
            return ""
        return f", {100.0 * nbytes / self.base_bytes:.2f}% of the base checkpoint's {self.base_bytes / 1e6:.1f} MB"

    def best_iteration(self) -> Optional[int]:
        best, _ = read_tracker(self.cfg.checkpoint.save, BEST_FILENAME)
        return best

    def _note_best(self, best: Optional[tuple]) -> None:
        """Rank 0, once a full checkpoint with a validation loss is committed: name it in
        best_checkpointed_iteration.txt (replaced atomically) when its loss is below the best's."""
        if best is None or self.state.rank != 0:
            return
        iteration, loss = best
        save = self.cfg.checkpoint.save
        current = self.best_iteration()
        if current is not None and current != iteration:
            try:
                held = read_metadata(os.path.join(save, layout.iteration_dir_name(current))).get("validation", {})
            except ValueError:   # the best one is gone or damaged: the new one takes its place
                held = {}
            if held.get("lm loss", float("inf")) <= loss:
                return
        write_tracker(save, iteration, BEST_FILENAME)
        print_rank0(f"best checkpoint: iteration {iteration} (validation lm loss {loss:.6E})", self.state)

    def _apply_retention(self, run: Run) -> None:
        c = run.cfg.checkpoint
        if not c.keep_last_n_checkpoints or run.state.rank != 0:
            return
        protect = {self.loaded_iteration} if self.loaded_dir == c.save else set()
        protect.add(self.best_iteration())   # --keep-last-n-checkpoints never deletes the best one
        deleted = apply_retention(c.save, c.keep_last_n_checkpoints, protect)
        if deleted:
            print_rank0(f"deleted checkpoints {deleted} (--keep-last-n-checkpoints {c.keep_last_n_checkpoints})",
                        run.state)

    def finish(self) -> None:
        """Collective: wait for the background save in flight (if any) to commit, and log it."""
        if self.async_saver is None or not self.async_saver.pending:
            return
        result = self.async_saver.finalize()
        if result is not None:
            print_rank0(f"committed checkpoint at iteration {result.iteration} in {result.seconds:.2f} s "
                        f"({result.bytes_written / 1e6:.1f} MB{self._fraction_of_base(result.bytes_written)})",
                        self.state)
            self._note_best(self._pending_best)
        self._pending_best = None

