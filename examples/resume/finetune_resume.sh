#!/usr/bin/env bash
# Resume an interrupted finetune.sh run: the very same command line, settings and flags.
#
# It still says `--load PRETRAIN_CKPT --finetune`, yet it does not start over: the loader looks
# first in the run's own --save directory, FINETUNE_CKPT, and finds checkpoints there that
# record they were made in finetune mode, so that mode's reset has been done already. It
# resumes plainly from the newest one (weights, optimizer, LR schedule, iteration, consumed
# samples, data position, RNG), and the log continues where the interrupted run stopped. Only
# when FINETUNE_CKPT holds no checkpoint yet does it start the finetune from PRETRAIN_CKPT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

iteration=$(latest_iteration "$FINETUNE_CKPT")
if [[ -z "$iteration" ]]; then
  echo "finetune_resume.sh: $FINETUNE_CKPT holds no finetune checkpoint yet; start with finetune.sh" >&2
  exit 2
fi
echo "finetune_resume.sh: resuming the finetune from $FINETUNE_CKPT (iteration $iteration)"
exec "$(dirname "${BASH_SOURCE[0]}")/finetune.sh" "$@"
