"""What a checkpoint holds, and the load modes of DESIGN.md's table.

Per (tp, pp) rank, `mp_rank_TT_PPP/model_optim_rng.pt` (written by DP rank 0):
    {"format_version", "iteration", "mode", "model": stage state_dict, "progress": counters,
     "opt_param_scheduler", "optimizer" (without the distributed optimizer),
     "rng_state": [one per DP rank]}
and with the distributed optimizer, `mp_rank_TT_PPP_DDD/distrib_optim.pt` from every DP rank.
metadata.json carries the run's config, the layout, the mode and the global tensor index.

Modes (the mode a run *requests* comes from its flags; the mode a checkpoint *records* is the
mode of the run that wrote it):
    resume         no mode flags: everything restored
    finetune       --finetune: weights only; iteration, optimizer, scheduler, RNG fresh
    further-train  --reset-sample-stat: weights, optimizer, scheduler (unless
                   --no-load-lr-scheduler), RNG; iteration and consumed samples reset
    weights        --pretrained-checkpoint DIR: weights only, used when --load has nothing
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
from megatron_lite.checkpoint.io import layout
from megatron_lite.checkpoint.recovery import choose_checkpoint, format_recovery_report
from megatron_lite.checkpoint.retention import apply_retention
from megatron_lite.checkpoint.io.storage import load_file, read_metadata, save_files
from megatron_lite.config import ModelConfig, RunConfig, default_ffn_hidden_size
from megatron_lite.initialize import Run, model_dtype, print_rank0
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
    shard: Optional[dict] = None    # this rank's model_optim_rng.pt, read once during restore


def _plan(directory: str, ckpt_step, state):
    """The checkpoint to load from `directory` (verified once, here), or None when it has none."""
    plan = choose_checkpoint(directory, ckpt_step, state, allow_weights_only=True)
    return plan if plan.iteration is not None else None


def decide_load(cfg: RunConfig, state: ParallelState) -> LoadDecision:
    c, mode = cfg.checkpoint, requested_mode(cfg)
    if c.load and not os.path.isdir(c.load) and (
            not c.save or os.path.abspath(c.load) != os.path.abspath(c.save)):
        raise ConfigError(f"--load {c.load}: no such directory; check the path (a first run that will save "
                          f"there passes the same directory to --save), or drop --load to train from scratch")
    # 1. this run's own checkpoints (a restart of the same command line) or --load's
    for directory in [d for d in dict.fromkeys([c.save, c.load]) if d]:
        plan = _plan(directory, c.ckpt_step if directory == c.load else None, state)
        if plan is None:
            continue
        meta = plan.metadata or read_metadata(plan.iter_dir)
        if plan.kind == "weights":   # never resumed from: only a finetune starts from it
            if directory != c.load:
                continue
            if mode == "finetune":
                return LoadDecision(directory, plan, meta, "finetune")
            if not c.pretrained_checkpoint:
                raise ConfigError(f"{c.load} holds only a weights-only checkpoint ({plan.iter_dir}): it has no "
                                  f"optimizer state to resume; load it with --finetune or --pretrained-checkpoint")
            continue
        if mode == "pretrain" or meta.get("mode", "pretrain") == mode:
            # a restart of a finetune/further-train run: its mode flags (--no-load-optim, ...) were
            # for the first start; everything it saved is restored
            return LoadDecision(directory, plan, meta, "resume", own_restart=mode != "pretrain")
        if directory == c.load:
            return LoadDecision(directory, plan, meta, mode)
    # 2. weights from elsewhere
    if c.pretrained_checkpoint:
        plan = _plan(c.pretrained_checkpoint, None, state)
        if plan is None:
            raise ConfigError(f"--pretrained-checkpoint {c.pretrained_checkpoint} holds no intact checkpoint")
        return LoadDecision(c.pretrained_checkpoint, plan, plan.metadata or read_metadata(plan.iter_dir), "weights")
    if c.load and (c.exit_on_missing_checkpoint or mode != "pretrain" or c.ckpt_step is not None):
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
    diffs = []
    for name in ARCHITECTURE_FIELDS:
        if name == "vocab_size" or name not in saved:
            continue
        mine, theirs = getattr(cfg.model, name), saved[name]
        if name == "ffn_hidden_size" and mine is None:
            mine = default_ffn_hidden_size(cfg.model.hidden_size, cfg.model.swiglu)
        if name == "num_query_groups" and not cfg.model.group_query_attention and not saved.get(
                "group_query_attention"):
            continue
        if mine != theirs:
            diffs.append(f"{name}={theirs} (flags say {mine})")
    if diffs:
        fix = ("drop those flags to take the checkpoint's values" if cfg.checkpoint.use_checkpoint_args else
               "pass --use-checkpoint-args to take the checkpoint's model config, or fix the flags")
        raise ConfigError(f"checkpoint {decision.plan.iter_dir} was saved with " + ", ".join(diffs) + "; " + fix)


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


def _load_model_weights(run: Run, decision: LoadDecision) -> str:
    state, module = run.state, run.module
    plan, meta = decision.plan, decision.metadata
    if _same_layout(meta, state):
        module.load_state_dict(_cast_like(_model_file(run, decision)["model"], module), strict=True)
        return "loaded"
    from megatron_lite.checkpoint.reshard.sharding import open_piece_reader, reshard_rank_state

    local = reshard_rank_state(meta["tensors"], open_piece_reader(plan.iter_dir), run.cfg.model, state.tp_size, state.pp_size,
                               state.tp_rank, state.pp_rank)
    module.load_state_dict(_cast_like(local, module), strict=True)
    saved = meta["parallel"]
    return f"loaded, resharded from TP={saved['tp']} PP={saved['pp']}"


def _cast_like(sd: Dict[str, torch.Tensor], module) -> Dict[str, torch.Tensor]:
    own = module.state_dict()
    return {k: v.to(own[k].dtype) if k in own and torch.is_tensor(v) else v for k, v in sd.items()}


def _load_optimizer(run: Run, decision: LoadDecision) -> str:
    """The saved optimizer state, resharded when the layout (or the ZeRO-1 setting) changed."""
    state, meta = run.state, decision.metadata
    if not meta.get("has_optimizer", True):
        raise ConfigError(f"{decision.plan.iter_dir} was saved with --no-save-optim; pass --no-load-optim")
    zero1 = run.cfg.parallel.use_distributed_optimizer
    saved = meta["parallel"]
    unchanged = (_same_layout(meta, state) and zero1 == meta.get("distributed_optimizer", False)
                 and (not zero1 or saved.get("dp") == state.dp_size))
    if unchanged:
        if zero1:
            path = layout.distrib_optim_shard_path(state.tp_rank, state.pp_rank, state.dp_rank)
            opt_sd = load_file(decision.load_dir, decision.plan.iteration, path)
        else:
            opt_sd = _model_file(run, decision)["optimizer"]
        run.optimizer.load_state_dict(opt_sd)
        return "loaded"
    from megatron_lite.checkpoint.reshard.optimizer import reshard_optimizer_state

    run.optimizer.load_state_dict(reshard_optimizer_state(run, decision.load_dir, decision.plan.iteration, meta))
    was = "ZeRO-1" if meta.get("distributed_optimizer") else "replicated"
    return f"loaded, resharded from TP={saved['tp']} PP={saved['pp']} DP={saved.get('dp')} ({was})"


def _model_file(run: Run, decision: LoadDecision) -> dict:
    """This rank's model_optim_rng.pt (rank (0, 0)'s when the layout changed: the counters and
    the schedule are the same in every file), read from disk once per restore."""
    if decision.shard is None:
        same = _same_layout(decision.metadata, run.state)
        tp, pp = (run.state.tp_rank, run.state.pp_rank) if same else (0, 0)
        decision.shard = load_file(decision.load_dir, decision.plan.iteration, layout.model_shard_path(tp, pp))
    return decision.shard


def restore(run: Run, decision: LoadDecision) -> None:
    """Restore what the decision's action says; print the recovery report on rank 0."""
    c, action = run.cfg.checkpoint, decision.action
    if decision.own_restart:
        c = dataclasses.replace(c, load_optim=True, load_rng=True, load_lr_scheduler=True)
    restored: Dict[str, str] = {}
    if action == "none":
        if c.load or c.save:
            print_rank0(f"checkpoint: nothing to load in {c.load or c.save}; starting from scratch", run.state)
        return
    saved_vocab = decision.metadata.get("config", {}).get("model", {}).get("vocab_size")
    if saved_vocab is not None and saved_vocab != run.cfg.model.vocab_size:
        raise ConfigError(f"checkpoint {decision.plan.iter_dir} was trained with a vocabulary of {saved_vocab} "
                          f"tokens but the tokenizer has {run.cfg.model.vocab_size}; use the checkpoint's tokenizer "
                          f"(--tokenizer-type/--tokenizer-model/--vocab-size)")
    restored["weights"] = _load_model_weights(run, decision)
    run.optimizer.reload_model_params()   # fp32 main params follow the loaded weights
    full = action in ("resume", "further-train")
    if full and c.load_optim:
        restored["optimizer"] = _load_optimizer(run, decision)
    else:
        restored["optimizer"] = "fresh (" + ("--no-load-optim" if full else f"{action} mode") + ")"
    shard = _model_file(run, decision) if full else None
    if full and (action == "resume" or c.load_lr_scheduler):
        continuing = action == "further-train" or (decision.own_restart and run.mode == "further-train")
        if continuing and not run.scheduler.override_opt_param_scheduler:
            run.scheduler.use_checkpoint_opt_param_scheduler = True   # the schedule continues as saved
        try:
            run.scheduler.load_state_dict(shard["opt_param_scheduler"])
        except ValueError as e:   # the flags' schedule disagrees with the checkpoint's
            raise ConfigError(str(e)) from None
        restored["lr scheduler"] = "loaded"
    else:
        restored["lr scheduler"] = "fresh (" + ("--no-load-lr-scheduler" if full else f"{action} mode") + ")"
    if action == "resume":
        run.progress.load_state_dict(shard["progress"])
        restored["iteration and consumed samples"] = (
            f"restored (iteration {run.progress.iteration}, {run.progress.consumed_train_samples} samples)")
    else:
        restored["iteration and consumed samples"] = f"reset to 0 ({action} mode)"
    saved_rng = shard.get("rng_state") if full else None
    same_layout = _same_layout(decision.metadata, run.state)
    if full and c.load_rng and saved_rng is not None and len(saved_rng) == run.state.dp_size and same_layout:
        set_rng_state(saved_rng[run.state.dp_rank], run.state.rng)
        restored["rng"] = "restored"
    elif not full:
        restored["rng"] = "fresh seed"
    elif not c.load_rng:
        restored["rng"] = "fresh seed (--no-load-rng)"
    elif saved_rng is None:
        restored["rng"] = "fresh seed (saved with --no-save-rng)"
    else:
        p = decision.metadata["parallel"]
        restored["rng"] = (f"fresh seed (saved at TP={p['tp']} PP={p['pp']} DP={p.get('dp')}: per-rank "
                           f"generators do not carry over to another layout)")
    restored["data position"] = (f"from sample {run.progress.consumed_train_samples}" if action == "resume"
                                 else "from the first sample")
    run.scheduler.step(0)   # the optimizer's lr and weight decay follow the (loaded or fresh) schedule
    decision.shard = None   # free the CPU copy
    run.loaded_iteration = decision.plan.iteration
    if action == "resume":
        run.last_saved_iteration = run.progress.iteration   # nothing new to save until it trains
    run.loaded_dir = decision.load_dir
    run.load_report = format_recovery_report(decision.plan, {"mode": action, **restored})
    print_rank0(run.load_report, run.state)


