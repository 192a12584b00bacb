#!/usr/bin/env bash
# LoRA-finetune pretrain.sh's newest checkpoint (PRETRAIN_CKPT) into LORA_CKPT (default 300
# iterations, a save every 50).
#
# --lora-rank puts rank-8 adapters on every decoder linear layer (linear_qkv, linear_proj,
# linear_fc1, linear_fc2) and freezes everything else, as PEFT does. The base weights come from
# --pretrained-checkpoint; LORA_CKPT's checkpoints hold only the adapters, their optimizer state,
# the LR schedule, the counters and the RNGs, and name the base checkpoint (path and checksum):
# the save line says what fraction of the base checkpoint they take. Run again, this script
# resumes its own adapters on the same base; a base checkpoint changed since is an error.
#
# lora_export.sh writes the adapters in PEFT's format and the merged model for Hugging Face.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

run_training "$LOG_DIR/lora.log" \
  --pretrained-checkpoint "$PRETRAIN_CKPT" --save "$LORA_CKPT" \
  --lora-rank "${LORA_RANK:-8}" --lora-alpha "${LORA_ALPHA:-16}" --lora-dropout 0.05 \
  --train-iters "${TRAIN_ITERS:-300}" --save-interval "${SAVE_INTERVAL:-50}" \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 \
  "$@"
