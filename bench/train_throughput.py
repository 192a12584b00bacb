"""Training throughput of megatron_lite against plain PyTorch and Megatron-Core, one GPU, one process.

Every candidate trains the reference model of bench/common.py (issue 7: 16 layers, hidden 2048,
16 heads in 8 query groups, SwiGLU 5632, RMSNorm, RoPE, untied, no biases, vocabulary 32000,
sequence 2048, micro batch 4, bf16) on the same mock microbatches, already on the GPU. One step
is forward + cross entropy + backward + gradient clipping to --clip-grad (1.0, Megatron's
default; 0 turns it off everywhere) + an AdamW update:

    megatron_lite   pretrain_gpt.py's own step: parse_args -> setup_parallel -> build_run, then
                    megatron_lite.training.queue_train_step, each step's numbers read once the
                    next step is queued, as the training loop does (bf16 weights; fp32 main
                    grads, main params and Adam moments)
    torch_eager     PlainGPT below: bf16 parameters, SDPA (causal, GQA), fused torch AdamW
    torch_compile   the same module under torch.compile (forward and loss; backward through AOT
                    autograd); the optimizer step stays eager
    torchao_float8  torch_compile with torchao's convert_to_float8_training (tensorwise scaling) on
                    every linear but the output layer, as torchtitan trains in FP8; a 'skipped' row
                    when torchao does not import
    megatron_core   Megatron-Core's GPTModel with get_gpt_layer_local_spec() (no Transformer
                    Engine or apex), bf16 parameters and the plain baseline's AdamW step; a
                    'skipped' row, with the reason, when megatron.core does not import or run

Tokens/s counts micro_batch x seq_length tokens per step over --steps timed steps after
--warmup untimed ones (the compiled candidate compiles during warm-up). MFU is defined in
bench.common.model_flops_per_token. Peak memory is torch.cuda.max_memory_allocated of each
candidate alone (the previous one is freed and the counter reset).

    python bench/train_throughput.py [--steps 20] [--warmup 5] [--only megatron_lite,torch_compile]
                                     [--compile-mode max-autotune-no-cudagraphs] [--clip-grad 1.0]
                                     [--megatron-lite-flags "--overlap-grad-reduce ..."]
                                     [--megatron-lite-variant "LABEL=more flags" ...]
    python bench/train_throughput.py --tiny      # 2-layer model, a few steps, runs on a CPU

Each --megatron-lite-variant adds a row megatron_lite[LABEL] (megatron_lite's flags plus its
own), measured right after megatron_lite in the same process, with its own ratios table: a
configuration compared with the baselines and with megatron_lite on the same GPU and clocks.

Prints a table and the ratios megatron_lite / each baseline; writes train_throughput.json to
$OUT when OUT is set. Exits 1 when megatron_lite or a plain-PyTorch candidate failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import shlex
import socket
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import (BETAS, LR, REFERENCE, SEED, TINY, WEIGHT_DECAY, ModelDims,  # noqa: E402
                          bench_device, build_megatron_lite_run, environment, format_number, format_table,
                          megatron_lite_flags, mock_batches, model_flops_per_token, param_counts,
                          peak_matmul_flops, peak_memory_gib, reset_memory, time_steps, write_json)

CANDIDATES = ("megatron_lite", "torch_eager", "torch_compile", "torchao_float8", "megatron_core")
OPTIONAL = ("megatron_core", "torchao_float8")      # a failure here is a 'skipped' row, not a failed benchmark
NUM_BATCHES = 4                    # distinct microbatches, cycled


# ------------------------------------------------------------------ the plain-PyTorch baseline

def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on non-interleaved halves (as megatron_lite and Hugging Face Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class PlainAttention(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.heads, self.groups, self.head_dim = d.num_attention_heads, d.num_query_groups, d.head_dim
        self.qkv = nn.Linear(d.hidden_size, (self.heads + 2 * self.groups) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.heads * self.head_dim, d.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.heads * hd, self.groups * hd, self.groups * hd], dim=-1)
        q = apply_rope(q.view(b, s, self.heads, hd).transpose(1, 2), cos, sin)    # (b, nh, s, hd)
        k = apply_rope(k.view(b, s, self.groups, hd).transpose(1, 2), cos, sin)   # (b, ng, s, hd)
        v = v.view(b, s, self.groups, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, self.heads * hd))


class PlainMLP(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.fc1 = nn.Linear(d.hidden_size, 2 * d.ffn_hidden_size, bias=False)   # [gate; up]
        self.fc2 = nn.Linear(d.ffn_hidden_size, d.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * up)


class PlainBlock(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.attention_norm = nn.RMSNorm(d.hidden_size, eps=1e-5)
        self.attention = PlainAttention(d)
        self.mlp_norm = nn.RMSNorm(d.hidden_size, eps=1e-5)
        self.mlp = PlainMLP(d)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class PlainGPT(nn.Module):
    """The reference architecture in plain PyTorch; forward returns the mean loss over loss_mask
    (cross entropy in fp32, as megatron_lite computes it)."""

    def __init__(self, d: ModelDims):
        super().__init__()
        self.embedding = nn.Embedding(d.vocab_size, d.hidden_size)
        self.layers = nn.ModuleList(PlainBlock(d) for _ in range(d.num_layers))
        self.norm = nn.RMSNorm(d.hidden_size, eps=1e-5)
        self.output = nn.Linear(d.hidden_size, d.vocab_size, bias=False)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, d.head_dim, 2, dtype=torch.float32) / d.head_dim)
        freqs = torch.outer(torch.arange(d.seq_length, dtype=torch.float32), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)                                # (s, hd)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, labels, loss_mask):
        x = self.embedding(tokens)                                                 # (b, s, h)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        logits = self.output(self.norm(x))                                         # (b, s, V)
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        mask = loss_mask.flatten()
        return (losses * mask).sum() / mask.sum()


# ------------------------------------------------------------------------------ candidates

class Skip(Exception):
    """The candidate cannot run here; reported as a 'skipped' row with this message."""


@dataclass
class Context:
    dims: ModelDims
    device: torch.device
    batches: List[dict]
    warmup: int
    steps: int
    clip_grad: float
    compile_mode: Optional[str]
    compile_backend: str
    megatron_lite_flags: List[str]    # the complete pretrain_gpt.py command line


@dataclass
class Built:
    step: Callable[[], object]        # one training step; returns the loss (tensor or float)
    params: int
    detail: str = ""
    cleanup: Callable[[], None] = lambda: None


def build_megatron_lite(ctx: Context) -> Built:
    from megatron_lite.training import queue_train_step

    run = build_megatron_lite_run(ctx.megatron_lite_flags)
    batches = itertools.cycle(ctx.batches)
    pending = []
    local = None
    if run.cfg.checkpoint.local_ckpt_interval:   # in-memory snapshots, as the loop takes them
        from megatron_lite.checkpoint.local import LocalCheckpoints

        local = LocalCheckpoints(run.cfg, run.state)

    def step():
        # as megatron_lite.training.train does: a step's numbers are read once the next is queued
        values = queue_train_step(run, batches)
        loss = pending.pop().read()["lm loss"] if pending else None
        pending.append(values)
        run.progress.iteration += 1
        if local is not None and local.due(run.progress.iteration):
            loss = pending.pop().read()["lm loss"]   # a snapshot is taken once its step is known finite
            local.wait_settled()
            local.snapshot(run)
        return loss

    return Built(step=step, params=sum(p.numel() for p in run.module.parameters()), detail=run.ops.describe(),
                 cleanup=local.discard if local is not None else (lambda: None))


def adamw_step(params: List[torch.nn.Parameter], device: torch.device, clip_grad: float) -> Callable[[], None]:
    """The baselines' optimizer step: clip the global norm (no host sync), fused AdamW, zero grads."""
    kwargs = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, **kwargs)

    def step() -> None:
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build_torch(ctx: Context, compiled: bool, float8: bool = False) -> Built:
    with torch.device(ctx.device):
        model = PlainGPT(ctx.dims).to(torch.bfloat16)
    params = list(model.parameters())
    optimizer_step = adamw_step(params, ctx.device, ctx.clip_grad)
    detail = ""
    if float8:   # torchtitan's recipe: every linear but the output layer, tensorwise scaling
        try:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        except ImportError as e:
            raise Skip(f"torchao does not import ({e})") from None
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                                   module_filter_fn=lambda module, fqn: fqn != "output")
        detail = "torchao float8 (tensorwise), "
    forward = model
    if compiled:
        kwargs = {"mode": ctx.compile_mode} if ctx.compile_mode else {}
        forward = torch.compile(model, backend=ctx.compile_backend, **kwargs)
        detail += f"torch.compile(backend={ctx.compile_backend}, mode={ctx.compile_mode or 'default'})"
    batches = itertools.cycle(ctx.batches)

    def step():
        b = next(batches)
        loss = forward(b["tokens"], b["labels"], b["loss_mask"])
        loss.backward()
        optimizer_step()
        return loss.detach()

    def cleanup():
        if compiled:
            torch._dynamo.reset()

    return Built(step=step, params=sum(p.numel() for p in params), detail=detail, cleanup=cleanup)


