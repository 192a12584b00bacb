"""Python API over the same loop that `pretrain_gpt.py` runs.

    from megatron_lite.trainer import Trainer
    trainer = Trainer(["--config", "run.yaml"])
    run = trainer.train(train_checkpoint="ckpt")        # --load and --save ckpt: a restart resumes
    trainer.evaluate()                                  # validation lm loss of the trained model
    trainer.generate(["1 2 3"], max_new_tokens=8)       # greedy continuation, as text

    Trainer(["--config", "sft.yaml", "--save", "sft"]).finetune(finetune_checkpoint="ckpt")

Each call works on a copy of the Trainer's configuration; evaluate() and generate() use the model of
the last train()/finetune() of this Trainer, else the checkpoint in --load (load_for_inference).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Callable, List, Optional, Sequence, Union

from megatron_lite.arguments import ConfigError, parse_args
from megatron_lite.config import RunConfig
from megatron_lite.initialize import Progress, Run
from megatron_lite.parallel.random import preserved_rng
from megatron_lite.training import build_data, evaluate, pretrain

Prompt = Union[str, Sequence[int]]


class Trainer:
    """Holds a run's configuration; `train()` and `finetune()` build, load, train and save, and
    `evaluate()` and `generate()` use the model they leave (or --load's checkpoint)."""

    def __init__(self, args: Union[Sequence[str], RunConfig, None] = None):
        self.cfg = args if isinstance(args, RunConfig) else parse_args(list(args or []))
        self.run: Optional[Run] = None   # the last train()/finetune() Run, or the one loaded from --load

    def _config(self, **checkpoint_fields) -> RunConfig:
        """A copy of the configuration with these checkpoint fields set, as if given as flags."""
        cfg = copy.deepcopy(self.cfg)
        for name, value in checkpoint_fields.items():
            setattr(cfg.checkpoint, name, value)
            cfg.explicit.add(f"checkpoint.{name}")
        return cfg

    def train(self, resume_training: bool = True, train_checkpoint: Optional[str] = None,
              data_iterators: Optional[Callable] = None) -> Run:
        """Pretrain (or resume). `train_checkpoint=DIR` is --load DIR, and --save DIR unless --save is
        given, so calling it again after a stop resumes. resume_training=False starts from scratch,
        whatever --load and --save hold (it still saves)."""
        fields = {}
        if train_checkpoint is not None:
            fields = {"load": train_checkpoint, "save": self.cfg.checkpoint.save or train_checkpoint}
        self.run = pretrain(self._config(**fields), data_iterators=data_iterators, load=resume_training)
        return self.run

    def finetune(self, finetune_checkpoint: str, resume_training: bool = True,
                 data_iterators: Optional[Callable] = None) -> Run:
        """Finetune from `finetune_checkpoint` (--finetune --load DIR: its weights; iteration, optimizer,
        scheduler and RNG fresh), saving to --save. With resume_training a restart finds the finetune's
        own checkpoint in --save and resumes it (the CheckpointManager's own-restart rule);
        resume_training=False ignores those and starts the finetune again from `finetune_checkpoint`."""
        cfg = self._config(load=finetune_checkpoint, finetune=True)
        if resume_training:
            self.run = pretrain(cfg, data_iterators=data_iterators)
            return self.run
        save = cfg.checkpoint.save
        if save and os.path.abspath(save) == os.path.abspath(finetune_checkpoint):
            raise ConfigError(f"finetune(resume_training=False) starts again from {finetune_checkpoint}, which is also "
                              f"--save, where the finetune's own checkpoints would hide it; pass another --save")
        self.run = pretrain(cfg, data_iterators=data_iterators, resume_own=False)
        return self.run

    def _model_run(self) -> Run:
        if self.run is None:
            from megatron_lite.inference.load import load_for_inference
            self.run = load_for_inference(copy.deepcopy(self.cfg))
        return self.run

    def evaluate(self) -> float:
        """The validation lm loss of the model over the first --eval-iters validation batches (the
        batches training's first evaluation reads), from the datasets training builds. Moves no
        generator and no data position of the run: a later train() continues as without it."""
        run = self._model_run()
        unseen = dataclasses.replace(run, progress=Progress())   # the validation split from its start
        with preserved_rng(run.state.rng):
            valid_iter = build_data(unseen)[1] if run.cfg.train.eval_iters > 0 else None
        if valid_iter is None:
            raise ConfigError("evaluate() has no validation data: pass --eval-interval N and --eval-iters M (M > 0), "
                              "and a --split or --valid-data-path that gives a validation split")
        return evaluate(unseen, valid_iter)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: Optional[int] = None, greedy: bool = True,
                 temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Optional[int] = None) -> List[Union[str, List[int]]]:
        """The continuation of each prompt, stopping at the tokenizer's end-of-document token: a string
        for a string prompt (tokenized with the run's tokenizer), token ids for token ids. Unset
        sampling arguments take the --max-new-tokens/--temperature/--top-k/--top-p flags; the seed
        defaults to --seed. Sampling arguments need greedy=False."""
        from megatron_lite.inference.generate import generate
        from megatron_lite.validation import _check_inference

        if isinstance(prompts, str):
            raise ConfigError("generate() takes a list of prompts; pass [text]")
        run = self._model_run()
        given = {name: value for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature),
                                                 ("top_k", top_k), ("top_p", top_p)) if value is not None}
        sampling = dataclasses.replace(run.cfg.inference, greedy=greedy, **given)
        _check_inference(dataclasses.replace(run.cfg, inference=sampling,
                                             explicit=run.cfg.explicit | {f"inference.{k}" for k in given}))
        tokenizer = run.tokenizer
        ids = [tokenizer.tokenize(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        with preserved_rng(run.state.rng):
            new = generate(run, ids, sampling, seed=run.cfg.train.seed if seed is None else seed,
                           stop_token_id=tokenizer.eod)
        return [tokenizer.detokenize(n) if isinstance(p, str) else n for p, n in zip(prompts, new)]
