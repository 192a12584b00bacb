"""What the GPU benchmarks share: the reference model, megatron_lite runs built as pretrain_gpt.py
builds them, mock batches, timing, the MFU formula, tables and JSON output.

The reference configuration is issue 7's: 16 layers, hidden 2048, 16 heads in 8 query groups,
SwiGLU ffn 5632, RMSNorm, RoPE, untied embeddings, no biases, vocabulary 32000, sequence 2048,
micro batch 4, bf16, AdamW. `TINY` is the same architecture small enough for a CPU.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import resource
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch


@dataclass(frozen=True)
class ModelDims:
    """A Llama-style GPT: RMSNorm, RoPE, SwiGLU, grouped-query attention, untied, no biases."""
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int          # the tokenizer's vocabulary, already a multiple of 128 (no padding)
    seq_length: int
    micro_batch_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.seq_length


REFERENCE = ModelDims(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
                      ffn_hidden_size=5632, vocab_size=32000, seq_length=2048, micro_batch_size=4)
TINY = ModelDims(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=128, vocab_size=256, seq_length=64, micro_batch_size=2)

LR, BETAS, WEIGHT_DECAY, SEED = 3e-4, (0.9, 0.95), 0.1, 1234


def param_counts(d: ModelDims) -> Dict[str, int]:
    """Parameters of the model: total, and non-embedding = all but the input word-embedding table
    (a lookup, no matmul); the untied output layer is a matmul and counts as non-embedding."""
    qkv = d.hidden_size * (d.num_attention_heads + 2 * d.num_query_groups) * d.head_dim
    proj = d.num_attention_heads * d.head_dim * d.hidden_size
    mlp = d.hidden_size * 2 * d.ffn_hidden_size + d.ffn_hidden_size * d.hidden_size
    per_layer = qkv + proj + mlp + 2 * d.hidden_size
    embedding = d.vocab_size * d.hidden_size
    total = d.num_layers * per_layer + d.hidden_size + 2 * embedding
    return {"total": total, "non_embedding": total - embedding}


def model_flops_per_token(d: ModelDims) -> float:
    """Model FLOPs of one training token (forward + backward), the one formula behind every MFU here:

        6 * N + 12 * num_layers * (heads * head_dim) * seq_length

    N is the non-embedding parameter count of `param_counts` (every matmul weight, the output
    layer included; 2 FLOPs per weight forward, 4 backward). The second term is attention's
    two matmuls (QK^T and attention x V: 2 * 2 * s * h forward, x3 with backward) counted over
    the full s x s square although causal attention needs only half: the PaLM / Megatron
    convention, so numbers compare with theirs. Recomputation is not counted (model FLOPs,
    not hardware FLOPs). MFU = tokens/s * this / the peak bf16 matmul FLOP/s measured in the
    same run (`peak_matmul_flops`).
    """
    n = param_counts(d)["non_embedding"]
    return 6.0 * n + 12.0 * d.num_layers * d.num_attention_heads * d.head_dim * d.seq_length


def megatron_lite_flags(d: ModelDims, *, train_iters: int, clip_grad: float, extra: Sequence[str] = ()) -> List[str]:
    """pretrain_gpt.py's flags for `d`: bf16, AdamW, no dropout, the fused cross entropy, mock data
    from a NullTokenizer whose vocabulary (ids + eod) is exactly d.vocab_size, so
    --make-vocab-size-divisible-by 128 adds no padding."""
    return [
        "--num-layers", str(d.num_layers), "--hidden-size", str(d.hidden_size),
        "--num-attention-heads", str(d.num_attention_heads),
        "--group-query-attention", "--num-query-groups", str(d.num_query_groups),
        "--ffn-hidden-size", str(d.ffn_hidden_size), "--swiglu", "--normalization", "RMSNorm",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--seq-length", str(d.seq_length), "--max-position-embeddings", str(d.seq_length),
        "--micro-batch-size", str(d.micro_batch_size), "--global-batch-size", str(d.micro_batch_size),
        "--bf16", "--optimizer", "adam", "--lr", str(LR), "--lr-decay-style", "constant",
        "--adam-beta1", str(BETAS[0]), "--adam-beta2", str(BETAS[1]), "--weight-decay", str(WEIGHT_DECAY),
        "--clip-grad", str(clip_grad), "--train-iters", str(train_iters), "--seed", str(SEED),
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(d.vocab_size - 1),
        "--make-vocab-size-divisible-by", "128", "--cross-entropy-loss-fusion", *extra,
    ]


def build_megatron_lite_run(flags: Sequence[str]):
    """The Run that pretrain_gpt.py trains: parse_args -> setup_parallel -> build_run."""
    from megatron_lite.arguments import parse_args
    from megatron_lite.initialize import build_run, setup_parallel

    cfg = parse_args(list(flags))
    state = setup_parallel(cfg)
    return build_run(cfg, state)


def mock_batches(d: ModelDims, count: int, device: torch.device) -> List[dict]:
    """`count` microbatches of megatron_lite's MockGPTDataset (tokens, labels, position_ids,
    loss_mask), already on `device`; every candidate of a benchmark cycles through the same ones."""
    from megatron_lite.data.gpt_dataset import GPTDatasetSettings, MockGPTDataset

    settings = GPTDatasetSettings(seq_length=d.seq_length, seed=SEED, eod=d.vocab_size - 1, reset_position_ids=False,
                                  reset_attention_mask=False, eod_mask_loss=False, cache_dir="")
    dataset = MockGPTDataset("train", count * d.micro_batch_size, d.vocab_size, settings)
    batches = []
    for i in range(count):
        samples = [dataset[i * d.micro_batch_size + j] for j in range(d.micro_batch_size)]
        batches.append({k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]})
    return batches


def bench_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of step() after `warmup` untimed ones; the device is synchronised
    before and after the timed loop only, so asynchronous work is not serialised step by step."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


def peak_matmul_flops(device: torch.device, n: int, iters: int = 10, repeats: int = 3,
                      dtype=torch.bfloat16) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (2 n^3 FLOPs each), the best of `repeats` timings of
    `iters` back-to-back matmuls after a warm-up: the peak that MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for repeat in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        synchronize(device)
        if repeat:   # the first round warms up (clocks, cuBLAS heuristics)
            best = min(best, (time.perf_counter() - start) / iters)
    return 2.0 * n ** 3 / best


def reset_memory(device: torch.device) -> None:
    """Free what the previous candidate left and restart the peak-memory counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated since `reset_memory`; on a CPU the process's peak resident size
    (which is not reset between candidates)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30


def environment(device: torch.device) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    }


def format_number(value: Optional[float], digits: int = 3) -> str:
    """Significant digits for table cells; '-' for a missing value."""
    if value is None:
        return "-"
    if value == 0 or not math.isfinite(value):
        return str(value)
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (so it can be pasted into docs/PERFORMANCE.md), columns padded to align."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def write_json(name: str, payload: dict) -> Optional[str]:
    """Write payload to $OUT/name when OUT is set; returns the path."""
    out = os.environ.get("OUT")
    if not out:
        return None
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    return path
