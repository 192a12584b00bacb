"""The CheckpointManager: the run's one checkpoint object. It takes the load decision (decision.py:
which checkpoint each part comes from, the load modes of DESIGN.md's table), restores what it says
and prints the recovery report, and saves (in --ckpt-format's writer), in the background with
--async-save, with retention and the best checkpoint. What a checkpoint of each format holds is in
formats/: megatron_lite.py (the default), megatron_legacy.py (torch), torch_dist.py; a LoRA run's
adapter checkpoints are adapters.py's.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_lite.arguments import ConfigError
from megatron_lite.checkpoint import adapters
from megatron_lite.checkpoint.decision import (LoadDecision, check_model_config, decide_load, open_chosen,
                                               requested_mode)
from megatron_lite.checkpoint.formats import FORMAT_NAMES, OWN_FORMAT, format_module
from megatron_lite.checkpoint.formats.megatron_lite import OwnCheckpoint
from megatron_lite.checkpoint.io import layout
from megatron_lite.checkpoint.io.layout import BEST_FILENAME
from megatron_lite.checkpoint.local import LocalCheckpoints, LocalSnapshot
from megatron_lite.checkpoint.io.async_save import AsyncSaver
from megatron_lite.checkpoint.recovery import LoadPlan, format_recovery_report, read_tracker
from megatron_lite.checkpoint.retention import apply_retention
from megatron_lite.checkpoint.weights_from import WeightsSource, attribute_sources, keeping_main_params
from megatron_lite.checkpoint.io import lock as save_lock
from megatron_lite.checkpoint.io.storage import broadcast_object, read_metadata, save_files, write_tracker
from megatron_lite.config import RunConfig
from megatron_lite.initialize import Run, model_dtype, print_rank0
from megatron_lite.model.lora import lora_settings
from megatron_lite.parallel.random import get_rng_state, set_rng_state
from megatron_lite.parallel.state import ParallelState

FORMAT_VERSION = 1
WEIGHTS_SUBDIR = "weights"   # <save>/weights/iter_XXXXXXX: --save-weights-only-interval checkpoints

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
                   optimizer: Optional[dict] = None, fp8: Optional[dict] = None) -> dict:
    """What a (tp, pp) rank's model_optim_rng.pt holds (format in the module docstring): the one
    definition, used by training's saves (full: with progress and scheduler) and by
    megatron_lite.tools.convert (weights only)."""
    shard = {"format_version": FORMAT_VERSION, "iteration": iteration, "mode": mode, "model": model}
    extra = {"progress": progress, "opt_param_scheduler": scheduler, "rng_state": rng, "optimizer": optimizer,
             "fp8_state": fp8}
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
        self.lock: Optional[save_lock.SaveLock] = None   # rank 0's hold on --save (io/lock.py)
        self.token = ""                                    # the run's token in temporary names
        self.local_notes: List[str] = []                   # the report's lines on the snapshots, without a load
        c = cfg.checkpoint
        self.async_saver = AsyncSaver(persistent=c.use_persistent_ckpt_worker) if c.async_save else None
        self.local = LocalCheckpoints(cfg, state) if c.local_ckpt_interval else None   # in-memory snapshots

    # ------------------------------------------------------------------------- load

    def decide(self, load: bool = True, resume_own: bool = True) -> LoadDecision:
        """Choose what to load (identical on every rank) and check the flags against it;
        `load=False` starts from scratch whatever --load and --save hold; `resume_own=False` (see
        decide_load) ignores --save's checkpoints."""
        self._lock_save_dir()
        self.decision = decide_load(self.cfg, self.state, resume_own) if load else LoadDecision()
        if self.local is not None:
            self.decision = self._newest_with_local(self.decision, usable=load and self.cfg.checkpoint.ckpt_step
                                                    in (None, "auto"))
        if self.cfg.model.lora_rank and self.decision.action == "none":
            raise ConfigError("--lora-rank trains adapters on a base model: pass its checkpoint with "
                              "--pretrained-checkpoint DIR (or --load DIR --finetune)")
        check_model_config(self.cfg, self.decision, self.state.world_size)
        return self.decision

    def _lock_save_dir(self) -> None:
        """Collective: rank 0 takes --save's lock (io/lock.py); every rank learns the run's token or
        stops with the same one line naming the run that holds it."""
        save = self.cfg.checkpoint.save
        if not save or self.token:
            return
        outcome = None
        if self.state.rank == 0:
            try:
                self.lock = save_lock.acquire(save)
                outcome = ("ok", self.lock.token, self.lock.took_over)
            except (save_lock.SaveDirectoryBusy, OSError) as e:
                outcome = ("busy", str(e), None)
        status, value, took_over = broadcast_object(outcome, self.state)
        if status == "busy":
            raise ConfigError(value)
        self.token = value
        if took_over:
            print_rank0(f"checkpoint: took over the lock of {save} from a run that is gone ({took_over})", self.state)

    def _newest_with_local(self, d: LoadDecision, usable: bool) -> LoadDecision:
        """The persistent decision `d`, or the in-memory snapshots (local.py) where they are newer
        than --save's checkpoint (or --save has none) and `usable` (not with --ckpt-step, or a
        start from scratch); the report tells what the snapshots held."""
        save = self.cfg.checkpoint.save
        own = d.action != "none" and os.path.abspath(d.load_dir) == os.path.abspath(save)
        choice = self.local.decide(d.iteration if own else None, own, usable)
        notes = [f"local snapshots in {self.local.root}:"] + [f"  {n}" for n in choice.notes]
        if choice.iteration is None:
            if not choice.notes:
                notes.append("  none")
            if d.plan is not None:
                d.plan.notes = notes
            else:
                self.local_notes = notes
            return d
        tracker, _ = read_tracker(save)
        plan = LoadPlan(load_dir=save, iteration=choice.iteration, iter_dir=choice.source.iter_dir[:-len(".pt")],
                        reason="local", kind="full", tracker_iteration=tracker,
                        checkpoints=d.plan.checkpoints if own else [], rejected=d.plan.rejected if own else [],
                        metadata=choice.source.metadata, notes=notes)
        return LoadDecision(load_dir=save, plan=plan, metadata=choice.source.metadata, action="resume",
                            own_restart=self.mode != "pretrain", source=choice.source)

    def local_settled(self) -> None:
        """Before an iteration is logged: every rank's own file of the snapshot in flight is written."""
        if self.local is not None:
            self.local.wait_settled()

    def close(self) -> None:
        """The run is over: wait for a background save, release --save's lock."""
        self.finish()
        if self.local is not None:
            self.local.wait()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def restore(self, run: Run) -> None:
        """Restore what the decision's action says; print the recovery report on rank 0."""
        d = self.decision
        c, action = run.cfg.checkpoint, d.action
        if d.own_restart:
            c = dataclasses.replace(c, load_optim=True, load_rng=True, load_lr_scheduler=True)
        if action == "none":
            if c.load or c.save:
                print_rank0(f"checkpoint: nothing to load in {c.load or c.save}; starting from scratch", run.state)
            if self.local_notes:
                print_rank0("\n".join(self.local_notes), run.state)
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
        fp8 = self._restore_fp8(run, weights or d)
        if fp8 is not None:
            restored["fp8 scaling"] = fp8
        restored["data position"] = (f"from sample {run.progress.consumed_train_samples}" if action == "resume"
                                     else "from the first sample")
        run.scheduler.step(0)   # the optimizer's lr and weight decay follow the (loaded or fresh) schedule
        for chosen in (d, weights):
            if chosen is not None and isinstance(chosen.source, (OwnCheckpoint, LocalSnapshot)):
                chosen.source.release()   # free the CPU copies
        self.loaded_iteration, self.loaded_dir = d.plan.iteration, d.load_dir
        self.weights_from = weights.record if weights is not None else d.metadata.get("weights_from")
        if action == "resume" and not isinstance(d.source, LocalSnapshot):
            self.last_saved_iteration = run.progress.iteration   # nothing new to save until it trains
        if d.weights is not None:
            restored = attribute_sources(restored, d.plan, d.weights)
        self.load_report = format_recovery_report(d.plan, {"mode": action, **restored},
                                                  weights.plan if weights is not None else None)
        print_rank0(self.load_report, run.state)

    @staticmethod
    def _restore_fp8(run: Run, chosen) -> Optional[str]:
        """The delayed-scaling state of the checkpoint the weights came from (model/fp8.py), for the
        report; None when neither the run nor the checkpoint uses FP8."""
        fp8_state = run.module.fp8_state
        saved_fp8 = chosen.metadata.get("config", {}).get("model", {}).get("fp8")
        if fp8_state is None:
            return None if not saved_fp8 else f"not used (saved by an --fp8-format {saved_fp8} run; this run has none)"
        fp8_state.weights_changed()
        saved, why = chosen.source.fp8_state(run.state)
        return fp8_state.load_state_dict(saved) if saved is not None or why is None else f"fresh ({why})"

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
        report, self.base, self.base_bytes = adapters.restore_lora_weights(run, self.decision, open_chosen)
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
        """The kinds of checkpoint ('full', 'weights', 'local') that the save intervals ask for at `iteration`."""
        c = self.cfg.checkpoint
        if not c.save or self.nonfinite_at is not None:
            return []
        return [kind for kind, every in (("full", c.save_interval), ("weights", c.save_weights_only_interval),
                                         ("local", c.local_ckpt_interval))
                if every and iteration % every == 0]

    def stop_saving(self, iteration: int, what: str) -> None:
        """The loop saw a non-finite loss or grad norm at `iteration`: no checkpoint from now on (so
        the tracker and retention keep the finite ones)."""
        if self.nonfinite_at is None and self.cfg.checkpoint.save:
            print_rank0(f"not saving checkpoints from iteration {iteration} on: {what}", self.state)
        self.nonfinite_at = iteration if self.nonfinite_at is None else self.nonfinite_at

    def save_if_due(self, run: Run) -> None:
        """After each iteration: the saves the intervals ask for."""
        if self.lock is not None:
            self.lock.heartbeat()
        for kind in self.saves_due(run.progress.iteration):
            if kind == "local":
                self.local.snapshot(run)
            else:
                self.save(run, kind)

    def save_at_end(self, run: Run) -> None:
        """When the loop stops (done, exit flag, signal): a full checkpoint unless this iteration has
        one, then wait for any background save to commit."""
        if not self.cfg.checkpoint.save:
            return
        if self.last_saved_iteration != run.progress.iteration and self.nonfinite_at is None:
            self.save(run, "full")
        self.finish()
        if self.local is not None and self.last_saved_iteration == run.progress.iteration:
            self.local.discard()   # the persistent checkpoint holds everything they did

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
                optimizer=run.optimizer.state_dict() if own_optimizer else None,
                fp8=run.module.fp8_state.state_dict() if full and run.module.fp8_state is not None else None)
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
        result = save_files(directory, p.iteration, files, state, metadata, kind=kind, async_saver=self.async_saver,
                            token=self.token)
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

