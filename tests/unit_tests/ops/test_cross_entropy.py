"""Vocab-parallel cross entropy: the torch path over 2 gloo ranks against F.cross_entropy on the
whole vocabulary, and ranks agreeing on one backend per op (checked in the same processes)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite.ops import OP_NAMES, torch_ops
from megatron_lite.ops.dispatch import _agree_across_ranks
from tests.unit_tests.dist_utils import run_distributed

SEQ, BATCH, VOCAB = 5, 3, 24


def full_problem(dtype):
    g = torch.Generator().manual_seed(7)
    logits = (3 * torch.randn(SEQ, BATCH, VOCAB, generator=g)).to(dtype)
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    target[0, 0], target[0, 1] = 0, VOCAB - 1  # both edge ids, one on each shard
    return logits, target


def _two_rank_body(rank, world_size):
    group = dist.group.WORLD
    v_local = VOCAB // world_size
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits, target = full_problem(dtype)
        shard = logits[..., rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
        loss = torch_ops.vocab_parallel_cross_entropy(shard, target, rank * v_local, group)
        (loss * torch.arange(1.0, 1.0 + loss.numel()).view_as(loss)).sum().backward()
        results[dtype] = (loss.detach(), shard.grad)
    mine = {op: "torch" for op in OP_NAMES} | {"rms_norm": "cuda", "swiglu": "cuda" if rank == 0 else "apex"}
    results["agreed"] = _agree_across_ranks(mine, torch.device("cpu"))
    return results


def test_two_rank_vocab_parallel_cross_entropy_matches_full_vocab_and_ranks_agree_on_backends():
    results = run_distributed(_two_rank_body, 2)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        logits, target = full_problem(dtype)
        full = logits.double().requires_grad_()
        want = F.cross_entropy(full.view(-1, VOCAB), target.view(-1), reduction="none").view(SEQ, BATCH)
        (want * torch.arange(1.0, 1.0 + want.numel(), dtype=torch.float64).view_as(want)).sum().backward()
        for rank in range(2):
            loss, _ = results[rank][dtype]
            assert loss.dtype == torch.float32
            torch.testing.assert_close(loss.double(), want.detach(), rtol=tol, atol=tol)
        grad = torch.cat([results[0][dtype][1], results[1][dtype][1]], dim=-1)
        assert grad.dtype == dtype
        assert (grad.double() - full.grad).abs().max() / full.grad.abs().max() < tol
    for rank in range(2):
        agreed = results[rank]["agreed"]
        assert agreed["rms_norm"] == "cuda"  # same on both ranks: kept
        assert agreed["swiglu"] == "torch"   # cuda on one rank, apex on the other: both take torch
