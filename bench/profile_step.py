"""Where a training step's GPU time and memory go: torch.profiler over the candidates of
bench/train_throughput.py (same model, batches and builders), kernel times summed by category.

For each candidate: memory allocated once it is built and warmed up (weights, gradient
buffers, optimizer state: what stays between steps), the peak during a step, the GPU time of
one step (sum of kernel times, averaged over --steps profiled steps) split into categories
(matmul, attention, norm, optimizer, copy/cast, elementwise, reduction, communication, other),
the --top kernels by time, and the gaps in which the GPU waited for the host.

    python bench/profile_step.py [--only megatron_lite,torch_compile] [--steps 3] [--top 25]
                                 [--megatron-lite-flags "..."]

Writes profile_step.json to $OUT when OUT is set.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shlex
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import (REFERENCE, TINY, bench_device, format_table, megatron_lite_flags,  # noqa: E402
                          mock_batches, reset_memory, synchronize, write_json)
from bench.train_throughput import BUILDERS, CANDIDATES, NUM_BATCHES, Context  # noqa: E402

# first match wins; names are CUDA kernel names as the profiler reports them
CATEGORIES = [
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("matmul", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|splitK"),
    ("communication", r"nccl"),
    ("optimizer", r"adam|Adam|multi_tensor_apply|fused_adam"),
    ("norm", r"norm|rms"),
    ("copy/cast", r"copy|Memcpy|Memset|cat_|CatArray|to_copy|convert"),
    ("reduction", r"reduce|Reduce|sum_|norm_kernel|max_"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_poi|pointwise|swiglu|gelu|rotary|softmax|cross_entropy"),
]


def category(kernel: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, kernel):
            return name
    return "other"


def idle_gaps(prof, steps: int, shown: int = 12, threshold_us: float = 20.0) -> dict:
    """Where the GPU waits for the host: gaps of more than `threshold_us` between one kernel's
    end and the next kernel's start (kernels of the one stream, in time order), their total per
    step, and the largest ones with the kernels on either side."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and "#" not in e.name)
    gaps, busy_until, before = [], None, ""
    for begin, end, kernel in spans:
        if busy_until is not None and begin - busy_until > threshold_us:
            gaps.append((begin - busy_until, before, kernel))
        if busy_until is None or end > busy_until:
            busy_until, before = end, kernel
    gaps.sort(key=lambda g: -g[0])
    return {"ms_per_step": sum(g[0] for g in gaps) / 1000.0 / steps, "count_per_step": len(gaps) / steps,
            "largest": [{"us": g[0], "after": g[1][:70], "before": g[2][:70]} for g in gaps[:shown]]}


def profile(name: str, ctx: Context, steps: int, top: int) -> dict:
    reset_memory(ctx.device)
    built = BUILDERS[name](ctx)
    try:
        for _ in range(ctx.warmup):
            built.step()
        synchronize(ctx.device)
        resident = torch.cuda.memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else 0.0
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if ctx.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                built.step()
            synchronize(ctx.device)
            wall_ms = 1000.0 * (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else 0.0
        kernels: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0])
        for event in prof.events():
            # "#" names are annotations over kernels (Optimizer.step#AdamW.step), not kernels
            if event.device_type == torch.autograd.DeviceType.CUDA and "#" not in event.name:
                entry = kernels[event.name]
                entry[0] += event.device_time_total / 1000.0 / steps     # ms per step
                entry[1] += 1
        by_category: Dict[str, float] = collections.defaultdict(float)
        for kernel, (ms, _) in kernels.items():
            by_category[category(kernel)] += ms
        ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
        return {"name": name, "resident_gib": resident, "peak_gib": peak, "wall_ms_per_step": wall_ms,
                "idle": idle_gaps(prof, steps),
                "gpu_ms_per_step": sum(v[0] for v in kernels.values()),
                "categories": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
                "top": [{"kernel": k, "ms": v[0], "calls_per_step": v[1] / steps, "category": category(k)}
                        for k, v in ranked], "detail": built.detail}
    finally:
        built.cleanup()
        del built
        reset_memory(ctx.device)


def report(r: dict) -> str:
    idle = r["idle"]
    lines = [f"=== {r['name']}: {r['gpu_ms_per_step']:.2f} GPU ms per step (kernel time; wall {r['wall_ms_per_step']:.1f} "
             f"ms under the profiler), resident {r['resident_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB  {r['detail']}",
             f"GPU idle between kernels: {idle['ms_per_step']:.2f} ms per step in {idle['count_per_step']:.0f} gaps "
             f"over 20 us; largest:"]
    lines += [f"  {g['us']:8.0f} us  after {g['after']}  before {g['before']}" for g in idle["largest"]]
    lines.append(format_table(["category", "ms/step", "%"],
                              [[c, f"{ms:.2f}", f"{100 * ms / max(r['gpu_ms_per_step'], 1e-9):.1f}"]
                               for c, ms in r["categories"].items()]))
    lines.append(format_table(["kernel", "ms/step", "calls", "category"],
                              [[t["kernel"][:110], f"{t['ms']:.3f}", f"{t['calls_per_step']:.0f}", t["category"]]
                               for t in r["top"]]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="megatron_lite,torch_compile")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--megatron-lite-flags", default="")
    args = p.parse_args(argv)
    chosen = [c for c in args.only.split(",") if c]
    if set(chosen) - set(CANDIDATES):
        p.error(f"--only: choose from {', '.join(CANDIDATES)}")
    dims = TINY if args.tiny else REFERENCE
    device = bench_device()
    flags = megatron_lite_flags(dims, train_iters=args.warmup + args.steps + 1, clip_grad=1.0,
                                extra=shlex.split(args.megatron_lite_flags))
    ctx = Context(dims=dims, device=device, batches=mock_batches(dims, NUM_BATCHES, device), warmup=args.warmup,
                  steps=args.steps, clip_grad=1.0, compile_mode=None, compile_backend="inductor",
                  megatron_lite_flags=flags)
    results = []
    for name in chosen:
        results.append(profile(name, ctx, args.steps, args.top))
        print(report(results[-1]), flush=True)
        write_json("profile_step.json", {"flags": flags, "candidates": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
