#!/usr/bin/env bash
# Resume an interrupted further_train.sh run: the very same command line, settings and flags
# (NEW_LR_SCHEDULE included).
#
# It still says `--load PRETRAIN_CKPT --reset-sample-stat`, yet it does not reset anything again:
# the loader looks first in the run's own --save directory, FURTHER_TRAIN_CKPT, and finds
# checkpoints there that record they were made in further-train mode. It resumes plainly from
# the newest one (weights, optimizer, LR schedule, iteration, consumed samples, data position,
# RNG), and the log continues where the interrupted run stopped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

iteration=$(latest_iteration "$FURTHER_TRAIN_CKPT")
if [[ -z "$iteration" ]]; then
  echo "further_train_resume.sh: $FURTHER_TRAIN_CKPT holds no further-train checkpoint yet;" \
       "start with further_train.sh" >&2
  exit 2
fi
echo "further_train_resume.sh: resuming further training from $FURTHER_TRAIN_CKPT (iteration $iteration)"
exec "$(dirname "${BASH_SOURCE[0]}")/further_train.sh" "$@"