def _init_single_process_group(device: torch.device) -> None:
    """A one-rank default process group on a free local port (Megatron-Core needs one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def _known_fields(cls, values: dict) -> Tuple[dict, List[str]]:
    """The entries of `values` that the dataclass `cls` has, and the names it lacks (other versions)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}, sorted(set(values) - names)


def build_megatron_core(ctx: Context) -> Built:
    try:
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        from megatron.core.transformer.transformer_config import TransformerConfig
    except ImportError as e:
        raise Skip(f"megatron.core does not import ({type(e).__name__}: {e}); carry .whl/megatron_core-*.whl "
                   f"and put it on PYTHONPATH (scripts/gpu_bench.sh does)") from e
    try:
        from megatron.core.package_info import __version__ as version
    except ImportError:
        version = "unknown version"
    d, device = ctx.dims, ctx.device
    _init_single_process_group(device)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    if device.type == "cuda":
        model_parallel_cuda_manual_seed(SEED)
    config_values, unknown = _known_fields(TransformerConfig, dict(
        num_layers=d.num_layers, hidden_size=d.hidden_size, num_attention_heads=d.num_attention_heads,
        num_query_groups=d.num_query_groups, ffn_hidden_size=d.ffn_hidden_size, kv_channels=d.head_dim,
        hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm", layernorm_epsilon=1e-5,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, init_method_std=0.02,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False,
        # the fused paths need apex or Transformer Engine, which the local spec runs without
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=device.type == "cpu"))
    config = TransformerConfig(**config_values)
    try:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    except TypeError:   # releases whose local spec has no normalization argument
        spec = get_gpt_layer_local_spec()
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=d.vocab_size,
                     max_sequence_length=d.seq_length, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope", parallel_output=True).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_step = adamw_step(params, device, ctx.clip_grad)
    causal = torch.ones(1, 1, d.seq_length, d.seq_length, dtype=torch.bool, device=device).triu(1)  # True = masked
    batches = itertools.cycle(ctx.batches)

    def step():
        b = next(batches)
        losses = model(b["tokens"], b["position_ids"], causal, labels=b["labels"])    # (b, s)
        loss = (losses.float() * b["loss_mask"]).sum() / b["loss_mask"].sum()
        loss.backward()
        optimizer_step()
        return loss.detach()

    def cleanup():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()

    detail = f"megatron-core {version}, local spec, torch AdamW"
    if unknown:
        detail += f"; TransformerConfig of this version has no {unknown}"
    return Built(step=step, params=sum(p.numel() for p in params), detail=detail, cleanup=cleanup)


