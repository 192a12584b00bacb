"""FP8 against bf16 on a learnable task: the loss curves of the same model, data and seed.

A Llama-style model of a few hundred million parameters (16 layers, hidden 1280, SwiGLU 3456,
GQA 20 heads in 4 groups, RMSNorm, RoPE, sequence 1024, micro and global batch 8) trains on the
corpus that ships with megatron_lite (Python docstrings, byte-level tokens) for --iters
iterations, once per precision:

    bf16             --bf16
    fp8_delayed      --bf16 --fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max
                     (the FP8 settings of Megatron-LM's train_llama3_8b_h100_fp8.sh)
    fp8_tensorwise   --bf16 --fp8-format hybrid --fp8-recipe tensorwise

Each logged loss is the mean over --log-interval iterations, as pretrain_gpt.py logs it. The
report gives, for each FP8 run, the largest relative difference to bf16 over the logged
iterations and the difference of the last one; fp8_accuracy.json (and fp8_accuracy.png when
matplotlib imports) go to $OUT when it is set.

    python bench/fp8_accuracy.py [--iters 400] [--log-interval 10] [--only bf16,fp8_delayed]
    python bench/fp8_accuracy.py --tiny        # 2 small layers, a few iterations, runs on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_lite.arguments import parse_args as parse_megatron_args  # noqa: E402
from megatron_lite.training import pretrain  # noqa: E402

MODEL = ["--num-layers", "16", "--hidden-size", "1280", "--num-attention-heads", "20", "--group-query-attention",
         "--num-query-groups", "4", "--ffn-hidden-size", "3456", "--seq-length", "1024",
         "--max-position-embeddings", "1024", "--micro-batch-size", "8", "--global-batch-size", "8"]
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
        "--num-query-groups", "2", "--ffn-hidden-size", "128", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "2"]
COMMON = ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear",
          "--untie-embeddings-and-output-weights", "--hidden-dropout", "0", "--attention-dropout", "0",
          "--bf16", "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine", "--weight-decay", "0.1",
          "--adam-beta2", "0.95", "--clip-grad", "1.0", "--seed", "1234", "--eval-interval", "0",
          "--cross-entropy-loss-fusion"]
PRECISIONS = {
    "bf16": [],
    "fp8_delayed": ["--fp8-format", "hybrid", "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max"],
    "fp8_tensorwise": ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"],
}


def logged(losses, interval):
    """pretrain_gpt.py's logged losses: (last iteration of each window, mean over the window)."""
    return [(i + interval, sum(losses[i:i + interval]) / interval) for i in range(0, len(losses) - interval + 1,
                                                                                 interval)]


def train(flags):
    t0 = time.time()
    run = pretrain(parse_megatron_args(flags))
    losses = [h["lm loss"] for h in run.history]
    params = sum(p.numel() for p in run.module.parameters())
    del run
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return losses, params, time.time() - t0


def compare(curve, base):
    rel = [abs(c - b) / b for (_, c), (_, b) in zip(curve, base)]
    return {"max_rel_diff": max(rel), "final_rel_diff": rel[-1], "worst_iteration": curve[rel.index(max(rel))][0]}


def plot(curves, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        ax.plot([i for i, _ in points], [v for _, v in points], label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=None, help="iterations per run (400; 20 with --tiny)")
    p.add_argument("--log-interval", type=int, default=None, help="iterations per logged loss (10; 5 with --tiny)")
    p.add_argument("--only", default=",".join(PRECISIONS), help=f"comma list of {', '.join(PRECISIONS)}")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    iters = args.iters or (20 if args.tiny else 400)
    interval = args.log_interval or (5 if args.tiny else 10)
    chosen = [c for c in PRECISIONS if c in args.only.split(",")]
    if "bf16" not in chosen:
        p.error("--only must include bf16, the curve the others are compared with")
    model = TINY if args.tiny else MODEL
    results, curves = {}, {}
    for name in chosen:
        flags = model + COMMON + PRECISIONS[name] + ["--train-iters", str(iters), "--lr-warmup-iters",
                                                      str(max(1, iters // 20)), "--log-interval", str(interval)]
        losses, params, seconds = train(flags)
        curves[name] = logged(losses, interval)
        results[name] = {"flags": flags, "losses": losses, "logged": curves[name], "params": params,
                         "seconds": seconds}
        print(f"{name}: {params / 1e6:.1f}M parameters, {iters} iterations in {seconds:.1f} s, "
              f"loss {curves[name][0][1]:.4f} -> {curves[name][-1][1]:.4f}", flush=True)
    summary = {name: compare(curves[name], curves["bf16"]) for name in chosen if name != "bf16"}
    for name, s in summary.items():
        print(f"{name} vs bf16: largest relative difference {100 * s['max_rel_diff']:.3f} % (iteration "
              f"{s['worst_iteration']}), at the end {100 * s['final_rel_diff']:.3f} %", flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "fp8_accuracy.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "iterations": iters, "log_interval": interval, "runs": results, "summary": summary}, f)
        png = plot(curves, os.path.join(out, "fp8_accuracy.png"))
        print(f"wrote {out}/fp8_accuracy.json" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
