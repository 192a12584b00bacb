#!/usr/bin/env bash
# On the GPU machine: pretrain_gpt.py on one GPU in bf16, fused kernels vs plain torch (torch ops,
# no gradient accumulation fusion) (same seed, same data: the loss curves must agree within bf16
# tolerance), Adam's moments in bf16 against fp32 (then bf16 gradient buffers too), selective
# recomputation against none, and, when two GPUs are present, the same model with TP=2 against
# one GPU.
#   OUT=/tmp/out bash scripts/gpu_train_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_train_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())')
MODEL=(--num-layers 8 --hidden-size 1024 --num-attention-heads 16 --group-query-attention --num-query-groups 8
       --ffn-hidden-size 2816 --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear
       --untie-embeddings-and-output-weights --seq-length 1024 --max-position-embeddings 1024
       --micro-batch-size 4 --global-batch-size 32 --train-iters 20 --lr 3e-4 --lr-warmup-iters 5
       --lr-decay-style cosine --bf16 --mock-data --tokenizer-type NullTokenizer --vocab-size 31999
       --hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-interval 0 --seed 1234)
status=0
run() {  # name, nproc, flags...
  local name=$1 nproc=$2; shift 2
  echo "=== $name (nproc $nproc): $*" | tee "$OUT/$name.log"
  torchrun --standalone --nproc_per_node "$nproc" pretrain_gpt.py "${MODEL[@]}" "$@" 2>&1 | tee -a "$OUT/$name.log" \
    | grep -E "fused ops|iteration +(1|10|20)/|Error|error" || status=1
}
run gpu1_bf16_fused 1
run gpu1_bf16_torch 1 --no-fused-kernels --no-gradient-accumulation-fusion
$PY -m megatron_lite.tools.compare_logs --rtol 2e-2 --quiet "$OUT/gpu1_bf16_torch.log" "$OUT/gpu1_bf16_fused.log" | tee "$OUT/compare_fused.txt"
# Adam's moments stored in bf16 (the arithmetic stays fp32): the same curve within bf16 tolerance
run gpu1_bf16_moments 1 --use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16
$PY -m megatron_lite.tools.compare_logs --rtol 2e-2 --quiet "$OUT/gpu1_bf16_fused.log" "$OUT/gpu1_bf16_moments.log" \
  | tee "$OUT/compare_moments.txt"
# bf16 gradient buffers as well (wgrad GEMMs write bf16, AdamW reads bf16): within bf16 tolerance
run gpu1_bf16_grads 1 --use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16 \
  --main-grads-dtype bf16
$PY -m megatron_lite.tools.compare_logs --rtol 2e-2 --quiet "$OUT/gpu1_bf16_fused.log" "$OUT/gpu1_bf16_grads.log" \
  | tee "$OUT/compare_grads.txt"
# selective recomputation of the norms' and the MLP activation's outputs: the same numbers
run gpu1_bf16_recompute 1 --recompute-granularity selective --recompute-modules layernorm mlp_act
$PY -m megatron_lite.tools.compare_logs --rtol 2e-2 --quiet "$OUT/gpu1_bf16_fused.log" "$OUT/gpu1_bf16_recompute.log" \
  | tee "$OUT/compare_recompute.txt"
if [ "$NGPU" -ge 2 ]; then
  run gpu2_tp2_bf16_fused 2 --tensor-model-parallel-size 2
  $PY -m megatron_lite.tools.compare_logs --rtol 2e-2 --quiet "$OUT/gpu1_bf16_fused.log" "$OUT/gpu2_tp2_bf16_fused.log" | tee "$OUT/compare_tp2.txt"
  run gpu2_tp2_sp_pp1 2 --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer
fi
exit $status
