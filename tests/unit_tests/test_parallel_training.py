"""TP, PP, DP and TP2xPP2xDP2 training reproduce a single-process run.

Each layout trains the same tiny model on the same mock data for 5 iterations (float32, no
dropout) and must match the single-process run's per-iteration losses and its parameters
after the last step to a relative 1e-5. GPT-2 style (tied embeddings, learned positions,
biases) and Llama style (RMSNorm, SwiGLU, RoPE, GQA, untied, no biases) both run, with and
without the distributed optimizer and sequence parallelism; the two TP=2 layouts also recompute
the norms' and the MLP activation's outputs (--recompute-granularity selective).

Adam's epsilon is 1e-6 rather than 1e-8: the gradient of the key bias is mathematically zero
(softmax ignores a per-query constant), so what the runs compute there is rounding noise, and
with a tiny epsilon Adam turns any noise into a full-size step.
"""

import pytest
import torch

from megatron_lite.arguments import parse_args
from megatron_lite.parallel.tensor import unshard
from megatron_lite.training import pretrain
from tests.unit_tests.dist_utils import run_distributed

COMMON = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
          "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "5", "--mock-data",
          "--tokenizer-type", "NullTokenizer", "--vocab-size", "127", "--make-vocab-size-divisible-by", "32",
          "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-3", "--lr-warmup-iters", "2",
          "--seed", "7", "--log-interval", "100", "--eval-interval", "0", "--adam-eps", "1e-6"]
ARCH = {
    "gpt2": [],
    "llama": ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
              "--group-query-attention", "--num-query-groups", "2", "--disable-bias-linear",
              "--untie-embeddings-and-output-weights"],
}


def _train(rank, world_size, argv):
    run = pretrain(parse_args(argv))
    module, s = run.module, run.state
    params = {}
    if s.dp_rank == 0:
        for name, p in module.named_parameters():
            params[module.global_name(name)] = (p.detach().clone(), p.partition_dim, p.partition_chunks, s.tp_rank)
    return {"losses": [h["lm loss"] for h in run.history], "lrs": [h["lr"] for h in run.history],
            "params": params}


def _global_params(results):
    pieces = {}
    for r in results:
        for name, (t, dim, chunks, tp_rank) in r["params"].items():
            pieces.setdefault(name, {})[tp_rank] = (t, dim, chunks)
    out = {}
    for name, by_rank in pieces.items():
        ranks = sorted(by_rank)
        t, dim, chunks = by_rank[ranks[0]]
        out[name] = unshard([by_rank[r][0] for r in ranks], dim, chunks) if dim >= 0 else t
    return out


_baselines = {}


def _baseline(arch):
    if arch not in _baselines:
        _baselines[arch] = run_distributed(_train, 1, COMMON + ARCH[arch])[0]
    return _baselines[arch]


LAYOUTS = [
    # (id, world size, arch, flags)
    ("tp2-recompute", 2, "llama", ["--tensor-model-parallel-size", "2", "--recompute-granularity", "selective",
                                   "--recompute-modules", "layernorm", "mlp_act"]),
    ("tp2-sp-recompute", 2, "gpt2", ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                     "--recompute-granularity", "selective", "--recompute-modules", "layernorm",
                                     "mlp_act"]),
    ("pp2", 2, "gpt2", ["--pipeline-model-parallel-size", "2"]),
    ("dp2", 2, "llama", []),
    ("dp2-distopt", 2, "gpt2", ["--use-distributed-optimizer"]),
    ("tp2-pp2-dp2", 8, "llama", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    ("tp2-pp2-dp2-distopt-sp", 8, "gpt2", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                                            "2", "--use-distributed-optimizer", "--sequence-parallel"]),
]


@pytest.mark.parametrize("layout,world,arch,flags", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_parallel_run_matches_single_process(layout, world, arch, flags):
    base = _baseline(arch)
    results = run_distributed(_train, world, COMMON + ARCH[arch] + flags)
    for r in results:   # every rank reports the same, global loss
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(base["losses"]), rtol=1e-5, atol=0)
        assert r["lrs"] == base["lrs"]
    got, want = _global_params(results), _global_params([base])
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
