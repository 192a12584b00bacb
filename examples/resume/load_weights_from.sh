#!/usr/bin/env bash
# Resume pretrain.sh's training state (PRETRAIN_CKPT's newest full checkpoint) with the weights of
# an "iteration model" (ITERATION_MODELS), into WEIGHTS_FROM_CKPT (default: 100 iterations past
# the checkpoint, a save every 50).
#
# --load PRETRAIN_CKPT --load-weights-from ITERATION_MODELS: optimizer moments, LR schedule,
# iteration, consumed samples, data position and RNG states come from PRETRAIN_CKPT, the weights
# from ITERATION_MODELS (any checkpoint of the same model: weights-only or full, megatron_lite's,
# Megatron-LM's or converted from Hugging Face), and the optimizer's fp32 main params follow those
# weights. WEIGHTS_STEP picks its iteration (default auto: the newest intact). The recovery report
# says which checkpoint each part came from. The LR schedule continues as the checkpoint saved it
# (--use-checkpoint-opt_param-scheduler), so TRAIN_ITERS may go past pretraining's.
#
# Iteration models: e.g. `pretrain.sh --save-weights-only-interval 50` writes one every 50
# iterations into PRETRAIN_CKPT/weights, the default ITERATION_MODELS.
#
# Interrupted, it saves and exits 0; run it again with the same settings and it resumes from
# WEIGHTS_FROM_CKPT: its checkpoints record the weights they were trained from, so the restart
# does not take them again.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ITERATION_MODELS=${ITERATION_MODELS:-$PRETRAIN_CKPT/weights}

iteration=$(latest_iteration "$PRETRAIN_CKPT")
if [[ -z "$iteration" || ! -d "$ITERATION_MODELS" ]]; then
  echo "load_weights_from.sh: needs a full checkpoint in $PRETRAIN_CKPT and iteration models in" \
       "$ITERATION_MODELS; start with pretrain.sh --save-weights-only-interval N" >&2
  exit 2
fi

run_training "$LOG_DIR/load_weights_from.log" \
  --load "$PRETRAIN_CKPT" --save "$WEIGHTS_FROM_CKPT" \
  --load-weights-from "$ITERATION_MODELS" --load-weights-from-step "${WEIGHTS_STEP:-auto}" \
  --train-iters "${TRAIN_ITERS:-$((iteration + 100))}" --save-interval "${SAVE_INTERVAL:-50}" \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-fraction 0.01 \
  --lr-decay-iters "${LR_DECAY_ITERS:-2000}" --use-checkpoint-opt_param-scheduler \
  "$@"
