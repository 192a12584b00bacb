#!/usr/bin/env bash
# On the GPU machine: build the CUDA kernels, run every gpu-marked test (ops, AdamW kernel,
# gradient accumulation fusion), then the kernel
# benchmark. Everything is tee'd to $OUT (build.log, gpu_tests.log, bench.log, kernels_bench.json).
# Carries Liger-Kernel from .whl/ when its wheel is there (a column of the benchmark).
#   bash scripts/gpu_kernels_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_kernels_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
status=0

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  nvcc --version | tail -1; } 2>&1 | tee "$OUT/env.log"

# torch's CUDA headers include the math libraries' headers (cusparse.h, ...); where the toolkit
# lacks them, use the copies that pip's nvidia-* wheels ship.
CUDA_INC=$($PY -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "/usr/local/cuda")')/include
if [ ! -f "$CUDA_INC/cusparse.h" ]; then
  NV_INC=$($PY -c 'import glob, os, nvidia; print(":".join(sorted({os.path.dirname(h) for r in nvidia.__path__
    for h in glob.glob(os.path.join(r, "*", "include", "cusparse.h"))})))' 2>/dev/null)
  [ -n "$NV_INC" ] && export CPATH=$NV_INC${CPATH:+:$CPATH} && echo "CPATH=$CPATH" | tee -a "$OUT/env.log"
fi

start=$(date +%s)
$PY -m pip install --no-deps --no-build-isolation -e . 2>&1 | tee "$OUT/build.log" | tail -5 || status=1
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
$PY -c 'from megatron_lite.ops import _cuda_kernels; print("extension:", _cuda_kernels.__file__)' 2>&1 \
  | tee -a "$OUT/build.log" || status=1

if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/liger_site .whl/liger_kernel-*.whl \
    && export PYTHONPATH=/tmp/liger_site${PYTHONPATH:+:$PYTHONPATH}
fi

start=$(date +%s)
$PY -m pytest -m gpu tests/unit_tests -q -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/gpu_tests.log" \
  || status=1
echo "gpu tests: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu_tests.log"

start=$(date +%s)
$PY bench/kernels.py 2>&1 | tee "$OUT/bench.log" || status=1
echo "bench: $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.log"
exit $status
