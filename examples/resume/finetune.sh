#!/usr/bin/env bash
# Finetune pretrain.sh's newest checkpoint (PRETRAIN_CKPT) into FINETUNE_CKPT (default 300
# iterations, a save every 50).
#
# Finetune mode (--finetune --no-load-optim): the weights come from the checkpoint; optimizer,
# LR schedule (this script's own, with its own warmup), iteration and consumed samples start
# fresh, at iteration 0, and the RNGs are seeded anew. The data starts from its first sample:
# pass your finetuning data as flags, e.g. `finetune.sh --data-path my_sft_text_document`,
# with the tokenizer the checkpoint was trained with.
#
# Interrupted, it saves and exits 0; restart it with finetune_resume.sh (or this script again).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

run_training "$LOG_DIR/finetune.log" \
  --load "$PRETRAIN_CKPT" --save "$FINETUNE_CKPT" --finetune --no-load-optim \
  --train-iters "${TRAIN_ITERS:-300}" --save-interval "${SAVE_INTERVAL:-50}" \
  --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-fraction 0.05 \
  "$@"
