#!/usr/bin/env bash
# Pretrain a tiny GPT from scratch, saving a checkpoint to PRETRAIN_CKPT every SAVE_INTERVAL
# iterations (default 1000 iterations, a save every 100).
#
# Interrupt it (Ctrl-C, or `kill PID` of this script) and it saves where it is and exits 0; run
# it again and it resumes from the newest checkpoint in PRETRAIN_CKPT: weights, optimizer, LR
# scheduler, iteration, consumed samples, data position and RNG states, so the iterations after
# the restart are the ones an uninterrupted run would have logged (megatron_lite.tools.compare_logs).
#
# The LR schedule is planned for LR_DECAY_ITERS (default 2000) iterations, longer than the run,
# so that further_train.sh has a schedule left to continue.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

run_training "$LOG_DIR/pretrain.log" \
  --load "$PRETRAIN_CKPT" --save "$PRETRAIN_CKPT" \
  --train-iters "${TRAIN_ITERS:-1000}" --save-interval "${SAVE_INTERVAL:-100}" \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-fraction 0.01 \
  --lr-decay-iters "${LR_DECAY_ITERS:-2000}" \
  "$@"