BUILDERS: Dict[str, Callable[[Context], Built]] = {
    "megatron_lite": build_megatron_lite,
    "torch_eager": lambda ctx: build_torch(ctx, compiled=False),
    "torch_compile": lambda ctx: build_torch(ctx, compiled=True),
    "torchao_float8": lambda ctx: build_torch(ctx, compiled=True, float8=True),
    "megatron_core": build_megatron_core,
}


def measure(name: str, ctx: Context, flops_per_token: float, peak_flops: float) -> dict:
    """Build, warm up, time and free one candidate; its row (status ok / skipped / failed)."""
    reset_memory(ctx.device)
    built = None
    try:
        built = BUILDERS[name](ctx)
        seconds = time_steps(built.step, ctx.warmup, ctx.steps, ctx.device)
        loss = float(built.step())
        tokens_per_s = ctx.steps * ctx.dims.tokens_per_step / seconds
        row = {"name": name, "status": "ok", "tokens_per_s": tokens_per_s,
               "mfu": tokens_per_s * flops_per_token / peak_flops, "peak_memory_gib": peak_memory_gib(ctx.device),
               "step_ms": 1000.0 * seconds / ctx.steps, "params": built.params, "loss": loss, "detail": built.detail}
        if not math.isfinite(loss):
            row.update(status="failed", reason=f"loss is {loss}")
    except Skip as e:
        row = {"name": name, "status": "skipped", "reason": str(e)}
    except Exception as e:  # one candidate's failure must not hide the others' numbers
        traceback.print_exc()
        reason = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        row = {"name": name, "status": "skipped" if name in OPTIONAL else "failed", "reason": reason}
    finally:
        if built is not None:
            built.cleanup()
        del built
        reset_memory(ctx.device)
    return row


