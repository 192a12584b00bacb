"""Pretrain (or finetune, or further-train) a GPT/Llama model with Megatron-LM's flags.

    torchrun --nproc_per_node 8 pretrain_gpt.py --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --num-layers 24 --hidden-size 1024 ... --train-iters 1000

With no data flags it trains on the small corpus that ships with megatron_lite; with no
GPU it runs on CPU (gloo).

A bad flag, YAML file, dataset or checkpoint (ConfigError, CheckpointLoadError) ends the run
with exit code 2 and one line on rank 0's stderr (every rank finds the same problem; only
rank 0 says it); a non-finite loss or grad norm (--check-for-nan-in-loss-and-grad) with exit code 3. Once the run has
finished and saved, SIGINT and SIGTERM are ignored: a Ctrl-C while the processes exit does not
turn a finished run into a failed one.
"""

import signal
import sys

from megatron_lite.arguments import parse_args
from megatron_lite.entry_point import run_entry_point
from megatron_lite.training import pretrain


def _train(argv) -> None:
    pretrain(parse_args(argv))
    for sig in (signal.SIGINT, signal.SIGTERM):   # finished and saved: nothing left to interrupt
        signal.signal(sig, signal.SIG_IGN)


def main(argv=None) -> int:
    return run_entry_point("pretrain_gpt.py", lambda: _train(argv))


if __name__ == "__main__":
    sys.exit(main())
