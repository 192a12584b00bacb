#!/usr/bin/env bash
# On a 4-GPU machine (NCCL): the reference model's loss curve over 20 iterations at TP=2, PP=2
# (1F1B), DP=4 and TP2xDP2 against one GPU (bf16), DP=4 with bf16 gradient buffers against one
# GPU with them, tokens/s per GPU, and exact resume at TP2xPP2 with --deterministic-mode (10
# straight vs 5 + resume to 10).
#   OUT=/tmp/out bash scripts/gpu_multi_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_multi_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
REF=(--num-layers 16 --hidden-size 2048 --num-attention-heads 16 --group-query-attention --num-query-groups 8
     --ffn-hidden-size 5632 --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear
     --untie-embeddings-and-output-weights --seq-length 2048 --max-position-embeddings 2048 --vocab-size 31999
     --tokenizer-type NullTokenizer --mock-data --micro-batch-size 4 --global-batch-size 32 --train-iters 20
     --lr 3e-4 --lr-warmup-iters 5 --bf16 --hidden-dropout 0 --attention-dropout 0 --log-interval 1
     --eval-interval 0 --seed 1234 --overlap-grad-reduce ${EXTRA_FLAGS:-})
run() {  # name nproc flags...
  local name=$1 nproc=$2; shift 2
  timeout 150 torchrun --standalone --nproc_per_node "$nproc" pretrain_gpt.py "$@" >"$OUT/$name.log" 2>&1
  echo "$name (nproc $nproc, exit $?): $(grep -E '^ iteration' "$OUT/$name.log" | tail -1 | cut -c1-60) \
tokens/s per GPU: $(grep -E '^ iteration' "$OUT/$name.log" | tail -5 | sed -E 's/.*tokens per second: ([0-9.]+).*/\1/' \
  | awk -v n="$nproc" '{s+=$1} END {if (NR) printf "%.0f", s/NR/n}')"
}
run gpu1 1 "${REF[@]}"
run tp2 2 "${REF[@]}" --tensor-model-parallel-size 2
run pp2 2 "${REF[@]}" --pipeline-model-parallel-size 2
run dp4 4 "${REF[@]}" --use-distributed-optimizer
run tp2dp2 4 "${REF[@]}" --tensor-model-parallel-size 2 --sequence-parallel
for r in tp2 pp2 dp4 tp2dp2; do
  echo "$r vs gpu1: $($PY -m megatron_lite.tools.compare_logs --rtol 2e-2 --quiet "$OUT/gpu1.log" "$OUT/$r.log" | tail -1)"
done
# bf16 moments and bf16 gradient buffers (reduce-scattered in bf16): one GPU and DP=4
LEAN=(--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16 --main-grads-dtype bf16)
run gpu1_lean 1 "${REF[@]}" "${LEAN[@]}"
run dp4_lean 4 "${REF[@]}" "${LEAN[@]}" --use-distributed-optimizer
echo "dp4_lean vs gpu1_lean: $($PY -m megatron_lite.tools.compare_logs --rtol 2e-2 --quiet "$OUT/gpu1_lean.log" "$OUT/dp4_lean.log" \
  | tail -1)"
SMALL=(--num-layers 4 --hidden-size 512 --num-attention-heads 8 --normalization RMSNorm --swiglu
       --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights --seq-length 512
       --max-position-embeddings 512 --vocab-size 31999 --tokenizer-type NullTokenizer --mock-data
       --micro-batch-size 2 --global-batch-size 16 --train-iters 10 --lr 3e-4 --lr-warmup-iters 2 --bf16
       --log-interval 1 --eval-interval 0 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
       --deterministic-mode)
rm -rf /tmp/det_ck
run det_straight 4 "${SMALL[@]}" --save /tmp/det_straight --save-interval 100
run det_first 4 "${SMALL[@]}" --save /tmp/det_ck --load /tmp/det_ck --exit-interval 5
run det_resumed 4 "${SMALL[@]}" --save /tmp/det_ck --load /tmp/det_ck
cat "$OUT/det_first.log" "$OUT/det_resumed.log" >"$OUT/det_interrupted.log"
echo "deterministic resume: $($PY -m megatron_lite.tools.compare_logs --quiet "$OUT/det_straight.log" "$OUT/det_interrupted.log" | tail -1)"
$PY - <<'PY'
import torch
from megatron_lite.checkpoint.io.storage import load_file
same = True
for tp in range(2):
    for pp in range(2):
        rel = f"mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt"
        a, b = load_file("/tmp/det_straight", 10, rel)["model"], load_file("/tmp/det_ck", 10, rel)["model"]
        same &= all(torch.equal(a[k], b[k]) for k in a)
print("final parameters bitwise equal:", same)
PY
