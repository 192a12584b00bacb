#!/usr/bin/env bash
# On the GPU machine (one GPU): the training-throughput and checkpoint I/O benchmarks of issue 7,
# about 5 minutes on an H100. Builds megatron_lite's CUDA kernels first unless they import; puts
# Megatron-Core on the path when its wheel is in .whl/ (carry .whl along). Each stage has a time
# limit so that the whole script stays under 10 minutes; logs and JSON go to $OUT, and a compact
# table of both benchmarks comes last.
#   bash scripts/gpu_bench.sh
# Settings (environment): OUT, PYTHON, CKPT_DIR (a directory on the disk to measure; default the
# repository), MEGATRON_LITE_FLAGS (extra pretrain_gpt.py flags for megatron_lite, e.g.
# "--overlap-grad-reduce"), TRAIN_ARGS and CKPT_ARGS (extra arguments of bench/train_throughput.py
# and bench/checkpoint_io.py; "--tiny" in both runs the whole script on a CPU in a minute).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
FLAGS=${MEGATRON_LITE_FLAGS:-}
status=0
stage() { echo "== $1 ($(( $(date +%s) - t0 )) s so far)"; }
t0=$(date +%s)

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  df -hT "${CKPT_DIR:-$PWD}" | tail -1; } 2>&1 | tee "$OUT/env.log"

stage "CUDA kernels"
# With ninja, the kernels are compiled in parallel into the cache that megatron_lite loads them
# from at start-up (megatron_lite/ops/cuda_build.py); without it, by `pip install -e .`. A build
# that fails or does not finish in 100 s leaves megatron_lite on its torch ops, said in build.log.
: >"$OUT/build.log"
if ! $PY -c 'import megatron_lite.ops._cuda_kernels' 2>/dev/null; then
  if $PY -c 'from torch.utils.cpp_extension import is_ninja_available as n; raise SystemExit(not n())'; then
    timeout 100 $PY -c 'import torch; from megatron_lite.ops.cuda_build import load_extension as f
print("kernels:", f(torch.device("cuda")).__file__)' >>"$OUT/build.log" 2>&1
  else
    timeout 100 $PY -m pip install --no-deps --no-build-isolation -e . >>"$OUT/build.log" 2>&1 \
      && $PY -c 'import megatron_lite.ops._cuda_kernels' >>"$OUT/build.log" 2>&1
  fi || { echo "kernel build failed or timed out: megatron_lite runs with --no-fused-kernels" >>"$OUT/build.log"
          FLAGS="$FLAGS --no-fused-kernels"; }
fi
tail -2 "$OUT/build.log"

if ls .whl/megatron_core-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/megatron_core_site .whl/megatron_core-*.whl \
    && export PYTHONPATH=/tmp/megatron_core_site${PYTHONPATH:+:$PYTHONPATH}
fi

stage "training throughput"
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of arguments
timeout 280 $PY bench/train_throughput.py "--megatron-lite-flags=$FLAGS" ${TRAIN_ARGS:-} 2>&1 \
  | tee "$OUT/train_throughput.log" || status=1

stage "checkpoint I/O"
# the I/O does not depend on the fused ops; --no-fused-kernels keeps a missing build from compiling here
# shellcheck disable=SC2086
timeout 330 $PY bench/checkpoint_io.py --dir "${CKPT_DIR:-$PWD}" --budget-s 270 \
  "--megatron-lite-flags=$FLAGS --no-fused-kernels" ${CKPT_ARGS:-} 2>&1 | tee "$OUT/checkpoint_io.log" || status=1

stage "summary"
$PY - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.log"
import json, os, sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


train, ckpt = load("train_throughput.json"), load("checkpoint_io.json")
if train:
    env = train["environment"]
    print(f"{env['date']} | {env['device']} | torch {env['torch']} | matmul peak "
          f"{train['peak_matmul_flops'] / 1e12:.0f} TFLOP/s")
    print("| candidate | tokens/s | MFU % | peak GiB | megatron_lite / it |")
    print("|---|---|---|---|---|")
    for c in train["candidates"]:
        if c["status"] != "ok":
            print(f"| {c['name']} | {c['status']}: {c['reason'][:80]} | | | |")
            continue
        ratio = train["ratios"].get(c["name"], {}).get("tokens_per_s")
        print(f"| {c['name']} | {c['tokens_per_s']:,.0f} | {100 * c['mfu']:.1f} | {c['peak_memory_gib']:.1f} | "
              f"{f'{ratio:.2f}x' if ratio else '-'} |")
else:
    print("train_throughput.json is missing: see train_throughput.log")
if ckpt:
    print(f"\ncheckpoint state {ckpt.get('state_bytes', 0) / 1e9:.2f} GB on {ckpt['filesystem']['type']} "
          f"({ckpt['filesystem']['device']})")
    print("| measurement | op | s | GB/s | vs dd | vs torch | vs dcp |")
    print("|---|---|---|---|---|---|---|")
    for r in ckpt["rows"]:
        def fmt(key, unit=""):
            return f"{r[key]:.2f}{unit}" if r.get(key) else "-"
        print(f"| {r['name']} | {r['op']} | {fmt('seconds')} | {fmt('gb_per_s')} | {fmt('vs_dd', 'x')} | "
              f"{fmt('vs_torch', 'x')} | {fmt('vs_dcp', 'x')} |")
else:
    print("checkpoint_io.json is missing: see checkpoint_io.log")
EOF
echo "total: $(( $(date +%s) - t0 )) s; exit status $status"
exit $status
