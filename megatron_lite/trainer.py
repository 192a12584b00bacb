"""Python API over the same loop that `pretrain_gpt.py` runs.

    from megatron_lite.trainer import Trainer
    run = Trainer(["--config", "run.yaml", "--save", "ckpt", "--load", "ckpt"]).train()
    run.history[-1]["lm loss"]
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from megatron_lite.arguments import parse_args
from megatron_lite.config import RunConfig
from megatron_lite.initialize import Run
from megatron_lite.training import pretrain


class Trainer:
    """Holds a run's configuration; `train()` builds, loads, trains and saves."""

    def __init__(self, args: Union[Sequence[str], RunConfig, None] = None):
        self.cfg = args if isinstance(args, RunConfig) else parse_args(list(args or []))

    def train(self, resume_training: bool = True, data_iterators: Optional[Callable] = None) -> Run:
        """resume_training=False starts from scratch, whatever --load and --save hold (it still saves)."""
        return pretrain(self.cfg, data_iterators=data_iterators, load=resume_training)
