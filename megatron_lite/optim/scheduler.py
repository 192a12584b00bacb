"""Learning-rate and weight-decay schedule with Megatron-LM's OptimizerParamScheduler semantics.

Steps are counted in samples: the training loop calls `step(increment=global_batch_size)`
after every iteration, skipped ones included. `build_scheduler` converts the iteration
flags to samples as Megatron's `get_optimizer_param_scheduler` does.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron_lite.config import OptimizerConfig, TrainConfig

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine")
WD_INCR_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    """Sets `lr` and `weight_decay` of every optimizer param group from the sample count.

    Learning rate, with s = num_steps, W = lr_warmup_steps, D = lr_decay_steps:
      s <= W (and W > 0):   init_lr + (max_lr - init_lr) * s / W
      constant:             max_lr
      s > D:                min_lr
      inverse-square-root:  max(min_lr, max_lr * sqrt(max(W, 1)) / sqrt(max(s, 1)))
      otherwise             min_lr + coeff * (max_lr - min_lr), r = (s - W) / (D - W):
        linear  coeff = 1 - r;   cosine  coeff = (cos(pi r) + 1) / 2
        WSD     coeff = 1 until s > D - wsd_decay_steps, then with q the fraction of the
                wsd_decay_steps done: exponential 2 * 0.5^q - 1, linear 1 - q, cosine (cos(pi q) + 1) / 2
    Weight decay goes from start_wd to end_wd over wd_incr_steps (constant, linear, or
    cosine (1 - cos(pi r)) / 2), multiplied by the group's `wd_mult` (0 for biases and norms).
    A group's own `max_lr` / `min_lr` keys override the scheduler's.
    """

    def __init__(self, optimizer, init_lr: float, max_lr: float, min_lr: float,
                 lr_warmup_steps: float, lr_decay_steps: int, lr_decay_style: str,
                 start_wd: float, end_wd: float, wd_incr_steps: int, wd_incr_style: str,
                 use_checkpoint_opt_param_scheduler: bool = False,
                 override_opt_param_scheduler: bool = False,
                 wsd_decay_steps: Optional[int] = None, lr_wsd_decay_style: Optional[str] = None):
        if not 0.0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= --min-lr ({min_lr}) <= --lr ({max_lr})")
        if init_lr > max_lr:
            raise ValueError(f"--lr-warmup-init ({init_lr}) must not exceed --lr ({max_lr})")
        if lr_decay_steps <= 0:
            raise ValueError(f"the LR decay span is {lr_decay_steps} samples; set --train-iters/--train-samples "
                             f"or --lr-decay-iters/--lr-decay-samples to a positive value")
        if lr_warmup_steps >= lr_decay_steps:
            raise ValueError(f"LR warmup ({lr_warmup_steps} samples) must be shorter than the decay span "
                             f"({lr_decay_steps} samples); shorten the warmup or lengthen --lr-decay-iters")
        if lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {lr_decay_style!r} is not one of {LR_DECAY_STYLES}")
        if lr_decay_style == "WSD":
            if wsd_decay_steps is None:
                raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters or --lr-wsd-decay-samples")
            if lr_wsd_decay_style not in WSD_DECAY_STYLES:
                raise ValueError(f"--lr-wsd-decay-style {lr_wsd_decay_style!r} is not one of {WSD_DECAY_STYLES}")
        if not 0.0 <= start_wd <= end_wd:
            raise ValueError(f"need 0 <= --start-weight-decay ({start_wd}) <= --end-weight-decay ({end_wd})")
        if wd_incr_style not in WD_INCR_STYLES:
            raise ValueError(f"--weight-decay-incr-style {wd_incr_style!r} is not one of {WD_INCR_STYLES}")
        if wd_incr_style == "constant" and start_wd != end_wd:
            raise ValueError(f"constant weight decay needs equal start and end values, got {start_wd} and {end_wd}")
        if override_opt_param_scheduler and use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                             "contradict each other; pass at most one")
        self.optimizer = optimizer
        self.init_lr = float(init_lr)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps = wsd_decay_steps
        self.lr_wsd_decay_style = lr_wsd_decay_style
        self.start_wd = float(start_wd)
        self.end_wd = float(end_wd)
        self.wd_incr_steps = wd_incr_steps
        self.wd_incr_style = wd_incr_style
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.num_steps = 0
        self.step(0)

    def get_wd(self, param_group: Optional[dict] = None) -> float:
        """Weight decay at the current step (before the group's wd_mult)."""
        group = param_group or {}
        start_wd = group.get("start_wd", self.start_wd)
        end_wd = group.get("end_wd", self.end_wd)
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return end_wd
        incr_ratio = float(self.num_steps) / float(self.wd_incr_steps)
        if self.wd_incr_style == "linear":
            coeff = incr_ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * (1 - incr_ratio)) + 1.0)
        return start_wd + coeff * (end_wd - start_wd)

    def get_lr(self, param_group: Optional[dict] = None) -> float:
        """Learning rate at the current step (formulas in the class docstring)."""
        group = param_group or {}
        max_lr = group.get("max_lr", self.max_lr)
        min_lr = group.get("min_lr", self.min_lr)
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * float(self.num_steps) / float(self.lr_warmup_steps)
        if self.lr_decay_style == "constant":
            return max_lr
        if self.num_steps > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            warmup_steps = max(self.lr_warmup_steps, 1)
            num_steps = max(self.num_steps, 1)
            return max(min_lr, max_lr * warmup_steps ** 0.5 / (num_steps ** 0.5))
        decay_ratio = float(self.num_steps - self.lr_warmup_steps) / float(self.lr_decay_steps - self.lr_warmup_steps)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - decay_ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        else:
            coeff = self._wsd_coeff()
        return min_lr + coeff * (max_lr - min_lr)

    def _wsd_coeff(self) -> float:
        anneal_start = self.lr_decay_steps - self.wsd_decay_steps
        if self.num_steps <= anneal_start:
            return 1.0
        ratio = float(self.num_steps - anneal_start) / float(self.wsd_decay_steps)
        if self.lr_wsd_decay_style == "linear":
            return 1.0 - ratio
        if self.lr_wsd_decay_style == "cosine":
            return 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return 2.0 * math.pow(0.5, ratio) - 1.0

    def step(self, increment: int) -> None:
        """Advance by `increment` samples and set every param group's lr and weight_decay."""
        self.num_steps += increment
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group)
            group["weight_decay"] = self.get_wd(group) * group.get("wd_mult", 1.0)

    _CHECKED = (  # state-dict key, attribute, name in messages
        ("max_lr", "max_lr", "learning rate (--lr)"),
        ("min_lr", "min_lr", "minimum learning rate (--min-lr)"),
        ("init_lr", "init_lr", "warmup initial learning rate (--lr-warmup-init)"),
        ("lr_warmup_steps", "lr_warmup_steps", "warmup samples"),
        ("lr_decay_steps", "lr_decay_steps", "decay samples"),
        ("lr_decay_style", "lr_decay_style", "learning rate decay style (--lr-decay-style)"),
        ("wsd_decay_steps", "wsd_decay_steps", "WSD decay samples"),
        ("lr_wsd_decay_style", "lr_wsd_decay_style", "WSD decay style (--lr-wsd-decay-style)"),
        ("start_wd", "start_wd", "start weight decay"),
        ("end_wd", "end_wd", "end weight decay"),
        ("wd_incr_steps", "wd_incr_steps", "weight decay increment samples"),
        ("wd_incr_style", "wd_incr_style", "weight decay increment style (--weight-decay-incr-style)"),
    )

    def state_dict(self) -> dict:
        """Everything that defines the schedule, and how far along it is."""
        sd = {key: getattr(self, attr) for key, attr, _ in self._CHECKED}
        sd["num_steps"] = self.num_steps
        return sd

    def _check_and_set(self, cls_value, sd_value, name: str):
        """Megatron's rule: the flags win with --override-opt_param-scheduler, the checkpoint wins with
        --use-checkpoint-opt_param-scheduler, and otherwise the two must agree."""
        if self.override_opt_param_scheduler:
            return cls_value
        if not self.use_checkpoint_opt_param_scheduler and cls_value != sd_value:
            raise ValueError(f"OptimizerParamScheduler: the checkpoint's {name} is {sd_value} but this run's "
                             f"is {cls_value}; pass --override-opt_param-scheduler to use this run's values or "
                             f"--use-checkpoint-opt_param-scheduler to use the checkpoint's")
        return sd_value

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the schedule and its position, then set the param groups' lr and weight decay."""
        for key, attr, name in self._CHECKED:
            if key in state_dict:
                setattr(self, attr, self._check_and_set(getattr(self, attr), state_dict[key], name))
        self.num_steps = 0
        self.step(increment=state_dict["num_steps"])


