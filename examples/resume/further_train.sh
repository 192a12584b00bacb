#!/usr/bin/env bash
# Further-train pretrain.sh's newest checkpoint (PRETRAIN_CKPT) into FURTHER_TRAIN_CKPT, e.g. on
# new data (default 300 iterations, a save every 50).
#
# Further-train mode (--reset-sample-stat): weights, optimizer state and RNG states come from
# the checkpoint; iteration and consumed samples restart at 0, so the data (pass new data as
# flags, e.g. `further_train.sh --data-path new_text_document`) is read from its first sample.
#   NEW_LR_SCHEDULE=0 (default): the LR schedule continues where pretraining left it (the
#     checkpoint's schedule; this run's LR flags are not used).
#   NEW_LR_SCHEDULE=1: a fresh schedule from this script's flags (--no-load-lr-scheduler).
#
# Interrupted, it saves and exits 0; restart it with further_train_resume.sh (or this script
# again) with the same settings.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

schedule=()
if [[ "${NEW_LR_SCHEDULE:-0}" == 1 ]]; then
  schedule=(--no-load-lr-scheduler --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine --lr-warmup-fraction 0.05)
fi

run_training "$LOG_DIR/further_train.log" \
  --load "$PRETRAIN_CKPT" --save "$FURTHER_TRAIN_CKPT" --reset-sample-stat "${schedule[@]}" \
  --train-iters "${TRAIN_ITERS:-300}" --save-interval "${SAVE_INTERVAL:-50}" \
  "$@"
