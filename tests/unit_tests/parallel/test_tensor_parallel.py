"""TP layers equal their dense counterparts, forward and backward (2 gloo ranks, float64)."""

import torch
import torch.nn.functional as F

from megatron_lite.parallel.state import initialize
from megatron_lite.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           reduce_from_tp_region, reduce_scatter_to_sequence_parallel_region,
                                           shard, unshard)
from tests.unit_tests.dist_utils import run_distributed

S, B, H, OUT, V = 6, 3, 8, 12, 16


def _dense_inputs():
    g = torch.Generator().manual_seed(0)
    shapes = [(S, B, H), (OUT, H), (OUT,), (H, OUT), (H,), (V, H)]
    return tuple(torch.randn(s, generator=g, dtype=torch.float64) for s in shapes) + (
        torch.randint(0, V, (B, S), generator=g),)


def _tp_body(rank, world_size, sequence_parallel):
    state = initialize(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
    x, w1, b1, w2, b2, emb, ids = _dense_inputs()
    col = ColumnParallelLinear(H, OUT, state, dtype=torch.float64)
    row = RowParallelLinear(OUT, H, state, dtype=torch.float64)
    col.weight.data.copy_(shard(w1, 0, state.tp_rank, 2))
    col.bias.data.copy_(shard(b1, 0, state.tp_rank, 2))
    row.weight.data.copy_(shard(w2, 1, state.tp_rank, 2))
    row.bias.data.copy_(b2)
    x_in = x.chunk(2, dim=0)[state.tp_rank].clone() if sequence_parallel else x.clone()
    x_in.requires_grad_()
    y = row(torch.tanh(col(x_in)))
    y.pow(2).sum().backward()

    vocab = VocabParallelEmbedding(V, H, state, dtype=torch.float64)
    vocab.weight.data.copy_(shard(emb, 0, state.tp_rank, 2))
    e = vocab(ids.t())
    e = reduce_scatter_to_sequence_parallel_region(e, state) if sequence_parallel else reduce_from_tp_region(e, state)
    e.sum().backward()
    return {"y": y.detach(), "x_grad": x_in.grad, "w1_grad": col.weight.grad, "b1_grad": col.bias.grad,
            "w2_grad": row.weight.grad, "b2_grad": row.bias.grad, "emb": e.detach(), "emb_grad": vocab.weight.grad}


def _dense_reference():
    x, w1, b1, w2, b2, emb, ids = _dense_inputs()
    params = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2, emb)]
    xr, w1r, b1r, w2r, b2r, embr = params
    y = F.linear(torch.tanh(F.linear(xr, w1r, b1r)), w2r, b2r)
    y.pow(2).sum().backward()
    e = F.embedding(ids.t(), embr)
    e.sum().backward()
    return y.detach(), e.detach(), [p.grad for p in params]


def _check(results, sequence_parallel):
    y, e, (gx, gw1, gb1, gw2, gb2, gemb) = _dense_reference()
    close = dict(rtol=1e-12, atol=1e-12)  # float64: only summation order differs
    if sequence_parallel:
        torch.testing.assert_close(torch.cat([r["y"] for r in results]), y, **close)
        torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), gx, **close)
        torch.testing.assert_close(torch.cat([r["emb"] for r in results]), e, **close)
        # each rank's replicated bias sees only its tokens: the sum over TP is the dense grad
        torch.testing.assert_close(results[0]["b2_grad"] + results[1]["b2_grad"], gb2, **close)
    else:
        for r in results:
            torch.testing.assert_close(r["y"], y, **close)
            torch.testing.assert_close(r["x_grad"], gx, **close)
            torch.testing.assert_close(r["emb"], e, **close)
            torch.testing.assert_close(r["b2_grad"], gb2, **close)
    torch.testing.assert_close(unshard([r["w1_grad"] for r in results], 0), gw1, **close)
    torch.testing.assert_close(unshard([r["b1_grad"] for r in results], 0), gb1, **close)
    torch.testing.assert_close(unshard([r["w2_grad"] for r in results], 1), gw2, **close)
    torch.testing.assert_close(unshard([r["emb_grad"] for r in results], 0), gemb, **close)


def test_tp_layers_equal_dense_forward_and_backward():
    _check(run_distributed(_tp_body, 2, False), sequence_parallel=False)


def test_tp_layers_with_sequence_parallel_equal_dense():
    _check(run_distributed(_tp_body, 2, True), sequence_parallel=True)


def test_shard_unshard_round_trip_with_swiglu_chunks():
    full = torch.arange(48.0).view(8, 6)
    pieces = [shard(full, 0, r, 2, chunks=2) for r in range(2)]
    # rank 0 holds [gate rows 0-1; up rows 4-5]
    torch.testing.assert_close(pieces[0], torch.cat([full[0:2], full[4:6]]))
    torch.testing.assert_close(unshard(pieces, 0, chunks=2), full)
    torch.testing.assert_close(unshard([shard(full, 1, r, 3) for r in range(3)], 1), full)