def build_scheduler(optimizer, opt_cfg: OptimizerConfig, train_cfg: TrainConfig) -> OptimizerParamScheduler:
    """The scheduler for a run, in samples (Megatron's get_optimizer_param_scheduler).

    Iteration-based (--train-iters): decay over lr_decay_iters (default train_iters) x
    global batch, warmup lr_warmup_fraction x decay span or lr_warmup_iters x global batch,
    weight decay over train_iters x global batch. Sample-based (--train-samples): the same
    with lr_decay_samples (default train_samples), lr_warmup_samples and train_samples.
    """
    if opt_cfg.weight_decay_incr_style == "constant":
        if opt_cfg.start_weight_decay is not None or opt_cfg.end_weight_decay is not None:
            raise ValueError("--start-weight-decay/--end-weight-decay need --weight-decay-incr-style linear or "
                             "cosine; with the constant style use --weight-decay")
        start_wd = end_wd = opt_cfg.weight_decay
    else:
        if opt_cfg.start_weight_decay is None or opt_cfg.end_weight_decay is None:
            raise ValueError(f"--weight-decay-incr-style {opt_cfg.weight_decay_incr_style} needs both "
                             f"--start-weight-decay and --end-weight-decay")
        start_wd, end_wd = opt_cfg.start_weight_decay, opt_cfg.end_weight_decay

    if train_cfg.train_iters:
        gbs = train_cfg.global_batch_size
        if not gbs:
            raise ValueError("global_batch_size is not set; pass --global-batch-size (or build the config "
                             "with arguments.parse_args, which defaults it to micro batch x DP)")
        decay_iters = opt_cfg.lr_decay_iters if opt_cfg.lr_decay_iters is not None else train_cfg.train_iters
        lr_decay_steps = decay_iters * gbs
        wd_incr_steps = train_cfg.train_iters * gbs
        wsd_decay_steps = None if opt_cfg.lr_wsd_decay_iters is None else opt_cfg.lr_wsd_decay_iters * gbs
        warmup_by_count = opt_cfg.lr_warmup_iters * gbs
    elif train_cfg.train_samples:
        lr_decay_steps = (opt_cfg.lr_decay_samples if opt_cfg.lr_decay_samples is not None
                          else train_cfg.train_samples)
        wd_incr_steps = train_cfg.train_samples
        wsd_decay_steps = opt_cfg.lr_wsd_decay_samples
        warmup_by_count = opt_cfg.lr_warmup_samples
    else:
        raise ValueError("the LR schedule needs the run length: pass --train-iters or --train-samples")
    if opt_cfg.lr_warmup_fraction is not None:
        lr_warmup_steps = opt_cfg.lr_warmup_fraction * lr_decay_steps
    else:
        lr_warmup_steps = warmup_by_count

    return OptimizerParamScheduler(
        optimizer, init_lr=opt_cfg.lr_warmup_init, max_lr=opt_cfg.lr, min_lr=opt_cfg.min_lr,
        lr_warmup_steps=lr_warmup_steps, lr_decay_steps=lr_decay_steps, lr_decay_style=opt_cfg.lr_decay_style,
        start_wd=start_wd, end_wd=end_wd, wd_incr_steps=wd_incr_steps,
        wd_incr_style=opt_cfg.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=opt_cfg.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=opt_cfg.override_opt_param_scheduler,
        wsd_decay_steps=wsd_decay_steps, lr_wsd_decay_style=opt_cfg.lr_wsd_decay_style)
