"""Tokenize a JSON-lines corpus into Megatron `.bin`/`.idx` files (Megatron-LM's flags).

    python -m megatron_lite.tools.preprocess_data --input corpus.jsonl --json-keys text \\
        --output-prefix data/corpus --tokenizer-type GPT2BPETokenizer \\
        --vocab-file vocab.json --merge-file merges.txt --append-eod --workers 8

writes data/corpus_text_document.bin/.idx; train on it with
`--data-path data/corpus_text_document`.
"""

from __future__ import annotations

import argparse
import sys

from megatron_lite.config import DataConfig
from megatron_lite.data.preprocess import output_prefix_for, preprocess_jsonl

TOKENIZERS = ["ByteLevelTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--input", required=True, help="JSON-lines file, one document per line")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="keys to extract; one output dataset per key")
    parser.add_argument("--output-prefix", required=True,
                        help="outputs are {prefix}_{key}_document.bin/.idx")
    parser.add_argument("--tokenizer-type", default="ByteLevelTokenizer", choices=TOKENIZERS)
    parser.add_argument("--tokenizer-model", help="local Hugging Face tokenizer directory")
    parser.add_argument("--vocab-file", help="GPT-2 BPE vocab.json")
    parser.add_argument("--merge-file", help="GPT-2 BPE merges.txt")
    parser.add_argument("--vocab-size", type=int, help="ids before the eod token (NullTokenizer)")
    parser.add_argument("--append-eod", action="store_true", help="end every document with eod")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--log-interval", type=int, default=10000,
                        help="documents between progress lines")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer_cfg = DataConfig(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                               vocab_file=args.vocab_file, merge_file=args.merge_file)
    try:
        preprocess_jsonl(args.input, args.output_prefix, tokenizer_cfg, json_keys=args.json_keys,
                         append_eod=args.append_eod, workers=args.workers,
                         vocab_size=args.vocab_size, log_interval=args.log_interval)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    for key in args.json_keys:
        print(f"wrote {output_prefix_for(args.output_prefix, key)}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
