"""Loss scaling for fp16 training: a constant scale (--loss-scale) or Megatron's dynamic scaler.

The loss is multiplied by the scale before backward so that small fp16 gradients do not
flush to zero; the optimizer divides the fp32 main grads by it again. The dynamic scaler
shrinks the scale after overflows and grows it after a window of clean steps.
"""

from __future__ import annotations

from typing import Optional

from megatron_lite.config import OptimizerConfig


class ConstantGradScaler:
    """A fixed loss scale. Its state is the flag's value, so a checkpoint never changes it."""

    def __init__(self, scale: float):
        if scale <= 0:
            raise ValueError(f"--loss-scale must be positive, got {scale}")
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        """A constant scale ignores overflows (the step is still skipped)."""

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep the scale given by --loss-scale; the checkpoint's value is informational."""


class DynamicGradScaler:
    """Megatron's dynamic loss scale.

    On an overflow the growth counter restarts and the hysteresis counter drops by one;
    once it reaches zero the scale is multiplied by `backoff_factor` (never below
    `min_scale`), and it stays at zero so that every further overflow backs off again.
    After `growth_interval` consecutive clean steps the scale is multiplied by
    `growth_factor` and the hysteresis counter is refilled.
    """

    def __init__(self, initial_scale: float, min_scale: float, growth_factor: float,
                 backoff_factor: float, growth_interval: int, hysteresis: int):
        if not 0.0 < min_scale <= initial_scale:
            raise ValueError(f"need 0 < --min-loss-scale ({min_scale}) <= --initial-loss-scale ({initial_scale})")
        if growth_factor <= 1.0 or not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"need growth_factor > 1 and 0 < backoff_factor < 1, "
                             f"got {growth_factor} and {backoff_factor}")
        if growth_interval <= 0 or hysteresis <= 0:
            raise ValueError(f"--loss-scale-window ({growth_interval}) and --hysteresis ({hysteresis}) "
                             f"must be positive")
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.growth_tracker = 0
        self.hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state_dict: dict) -> None:
        self.scale = float(state_dict["scale"])
        self.growth_tracker = int(state_dict["growth_tracker"])
        self.hysteresis_tracker = int(state_dict["hysteresis_tracker"])


GradScaler = ConstantGradScaler | DynamicGradScaler


def build_grad_scaler(cfg: OptimizerConfig) -> Optional[GradScaler]:
    """Megatron's choice: --loss-scale gives a constant scale (fp16 or bf16), fp16 alone a dynamic
    one (growth x2, backoff x0.5, window --loss-scale-window), and bf16/fp32 none."""
    if not (cfg.fp16 or cfg.bf16):
        return None
    if cfg.loss_scale:
        return ConstantGradScaler(cfg.loss_scale)
    if cfg.fp16:
        return DynamicGradScaler(initial_scale=cfg.initial_loss_scale, min_scale=cfg.min_loss_scale,
                                 growth_factor=2.0, backoff_factor=0.5,
                                 growth_interval=cfg.loss_scale_window, hysteresis=cfg.hysteresis)
    return None
