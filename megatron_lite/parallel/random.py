"""Seeding, the model-parallel RNG tracker, and activation recomputation that respects both.

Megatron's scheme: the default generator is seeded `seed + 100 * pp_rank` (identical on all
TP ranks, so dropout on replicated activations agrees), and the tracker's
"model-parallel-rng" state is seeded `seed + 100 * pp_rank + 2718 + tp_rank` (different on
each TP rank, for dropout on activations that are split across TP: attention heads, and
everything under sequence parallelism).
"""

from __future__ import annotations

import contextlib
import random
from typing import Dict

import numpy as np
import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(device: torch.device, s: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(s, device)
    else:
        torch.set_rng_state(s)


class RNGStatesTracker:
    """Named generator states for `device`'s default generator, entered with `fork(name)`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.states: Dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        saved = _get_state(self.device)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _get_state(self.device)
        _set_state(self.device, saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        saved = _get_state(self.device)
        _set_state(self.device, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(self.device, saved)

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}


def seed_everything(seed: int, tp_rank: int, pp_rank: int, tracker: RNGStatesTracker) -> None:
    """Seed python, numpy, torch (CPU and CUDA) and the tracker the Megatron way."""
    offset = seed + 100 * pp_rank
    random.seed(offset)
    np.random.seed(offset)
    torch.manual_seed(offset)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(offset)
    tracker.states.clear()
    tracker.add(MODEL_PARALLEL_RNG, offset + 2718 + tp_rank)


def get_rng_state(tracker: RNGStatesTracker) -> dict:
    """Every generator of this rank, as tensors and plain types (loadable with weights_only)."""
    py_version, py_keys, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "keys": torch.tensor(py_keys, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "tracker": tracker.get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, tracker: RNGStatesTracker) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["keys"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker.set_states(state["tracker"])


@contextlib.contextmanager
def preserved_rng(tracker: RNGStatesTracker):
    """Run a block without moving any generator (e.g. a DataLoader drawing its base seed), so
    that building things at a restart does not shift the random stream of training."""
    saved = get_rng_state(tracker)
    try:
        yield
    finally:
        set_rng_state(saved, tracker)


class _Recompute(torch.autograd.Function):
    """Activation checkpointing that replays the default generator *and* the tracker states,
    so dropout masks in the recomputed forward equal the original ones."""

    @staticmethod
    def forward(ctx, run_fn, tracker, *args):
        ctx.run_fn, ctx.tracker = run_fn, tracker
        ctx.rng = (_get_state(tracker.device), tracker.get_states())
        with torch.no_grad():
            out = run_fn(*args)
        ctx.save_for_backward(*args)
        return out

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        now = (_get_state(ctx.tracker.device), ctx.tracker.get_states())
        _set_state(ctx.tracker.device, ctx.rng[0])
        ctx.tracker.set_states(ctx.rng[1])
        with torch.enable_grad():
            out = ctx.run_fn(*inputs)
        _set_state(ctx.tracker.device, now[0])
        ctx.tracker.set_states(now[1])
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o for o in outs if o.requires_grad],
                                [g for o, g in zip(outs, grads) if o.requires_grad])
        return (None, None) + tuple(t.grad if t.requires_grad else None for t in inputs)


def recompute(run_fn, tracker: RNGStatesTracker, *args):
    """Run `run_fn(*args)` without keeping activations; recompute them in backward."""
    return _Recompute.apply(run_fn, tracker, *args)