def ratios(rows: List[dict], ours_name: str = "megatron_lite") -> Dict[str, dict]:
    """megatron_lite (or one of its variant rows) / each baseline that ran: tokens/s and peak memory."""
    by_name = {r["name"]: r for r in rows if r["status"] == "ok"}
    ours = by_name.get(ours_name)
    if ours is None:
        return {}
    return {name: {"tokens_per_s": ours["tokens_per_s"] / r["tokens_per_s"],
                   "peak_memory": ours["peak_memory_gib"] / r["peak_memory_gib"]}
            for name, r in by_name.items() if not name.startswith("megatron_lite")}


def variant_ratios(rows: List[dict]) -> Dict[str, Dict[str, dict]]:
    """The ratios of each megatron_lite[LABEL] row, by row name."""
    return {r["name"]: ratios(rows, r["name"]) for r in rows
            if r["name"].startswith("megatron_lite[") and r["status"] == "ok"}


def report(rows: List[dict], rel: Dict[str, dict]) -> str:
    table = []
    for r in rows:
        if r["status"] == "ok":
            table.append([r["name"], format_number(r["tokens_per_s"], 4), format_number(100 * r["mfu"]),
                          format_number(r["peak_memory_gib"]), format_number(r["step_ms"]),
                          format_number(r["params"] / 1e6, 4), f"{r['loss']:.4f}"])
        else:
            reason = r["reason"] if len(r["reason"]) <= 120 else r["reason"][:117] + "..."
            table.append([r["name"], f"{r['status']}: {reason}", "-", "-", "-", "-", "-"])
    text = format_table(["candidate", "tokens/s", "MFU %", "peak mem GiB", "step ms", "params M", "last loss"], table)
    if rel:
        text += "\n\n" + format_table(["megatron_lite vs", "tokens/s ratio", "peak memory ratio"],
                                      [[n, f"{v['tokens_per_s']:.2f}x", f"{v['peak_memory']:.2f}x"]
                                       for n, v in rel.items()])
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per candidate (20; 3 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (5; 2 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="the 2-layer model of bench/common.py (runs on a CPU)")
    p.add_argument("--only", default=",".join(CANDIDATES), help=f"comma list of {', '.join(CANDIDATES)}")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient clipping for every candidate (0: off)")
    p.add_argument("--megatron-lite-flags", default="",
                   help="more pretrain_gpt.py flags for megatron_lite, e.g. '--no-fused-kernels --overlap-grad-reduce'")
    p.add_argument("--megatron-lite-variant", action="append", default=[], metavar="LABEL=FLAGS",
                   help="one more megatron_lite row, 'megatron_lite[LABEL]', with FLAGS added to megatron_lite's "
                        "(repeatable), measured right after it in the same process, e.g. "
                        "'recompute=--recompute-granularity selective --recompute-modules layernorm'")
    p.add_argument("--peak-size", type=int, default=None, help="n of the n^3 bf16 matmul peak (8192; 256 with --tiny)")
    args = p.parse_args(argv)
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CANDIDATES))
    if unknown or not chosen:
        p.error(f"--only {args.only!r}: unknown candidates {unknown}; choose from {', '.join(CANDIDATES)}")
    args.megatron_lite_flags = shlex.split(args.megatron_lite_flags)
    variants = []
    for spec in args.megatron_lite_variant:
        label, sep, extra = spec.partition("=")
        if not sep or not label.strip() or not extra.strip():
            p.error(f"--megatron-lite-variant {spec!r}: give LABEL=FLAGS, e.g. 'bf16m=--exp-avg-dtype bf16'")
        variants.append((label.strip(), shlex.split(extra)))
    args.megatron_lite_variant = variants
    args.only = [c for c in CANDIDATES if c in chosen]   # fixed order: Megatron-Core's process group last
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 5)
    args.peak_size = args.peak_size or (256 if args.tiny else 8192)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dims = TINY if args.tiny else REFERENCE
    device = bench_device()
    env = environment(device)
    peak = peak_matmul_flops(device, args.peak_size)
    flops_per_token = model_flops_per_token(dims)
    counts = param_counts(dims)
    print(f"{env['date']} | {env['device']} | torch {env['torch']} (CUDA {env['cuda']})", flush=True)
    print(f"model {dataclasses.asdict(dims)}: {counts['total'] / 1e6:.1f}M parameters "
          f"({counts['non_embedding'] / 1e6:.1f}M non-embedding), {flops_per_token / 1e9:.2f} GFLOP per token",
          flush=True)
    print(f"bf16 {args.peak_size}^3 matmul peak: {peak / 1e12:.1f} TFLOP/s; {args.warmup} warm-up + {args.steps} timed "
          f"steps per candidate, clip-grad {args.clip_grad}", flush=True)
    flags = megatron_lite_flags(dims, train_iters=args.warmup + args.steps + 1, clip_grad=args.clip_grad,
                                extra=args.megatron_lite_flags)
    ctx = Context(dims=dims, device=device, batches=mock_batches(dims, NUM_BATCHES, device), warmup=args.warmup,
                  steps=args.steps, clip_grad=args.clip_grad, compile_mode=args.compile_mode,
                  compile_backend=args.compile_backend, megatron_lite_flags=flags)
    header = {"environment": env, "model": dataclasses.asdict(dims), "param_counts": counts,
              "model_flops_per_token": flops_per_token, "peak_matmul_flops": peak, "peak_matmul_size": args.peak_size,
              "steps": args.steps, "warmup": args.warmup, "clip_grad": args.clip_grad,
              "compile_mode": args.compile_mode, "compile_backend": args.compile_backend, "megatron_lite_flags": flags}
    runs = []   # (row name, builder name, context)
    for name in args.only:
        runs.append((name, name, ctx))
        if name == "megatron_lite":
            runs += [(f"megatron_lite[{label}]", name, dataclasses.replace(ctx, megatron_lite_flags=flags + extra))
                     for label, extra in args.megatron_lite_variant]
    header["megatron_lite_variants"] = {label: extra for label, extra in args.megatron_lite_variant}
    rows = []
    for name, builder, run_ctx in runs:
        print(f"--- {name}", flush=True)
        rows.append(dict(measure(builder, run_ctx, flops_per_token, peak), name=name))
        r = rows[-1]
        print(f"{name}: " + (f"{r['tokens_per_s']:.1f} tokens/s, peak {r['peak_memory_gib']:.2f} GiB"
                             if r["status"] == "ok" else f"{r['status']}: {r['reason']}"), flush=True)
        # after every candidate, so that a run stopped by a time limit keeps what it measured
        path = write_json("train_throughput.json", {**header, "candidates": rows, "ratios": ratios(rows),
                                                    "variant_ratios": variant_ratios(rows)})
    print("\n" + report(rows, ratios(rows)), flush=True)
    for label, rel in variant_ratios(rows).items():
        print("\n" + format_table([f"{label} vs", "tokens/s ratio", "peak memory ratio"],
                                  [[n, f"{v['tokens_per_s']:.2f}x", f"{v['peak_memory']:.2f}x"]
                                   for n, v in rel.items()]), flush=True)
    if path:
        print(f"wrote {path}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
