"""Dropout masks differ across TP ranks where activations are split and agree where they are
replicated; activation recomputation replays the same masks."""

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.model.gpt import GPTModel
from megatron_lite.ops import build_ops
from megatron_lite.parallel.random import RNGStatesTracker, seed_everything
from megatron_lite.parallel.state import initialize
from tests.unit_tests.dist_utils import run_distributed


def _draws(rank, world_size):
    state = initialize(tensor_model_parallel_size=2)
    seed_everything(42, state.tp_rank, state.pp_rank, state.rng)
    replicated = torch.rand(8)               # e.g. hidden dropout on replicated activations
    with state.rng.fork():
        split = torch.rand(8)                # e.g. attention dropout on this rank's heads
    after = torch.rand(8)                    # the fork left the default stream where it was
    return replicated, split, after


def test_tracker_masks_differ_across_tp_ranks_and_default_stream_agrees():
    (rep0, split0, after0), (rep1, split1, after1) = run_distributed(_draws, 2)
    assert torch.equal(rep0, rep1) and torch.equal(after0, after1)
    assert not torch.equal(split0, split1)


FULL_RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def _model(recompute):
    state = initialize()
    seed_everything(3, 0, 0, state.rng)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, padded_vocab_size=64,
                      vocab_size=64, max_position_embeddings=16, ffn_hidden_size=64, hidden_dropout=0.3,
                      attention_dropout=0.3, **(FULL_RECOMPUTE if recompute else {}))
    return GPTModel(cfg, state, build_ops()), state


def test_full_recompute_gives_identical_loss_and_grads_with_dropout():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    results = []
    for recompute in (False, True):
        model, _ = _model(recompute)
        loss = model(ids, pos, labels=ids).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_tracker_state_round_trips():
    tracker = RNGStatesTracker(torch.device("cpu"))
    tracker.add("model-parallel-rng", 5)
    saved = tracker.get_states()
    with tracker.fork():
        first = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(4), first)
