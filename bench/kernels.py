"""Time megatron_lite's fused CUDA kernels against plain torch, torch.compile and Liger-Kernel.

Shapes are Llama-7B-like: 8192 tokens (4 x 2048, or 2 x 4096 for rotary), hidden 4096, ffn
11008, vocabulary 32000, 32 heads of 128, bf16. For each op and each implementation the
forward and the forward+backward are timed with CUDA events (median of --iters after
--warmup runs). Bandwidth counts each input read once and each output written once
(forward: inputs + outputs; backward adds the output gradient, the inputs it re-reads and the
input gradients) and is compared with a device-to-device copy measured in the same run
(bytes read + written). "torch" is megatron_lite's torch path (megatron_lite/ops/torch_ops.py),
"compile" is torch.compile of that same function, "liger" is Liger-Kernel when importable.
"ours[vN]" is megatron_lite with launch variant N of the op's kernel that has several (the
entry point is named in the JSON; megatron_lite/ops/cuda_ops.py DEFAULT_VARIANTS is "ours").

Each figure is taken twice: "eager", Python calling the op as a model does, so a small op's
time can be the host's (autograd and launch overhead) rather than the GPU's; and "graph", the
same calls captured once in a CUDA graph and replayed, which leaves the GPU time of the kernels
and the gaps between them.

    python bench/kernels.py [--iters 20] [--warmup 5] [--no-compile] [--no-graph]

Prints a table; writes kernels_bench.json to $OUT when that is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_lite.ops import torch_ops  # noqa: E402
from megatron_lite.ops.cuda_build import load_extension  # noqa: E402
from megatron_lite.ops.cuda_ops import VARIANT_COUNTS, CudaOps  # noqa: E402

TOKENS, HIDDEN, FFN, VOCAB, HEADS, HEAD_DIM = 8192, 4096, 11008, 32000, 32, 128
DTYPE = torch.bfloat16


def time_ms(fn: Callable[[], object], warmup: int, iters: int, reps: int = 10) -> float:
    """Median milliseconds of one fn() call, by CUDA events around `reps` back-to-back calls
    (so the host's launch time overlaps the previous call's kernels instead of being counted),
    over `iters` such groups after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def time_graph_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """time_ms of replaying a CUDA graph of one fn() call (captured after warm-up on a side
    stream, as capture requires), so the host's Python and launch time is not counted."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = time_ms(graph.replay, warmup, iters)
    del graph
    return ms


def copy_bandwidth(warmup: int, iters: int) -> float:
    """Device-to-device copy of 1 GiB, GB/s counting bytes read and written."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup, iters)
    return 2 * src.numel() / ms / 1e6


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Case:
    name: str
    args: list                     # call arguments; tensors at `diff` get gradients in fwd+bwd
    diff: List[int]
    fwd_bytes: int
    bwd_bytes: int
    impls: Dict[str, Callable] = field(default_factory=dict)
    method: str = ""               # the CudaOps method timed as "ours"
    variant_of: Optional[str] = None  # its kernel entry point with launch variants, if any


def randn(*shape, dtype=DTYPE, scale=1.0):
    return (scale * torch.randn(*shape, device="cuda")).to(dtype)


def liger_functions():
    try:
        from liger_kernel.transformers import functional as lf
    except Exception as e:  # absent, or built for another triton: the column is left out
        print(f"Liger-Kernel not used ({type(e).__name__}: {e})", flush=True)
        return None
    return lf


