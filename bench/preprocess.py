"""Preprocessing throughput (MB/s of JSON lines) with 1 and with 4 worker processes.

    python bench/preprocess.py [--megabytes 50]

Writes a JSON-lines file of about `--megabytes` MB from the default corpus and runs
preprocess_jsonl on it with the byte-level tokenizer and, when the `tokenizers` package is
there to train a 4096-token vocabulary, with GPT-2 BPE; each with 1 and 4 workers, checking
that both write the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.config import DataConfig  # noqa: E402
from megatron_lite.data.default_corpus import corpus_documents  # noqa: E402
from megatron_lite.data.preprocess import output_prefix_for, preprocess_jsonl  # noqa: E402


def write_input(path: str, megabytes: float) -> None:
    documents = corpus_documents()
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            for doc in documents:
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))


def gpt2_bpe_config(directory: str):
    try:
        import tokenizers
    except ImportError:
        return None
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_documents(), vocab_size=4096, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save_model(directory)
    return DataConfig(tokenizer_type="GPT2BPETokenizer", vocab_file=os.path.join(directory, "vocab.json"),
                      merge_file=os.path.join(directory, "merges.txt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=50)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "input.jsonl")
        write_input(source, args.megabytes)
        size_mb = os.path.getsize(source) / 1e6
        tokenizers = {"ByteLevelTokenizer": DataConfig(), "GPT2BPETokenizer": gpt2_bpe_config(tmp)}
        for name, cfg in tokenizers.items():
            if cfg is None:
                print(f"{name}: skipped (pip install tokenizers to train its vocabulary)")
                continue
            outputs, speeds = [], {}
            for workers in (1, 4):
                prefix = os.path.join(tmp, f"{name}-{workers}")
                stats = preprocess_jsonl(source, prefix, cfg, append_eod=True, workers=workers,
                                         log=None)
                speeds[workers] = stats.mb_per_s
                with open(output_prefix_for(prefix, "text") + ".bin", "rb") as f:
                    outputs.append(f.read())
            assert outputs[0] == outputs[1], "1 and 4 workers wrote different tokens"
            print(f"{name}, {size_mb:.1f} MB: 1 worker {speeds[1]:.2f} MB/s, 4 workers "
                  f"{speeds[4]:.2f} MB/s ({speeds[4] / speeds[1]:.2f}x)")


if __name__ == "__main__":
    main()