# ------------------------------------------------------------------------------------ saving

def _gather_rng_over_dp(run: Run) -> list:
    mine = get_rng_state(run.state.rng)
    if run.state.dp_size == 1:
        return [mine]
    everyone = [None] * run.state.dp_size
    dist.all_gather_object(everyone, mine, group=run.state.dp_group)
    return everyone


def save_checkpoint(run: Run, kind: str = "full") -> None:
    """Collective: every rank writes its shard; the iteration directory is committed atomically."""
    from megatron_lite.checkpoint.reshard.sharding import build_tensor_index

    cfg, state, p = run.cfg, run.state, run.progress
    c = cfg.checkpoint
    if run.tensor_index is None:   # the layout does not change during a run: build it once
        run.tensor_index = build_tensor_index(cfg.model, state.tp_size, state.pp_size, model_dtype(cfg))
    full = kind == "full"
    files = {}
    rng = _gather_rng_over_dp(run) if full and c.save_rng else None
    if state.dp_rank == 0:
        shard = {"format_version": FORMAT_VERSION, "iteration": p.iteration, "mode": run.mode,
                 "model": run.module.state_dict()}
        if full:
            shard["progress"] = p.state_dict()
            shard["opt_param_scheduler"] = run.scheduler.state_dict()
            if rng is not None:
                shard["rng_state"] = rng
            if c.save_optim and not cfg.parallel.use_distributed_optimizer:
                shard["optimizer"] = run.optimizer.state_dict()
        files[layout.model_shard_path(state.tp_rank, state.pp_rank)] = shard
    if full and c.save_optim and cfg.parallel.use_distributed_optimizer:
        files[layout.distrib_optim_shard_path(state.tp_rank, state.pp_rank, state.dp_rank)] = \
            run.optimizer.state_dict()
    metadata = {"config": cfg.to_dict(), "mode": run.mode,
                "parallel": {"tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size},
                "distributed_optimizer": cfg.parallel.use_distributed_optimizer,
                "has_optimizer": full and c.save_optim, "has_rng": full and c.save_rng,
                "progress": p.state_dict(),
                "tensors": run.tensor_index}
    # weights-only checkpoints live apart, so they never shadow a full one of the same iteration
    directory = c.save if full else os.path.join(c.save, WEIGHTS_SUBDIR)
    finish_async_save(run)
    t0 = time.time()
    result = save_files(directory, p.iteration, files, state, metadata, kind=kind, async_saver=run.async_saver)
    what = "checkpoint" if full else "weights-only checkpoint"
    if run.async_saver is None:
        print_rank0(f"saved {what} at iteration {p.iteration} to {directory} in {result.seconds:.2f} s "
                    f"({result.bytes_written / 1e6:.1f} MB)", run.state)
    else:
        print_rank0(f"saving {what} at iteration {p.iteration} to {directory} in the background "
                    f"(training blocked {time.time() - t0:.2f} s)", run.state)
    if full and c.keep_last_n_checkpoints and state.rank == 0:
        protect = {run.loaded_iteration} if getattr(run, "loaded_dir", None) == c.save else set()
        deleted = apply_retention(c.save, c.keep_last_n_checkpoints, protect)
        if deleted:
            print_rank0(f"deleted checkpoints {deleted} (--keep-last-n-checkpoints {c.keep_last_n_checkpoints})",
                        run.state)


def finish_async_save(run: Run) -> None:
    """Collective: wait for the background save in flight (if any) to commit, and log it."""
    if run.async_saver is None or not run.async_saver.pending:
        return
    result = run.async_saver.finalize()
    if result is not None:
        print_rank0(f"committed checkpoint at iteration {result.iteration} in {result.seconds:.2f} s "
                    f"({result.bytes_written / 1e6:.1f} MB)", run.state)


def interval_saves(run: Run, it: int) -> List[str]:
    """The kinds of checkpoint ('full', 'weights') that the save intervals ask for at iteration `it`."""
    c = run.cfg.checkpoint
    if not c.save:
        return []
    return [kind for kind, every in (("full", c.save_interval), ("weights", c.save_weights_only_interval))
            if every and it % every == 0]


def maybe_save_checkpoint(run: Run, reason: str) -> None:
    """Called by the loop after each iteration ('interval') and when it stops ('end')."""
    c, it = run.cfg.checkpoint, run.progress.iteration
    if not c.save:
        return
    if reason == "end":
        if run.last_saved_iteration != it:
            save_checkpoint(run, "full")
            run.last_saved_iteration = it
        finish_async_save(run)
        return
    for kind in interval_saves(run, it):
        save_checkpoint(run, kind)
        if kind == "full":
            run.last_saved_iteration = it


def model_config_from(metadata: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in metadata["config"]["model"].items() if k in known})
