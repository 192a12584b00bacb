"""The C++ index helper against its numpy fallback, timed in one run.

    python bench/data_helpers.py [--samples 10000000] [--blend-samples 1000000]

Builds the GPT sample index for `--samples` samples of 2048 tokens over documents of
random length (1 to 4096 tokens, shuffled over as many epochs as needed), and the blending
indices of three datasets, with both implementations; checks that they agree and prints
each time and the ratio numpy / C++. The document index is built once, outside the timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron_lite.data.helpers import (build_blending_indices_numpy,  # noqa: E402
                                        build_sample_idx_numpy, helpers_cpp, sample_idx_dtype)


def best_time(fn, repeats: int):
    """The fastest of `repeats` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def report(name: str, cpp_seconds: float, numpy_seconds: float) -> None:
    print(f"{name}: C++ {cpp_seconds:.3f} s, numpy {numpy_seconds:.3f} s, "
          f"C++ is {numpy_seconds / cpp_seconds:.1f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--documents", type=int, default=200_000)
    parser.add_argument("--blend-samples", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if helpers_cpp is None:
        sys.exit("megatron_lite.data.helpers_cpp is not built; run `pip install --no-build-isolation -e .`")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}")

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 4097, args.documents).astype(np.int32)
    tokens_per_epoch = int(sizes.sum())
    epochs = -(-(args.samples * args.seq_length + 1) // tokens_per_epoch)
    document_index = np.tile(np.arange(args.documents, dtype=np.int32), epochs)
    rng.shuffle(document_index)
    build = (helpers_cpp.build_sample_idx_int32 if sample_idx_dtype(sizes, document_index) == np.int32
             else helpers_cpp.build_sample_idx_int64)
    sample_args = (sizes, document_index, args.seq_length, epochs, tokens_per_epoch)
    cpp_s, cpp = best_time(lambda: build(*sample_args), args.repeats)
    ref_s, ref = best_time(lambda: build_sample_idx_numpy(*sample_args), args.repeats)
    assert np.array_equal(cpp, ref), "the C++ and numpy sample indices differ"
    report(f"sample index, {len(cpp) - 1:,} samples over {epochs} epochs", cpp_s, ref_s)

    weights = np.array([0.2, 0.3, 0.5])
    cpp_s, cpp = best_time(lambda: helpers_cpp.build_blending_indices(weights, args.blend_samples),
                           args.repeats)
    ref_s, ref = best_time(lambda: build_blending_indices_numpy(weights, args.blend_samples), 1)
    assert all(np.array_equal(a, b) for a, b in zip(cpp, ref)), "the blending indices differ"
    report(f"blending indices, {args.blend_samples:,} samples of 3 datasets", cpp_s, ref_s)


if __name__ == "__main__":
    main()
