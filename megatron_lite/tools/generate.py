"""Generate from a checkpoint with a KV cache, at the TP/PP it is launched with.

    python -m megatron_lite.tools.generate --load CKPT --prompt "Once upon a time" --max-new-tokens 32 \\
        [--greedy | --temperature 0.8 --top-k 50 --top-p 0.9] [--seed 1]
    torchrun --nproc_per_node 2 -m megatron_lite.tools.generate --tensor-model-parallel-size 2 --load CKPT \\
        --prompt-ids 5 17 42

--load takes any directory megatron_lite loads: its own checkpoints, megatron_lite.tools.convert's
(e.g. from Hugging Face), Megatron-LM's torch and torch_dist; --ckpt-step picks an iteration. The
model config and the tokenizer are the checkpoint's (flags override them). With --prompt the
prompt and its continuation are printed as text; with --prompt-ids the generated ids, on one line.
Generation stops early at the tokenizer's end-of-document token. Loading messages go to stderr,
so stdout holds only the result. The other flags are pretrain_gpt.py's; a mistake in them stops
with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from megatron_lite.arguments import ConfigError, _Parser, build_parser, parse_args
from megatron_lite.entry_point import rank, run_entry_point
from megatron_lite.inference import generate, load_for_inference


def _prompt_parser() -> argparse.ArgumentParser:
    parser = _Parser(add_help=False, allow_abbrev=False)
    parser.add_argument("--prompt", help="text to continue (tokenized with the checkpoint's tokenizer)")
    parser.add_argument("--prompt-ids", nargs="+", type=int, metavar="ID", help="token ids to continue")
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def _generate(argv) -> int:
    own, rest = _prompt_parser().parse_known_args(argv)
    if own.help:
        print(__doc__ + "\n" + _prompt_parser().format_help() + "\n" + build_parser().format_help())
        return 0
    if (own.prompt is None) == (own.prompt_ids is None):
        raise ConfigError("give the prompt as --prompt TEXT or as --prompt-ids ID [ID ...], one of the two")
    cfg = parse_args(rest)
    with contextlib.redirect_stdout(sys.stderr):
        run = load_for_inference(cfg)
    prompt = own.prompt_ids if own.prompt_ids is not None else run.tokenizer.tokenize(own.prompt)
    new = generate(run, [prompt], cfg.inference, seed=cfg.train.seed, stop_token_id=run.tokenizer.eod)[0]
    if rank() == 0:
        text = " ".join(map(str, new)) if own.prompt_ids is not None else run.tokenizer.detokenize(prompt + new)
        print(text, flush=True)
    return 0


def main(argv=None) -> int:
    return run_entry_point("generate.py", lambda: _generate(argv))


if __name__ == "__main__":
    sys.exit(main())
