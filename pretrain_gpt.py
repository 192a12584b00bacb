"""Pretrain (or finetune, or further-train) a GPT/Llama model with Megatron-LM's flags.

    torchrun --nproc_per_node 8 pretrain_gpt.py --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --num-layers 24 --hidden-size 1024 ... --train-iters 1000

With no data flags it trains on the small corpus that ships with megatron_lite; with no
GPU it runs on CPU (gloo).
"""

import sys

import torch.distributed as dist

from megatron_lite.arguments import ConfigError, parse_args
from megatron_lite.training import pretrain


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        pretrain(cfg)
    except ConfigError as e:
        print(f"pretrain_gpt.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
