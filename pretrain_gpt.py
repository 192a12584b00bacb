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

import os
import signal
import sys

import torch.distributed as dist

from megatron_lite.arguments import ConfigError, parse_args
from megatron_lite.checkpoint.recovery import CheckpointLoadError
from megatron_lite.training import NonFiniteLossError, pretrain


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        pretrain(cfg)
        for sig in (signal.SIGINT, signal.SIGTERM):   # finished and saved: nothing left to interrupt
            signal.signal(sig, signal.SIG_IGN)
    except (ConfigError, CheckpointLoadError) as e:   # a bad flag, file or checkpoint: the same on every rank
        if _rank() == 0:
            print(f"pretrain_gpt.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as e:   # every rank sees the same (reduced) loss and grad norm
        if _rank() == 0:
            print(f"pretrain_gpt.py: error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
