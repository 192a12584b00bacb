"""What the backward keeps of one training forward: every tensor saved for backward, by storage.

Builds the reference model's megatron_lite run (bench/common.py) as pretrain_gpt.py does, with
--num-layers N (default 1) and any extra flags, runs one microbatch's forward under
`torch.autograd.graph.saved_tensors_hooks` and lists each distinct storage that a saved tensor
points to: bytes held after the forward (a storage freed by selective recomputation counts 0),
the saved tensor's shape and dtype, and the op that produced it. A tensor saved as a view keeps
its whole storage, which the list shows (e.g. a slice of a fused projection's output).

    python bench/activation_memory.py [--num-layers 1] [--flags "--recompute-granularity selective ..."]
    python bench/activation_memory.py --tiny     # runs on a CPU

Prints the table and the total per layer and per token; writes activation_memory.json to $OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import (REFERENCE, TINY, bench_device, build_megatron_lite_run, format_table,  # noqa: E402
                          megatron_lite_flags, mock_batches, write_json)


def saved_storages(run, batch) -> list:
    """[(bytes held after the forward, shape, dtype, producer)] per distinct storage other than the
    parameters' (which exist anyway), largest first."""
    params = {p.untyped_storage().data_ptr() for p in run.module.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr() or id(storage)
        if key not in seen and key not in params:
            producer = type(t.grad_fn).__name__ if t.grad_fn is not None else "input/constant"
            seen[key] = (storage, tuple(t.shape), str(t.dtype).replace("torch.", ""), producer)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run.module(batch["tokens"], batch["position_ids"], labels=batch["labels"]).float().mean()
    rows = [(storage.nbytes(), shape, dtype, producer) for storage, shape, dtype, producer in seen.values()]
    del loss
    return sorted(rows, key=lambda r: -r[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--flags", default="", help="extra megatron_lite flags, one string")
    parser.add_argument("--tiny", action="store_true", help="the 2-layer CPU model")
    args = parser.parse_args(argv)
    dims = TINY if args.tiny else dataclasses.replace(REFERENCE, num_layers=args.num_layers)
    device = bench_device()
    run = build_megatron_lite_run(megatron_lite_flags(dims, train_iters=1, clip_grad=1.0,
                                                      extra=shlex.split(args.flags)))
    print(run.ops.describe())
    rows = saved_storages(run, mock_batches(dims, 1, device)[0])
    activations = sum(r[0] for r in rows)
    table = [[f"{n / 2**20:.1f}", "x".join(map(str, shape)), dtype, producer] for n, shape, dtype, producer in rows]
    print(format_table(["MiB held", "saved tensor shape", "dtype", "produced by"], table))
    per_layer = activations / dims.num_layers
    print(f"activations saved: {activations / 2**20:.1f} MiB ({per_layer / 2**20:.1f} MiB per layer incl. the "
          f"embedding/loss share, {per_layer / dims.tokens_per_step / 1024:.2f} KiB per token per layer)")
    write_json("activation_memory.json", {"flags": args.flags, "num_layers": dims.num_layers, "rows": [
        {"bytes": n, "shape": list(shape), "dtype": dtype, "producer": producer} for n, shape, dtype, producer in rows],
        "activation_bytes": activations})


if __name__ == "__main__":
    main()