def build_cases(ours: CudaOps) -> List[Case]:
    lf = liger_functions()
    cases = []

    x, w, b = randn(TOKENS, HIDDEN), randn(HIDDEN) + 1, randn(HIDDEN)
    y = x
    cases.append(Case("rms_norm", [x, w, 1e-5], [0, 1], nbytes(x, w, y), nbytes(y, x, w, x, w),
                      {"ours": ours.rms_norm, "torch": torch_ops.rms_norm}, "rms_norm", "norm_bwd"))
    if lf:
        cases[-1].impls["liger"] = lambda x, w, eps: lf.liger_rms_norm(x, w, eps, in_place=False)
    cases.append(Case("layer_norm", [x, w, b, 1e-5], [0, 1, 2], nbytes(x, w, b, y), nbytes(y, x, w, x, w, b),
                      {"ours": ours.layer_norm, "torch": torch_ops.layer_norm}, "layer_norm", "norm_bwd"))
    if lf:
        cases[-1].impls["liger"] = lf.liger_layer_norm

    gate_up = randn(TOKENS, 2 * FFN)
    act = randn(TOKENS, FFN)
    cases.append(Case("swiglu", [gate_up], [0], nbytes(gate_up, act), nbytes(act, gate_up, gate_up),
                      {"ours": ours.swiglu, "torch": torch_ops.swiglu}, "swiglu", "swiglu_fwd"))
    if lf:
        cases[-1].impls["liger"] = lambda x: lf.liger_swiglu(*x.chunk(2, dim=-1))

    fc1, fc1_bias = randn(TOKENS, FFN), randn(FFN)
    cases.append(Case("bias_gelu", [fc1, fc1_bias], [0, 1], nbytes(fc1, fc1_bias, fc1),
                      nbytes(fc1, fc1, fc1_bias, fc1, fc1_bias),
                      {"ours": ours.bias_gelu, "torch": torch_ops.bias_gelu}, "bias_gelu", "bias_gelu_fwd"))

    seq, batch = 4096, TOKENS // 4096
    q = randn(seq, batch, HEADS, HEAD_DIM)
    angles = torch.rand(seq, 1, 1, HEAD_DIM // 2, device="cuda") * 2 * math.pi
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    cases.append(Case("rotary", [q, cos, sin], [0], nbytes(q, cos, sin, q), nbytes(q, cos, sin, q),
                      {"ours": ours.rotary, "torch": torch_ops.rotary}, "rotary", "rotary"))

    b_attn, s_attn = TOKENS // 2048, 2048
    scores = randn(b_attn, HEADS, s_attn, s_attn, scale=3.0)
    mask = torch.rand(b_attn, 1, s_attn, s_attn, device="cuda") > 0.9
    scale = 1 / math.sqrt(HEAD_DIM)
    cases.append(Case("masked_softmax", [scores, mask, scale], [0], nbytes(scores, mask, scores),
                      nbytes(scores, scores, mask, scores),
                      {"ours": ours.scaled_masked_softmax, "torch": torch_ops.scaled_masked_softmax},
                      "scaled_masked_softmax"))
    cases.append(Case("causal_softmax", [scores, scale], [0], nbytes(scores, scores), nbytes(scores, scores, scores),
                      {"ours": ours.scaled_upper_triang_softmax, "torch": torch_ops.scaled_upper_triang_softmax},
                      "scaled_upper_triang_softmax"))

    logits = randn(TOKENS, 1, VOCAB, scale=4.0)
    target = torch.randint(0, VOCAB, (TOKENS, 1), device="cuda")
    loss = torch.empty(TOKENS, 1, dtype=torch.float32, device="cuda")
    cases.append(Case("cross_entropy", [logits, target, 0, None], [0], nbytes(logits, target, loss),
                      nbytes(loss, logits, target, logits),
                      {"ours": ours.vocab_parallel_cross_entropy, "torch": torch_ops.vocab_parallel_cross_entropy},
                      "vocab_parallel_cross_entropy", "xent_fwd"))
    if lf:
        cases[-1].impls["liger"] = lambda x, t, start, group: lf.liger_cross_entropy(
            x.view(-1, x.shape[-1]), t.view(-1), reduction="none")
    return cases


def measure(case: Case, fn: Callable, warmup: int, iters: int, graph: bool) -> Dict[str, float]:
    def forward():
        with torch.no_grad():
            return fn(*case.args)

    leaves = [a.detach().requires_grad_() if i in case.diff else a for i, a in enumerate(case.args)]
    grad_out = None

    def forward_backward():
        nonlocal grad_out
        out = fn(*leaves)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        torch.autograd.grad(out, [leaves[i] for i in case.diff], grad_out)

    r = {"fwd_ms": time_ms(forward, warmup, iters), "fwd_bwd_ms": time_ms(forward_backward, warmup, iters)}
    if graph:
        try:
            r.update(graph_fwd_ms=time_graph_ms(forward, warmup, iters),
                     graph_fwd_bwd_ms=time_graph_ms(forward_backward, warmup, iters))
        except Exception as e:  # an implementation that cannot be captured keeps its eager figures
            print(f"{case.name:<16}graph capture failed: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
    return r


def percent(case: Case, r: Dict[str, float], key: str, copy_gbs: float) -> float:
    """% of copy bandwidth of the timing r[key] (a forward or a forward+backward figure)."""
    moved = case.fwd_bytes + (case.bwd_bytes if "bwd" in key else 0)
    return 100 * moved / r[key] / 1e6 / copy_gbs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph (GPU time) figures")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")

    device = torch.device("cuda")
    ext = load_extension(device)
    ours = CudaOps(ext)
    copy_gbs = copy_bandwidth(args.warmup, args.iters)
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | copy bandwidth {copy_gbs:.0f} GB/s",
          flush=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gbs": copy_gbs,
               "dtype": str(DTYPE), "ops": {}}
    keys = ["fwd_ms", "fwd_bwd_ms"] + ([] if args.no_graph else ["graph_fwd_ms", "graph_fwd_bwd_ms"])
    header = f"{'op':<16}{'impl':<10}" + "".join(f"{k[:-3].replace('_', ' '):>17}{'%copy':>6}" for k in keys)
    print(header + "   (ms)")
    print("-" * len(header))
    for case in build_cases(ours):
        impls = {"ours": case.impls["ours"]}
        for v in range(1, VARIANT_COUNTS.get(case.variant_of, 1)):
            impls[f"ours[v{v}]"] = getattr(CudaOps(ext, {case.variant_of: v}), case.method)
        impls["torch"] = case.impls["torch"]
        if not args.no_compile:
            impls["compile"] = torch.compile(case.impls["torch"], dynamic=False)
        if "liger" in case.impls:  # last: its cross entropy writes gradients into the logits
            impls["liger"] = case.impls["liger"]
        op_results = {}
        for name, fn in impls.items():
            try:
                r = measure(case, fn, args.warmup, args.iters, graph=not args.no_graph)
            except Exception as e:  # one failing column (e.g. a compile error) should not lose the rest
                print(f"{case.name:<16}{name:<10} failed: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
                continue
            for key in [k for k in keys if k in r]:
                r[key.replace("_ms", "_frac_copy")] = percent(case, r, key, copy_gbs) / 100
            op_results[name] = r
            print(f"{case.name:<16}{name:<10}" + "".join(
                f"{r[k]:>17.3f}{percent(case, r, k, copy_gbs):>5.0f}%" if k in r else f"{'-':>17}{'-':>6}"
                for k in keys), flush=True)
        if "ours" in op_results and "compile" in op_results:
            ours_r, compile_r = op_results["ours"], op_results["compile"]
            op_results["speedup_vs_compile"] = {
                k[:-3]: compile_r[k] / ours_r[k] for k in keys if k in ours_r and k in compile_r}
        results["ops"][case.name] = {"fwd_bytes": case.fwd_bytes, "bwd_bytes": case.bwd_bytes,
                                     "variants_of": case.variant_of, **op_results}
        write_json(results)  # after every op, so a run cut short still leaves what it measured
        torch.cuda.empty_cache()
    return results


def write_json(results: dict) -> None:
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "kernels_bench.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
