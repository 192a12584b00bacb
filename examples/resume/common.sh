# Settings and the launcher shared by the examples/resume scripts. Sourced, not run.
#
# Every setting is an environment variable whose default runs a tiny GPT on a CPU machine in
# seconds (gloo); the same scripts use NCCL on GPUs, because pretrain_gpt.py picks the backend.
#
#   NPROC=2            processes (torchrun --nproc_per_node); one per GPU on a GPU machine
#   TP=1 PP=1          tensor- and pipeline-parallel sizes; data parallel is NPROC / (TP * PP)
#   MICRO_BATCH_SIZE=1 GLOBAL_BATCH_SIZE=8
#   RUNS_DIR=./runs    where checkpoints and logs go by default:
#     PRETRAIN_CKPT=$RUNS_DIR/pretrain  FINETUNE_CKPT=$RUNS_DIR/finetune
#     FURTHER_TRAIN_CKPT=$RUNS_DIR/further_train  WEIGHTS_FROM_CKPT=$RUNS_DIR/load_weights_from
#     LORA_CKPT=$RUNS_DIR/lora
#     LOG_DIR=$RUNS_DIR/logs
#   TRAIN_ITERS, SAVE_INTERVAL   per script (each script names its defaults)
#   EVAL_INTERVAL=100  iterations between validation runs (0: none)
#   EXIT_INTERVAL      unset: train to the end; N: save and stop at the next multiple of N
#   TORCHRUN=torchrun  the launcher (e.g. /path/to/venv/bin/torchrun)
# Flags given to a script are appended to its pretrain_gpt.py command line.

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

NPROC=${NPROC:-2}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-8}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}
TORCHRUN=${TORCHRUN:-torchrun}
RUNS_DIR=${RUNS_DIR:-./runs}
PRETRAIN_CKPT=${PRETRAIN_CKPT:-$RUNS_DIR/pretrain}
FINETUNE_CKPT=${FINETUNE_CKPT:-$RUNS_DIR/finetune}
FURTHER_TRAIN_CKPT=${FURTHER_TRAIN_CKPT:-$RUNS_DIR/further_train}
WEIGHTS_FROM_CKPT=${WEIGHTS_FROM_CKPT:-$RUNS_DIR/load_weights_from}
LORA_CKPT=${LORA_CKPT:-$RUNS_DIR/lora}
LOG_DIR=${LOG_DIR:-$RUNS_DIR/logs}

# One CPU thread per process, as torchrun sets for more than one process: with a tiny model,
# more threads only compete for the cores (a single process on 2 busy cores runs 10x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if (( NPROC % (TP * PP) != 0 )); then
  echo "$(basename "$0"): NPROC=$NPROC is not a multiple of TP*PP=$((TP * PP)); set NPROC, TP or PP" >&2
  exit 2
fi

# The model and the flags every mode shares. Dropout stays on so that a resume has to restore
# the RNG states to match; deterministic kernels make a resumed run match bit for bit on GPUs too.
COMMON_ARGS=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
  --log-interval 1 --eval-interval "$EVAL_INTERVAL" --eval-iters 2
  --deterministic-mode --exit-signal-handler
)
if [[ -n "${EXIT_INTERVAL:-}" ]]; then
  COMMON_ARGS+=(--exit-interval "$EXIT_INTERVAL")
fi

# The newest checkpoint iteration in a save directory, or nothing.
latest_iteration() {
  cat "$1/latest_checkpointed_iteration.txt" 2>/dev/null || true
}

# Ask torchrun's workers (its children, $1) to stop: with --exit-signal-handler each finishes
# its iteration, saves a checkpoint and exits 0. Before the workers exist, torchrun itself.
stop_workers() {
  local workers
  workers=$(pgrep -P "$1" || true)
  echo "$(basename "$0"): stopping: the workers finish this iteration, save a checkpoint and exit" >&2
  # shellcheck disable=SC2086  # one pid per word
  kill -TERM ${workers:-$1} 2>/dev/null || true
}

# run_training LOG_FILE FLAG...: pretrain_gpt.py under torchrun with COMMON_ARGS and the flags,
# its output on the terminal and appended to LOG_FILE (a restart adds to the same log); returns
# torchrun's exit status.
#
# Why not `torchrun ... | tee`: Ctrl-C signals the whole foreground process group, and torchrun
# takes SIGINT or SIGTERM as a failure: it passes the signal on, SIGKILLs any worker still busy
# 30 s later (maybe in the middle of its save) and exits 1, while tee dies at once and loses the
# end of the log. So torchrun gets a session of its own (setsid), tee ignores both signals, and
# this script hands Ctrl-C or SIGTERM to the workers (stop_workers): they save and exit 0, and
# so do torchrun and the script.
run_training() {
  local log_file=$1
  shift
  mkdir -p "$(dirname "$log_file")"
  local cmd=("$TORCHRUN" --standalone --nproc_per_node "$NPROC" "$REPO_DIR/pretrain_gpt.py"
             "${COMMON_ARGS[@]}" "$@")
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(basename "$0"): ${cmd[*]}" | tee -a "$log_file"
  local fifo
  fifo=$(mktemp -u "${TMPDIR:-/tmp}/resume_example_log.XXXXXX")
  mkfifo "$fifo"
  (trap '' INT TERM; exec tee -a "$log_file") < "$fifo" &
  local tee_pid=$!
  setsid "${cmd[@]}" > "$fifo" 2>&1 &
  local pid=$!
  # shellcheck disable=SC2064  # the pid is fixed now
  trap "stop_workers $pid" INT TERM
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true   # a trapped signal interrupts wait; keep waiting for torchrun
  done
  local status=0
  wait "$pid" || status=$?
  trap - INT TERM
  wait "$tee_pid" || true
  rm -f "$fifo"
  return "$status"
}
