"""Tokenizers: byte-level (the default, needs no files), Hugging Face, GPT-2 BPE, and null.

Each has `vocab_size` (unpadded), `eod`, `tokenize(str) -> list[int]`,
`detokenize(list[int]) -> str`, and `description`, a string that identifies its vocabulary
(used to key caches of data tokenized with it).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Dict, List, Optional, Tuple


class ByteLevelTokenizer:
    """UTF-8 bytes are the tokens 0-255; 256 is the end-of-document token."""

    vocab_size = 257
    eod = 256
    description = "ByteLevelTokenizer"

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: List[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class NullTokenizer:
    """Megatron's NullTokenizer: text is space-separated ids; eod is one past the given vocabulary."""

    def __init__(self, vocab_size: int):
        self._ids = int(vocab_size)
        self.eod = self._ids
        self.vocab_size = self._ids + 1
        self.description = f"NullTokenizer({self._ids})"

    def tokenize(self, text: str) -> List[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: List[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


class HuggingFaceTokenizer:
    """A tokenizer saved by Hugging Face `save_pretrained` in a local directory.

    As in Megatron, `tokenize` adds the tokenizer's own special tokens (e.g. Llama's BOS) and
    the end-of-document token is its EOS token.
    """

    def __init__(self, model_dir: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError("HuggingFaceTokenizer needs the transformers package: "
                              "pip install transformers") from e
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"--tokenizer-model {model_dir} is not a directory; pass a local "
                                    f"directory written by the tokenizer's save_pretrained()")
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self._tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {model_dir} has no EOS token to end documents with; "
                             f"set eos_token in its tokenizer_config.json")
        self.eod = int(self._tokenizer.eos_token_id)
        self.vocab_size = len(self._tokenizer)
        self.description = f"HuggingFaceTokenizer({os.path.abspath(model_dir)})"

    def tokenize(self, text: str) -> List[int]:
        return list(self._tokenizer(text).input_ids)

    def detokenize(self, ids: List[int]) -> str:
        return self._tokenizer.decode(ids)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE from a vocab.json and merges.txt, as Megatron's GPT2BPETokenizer.

    Text is split by GPT-2's regular expression, each piece mapped byte by byte to unicode
    characters, and adjacent symbols merged greedily by merge rank.
    """

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str):
        try:
            import regex
        except ImportError as e:
            raise ImportError("GPT2BPETokenizer needs the regex package (for unicode classes): "
                              "pip install regex") from e
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path or not os.path.isfile(path):
                raise FileNotFoundError(f"GPT2BPETokenizer needs {flag}; {path!r} is not a file")
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder: Dict[str, int] = json.load(f)
        self.decoder = {i: t for t, i in self.encoder.items()}
        with open(merge_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        if self.EOD_TOKEN not in self.encoder:
            raise ValueError(f"{vocab_file} has no {self.EOD_TOKEN} token to end documents with")
        self.eod = self.encoder[self.EOD_TOKEN]
        self.vocab_size = len(self.encoder)
        self.description = f"GPT2BPETokenizer({os.path.abspath(vocab_file)},{os.path.abspath(merge_file)})"
        self._pattern = regex.compile(GPT2_PATTERN)
        self._byte_encoder = _bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._cache: Dict[str, Tuple[str, ...]] = {}

    def _bpe(self, word: str) -> Tuple[str, ...]:
        if word in self._cache:
            return self._cache[word]
        symbols = tuple(word)
        while len(symbols) > 1:
            pairs = set(zip(symbols[:-1], symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = tuple(merged)
        self._cache[word] = symbols
        return symbols

    def tokenize(self, text: str) -> List[int]:
        ids = []
        for piece in self._pattern.findall(text):
            word = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(word))
        return ids

    def detokenize(self, ids: List[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self._byte_decoder[c] for c in text).decode("utf-8", errors="replace")


def build_tokenizer(data_cfg, vocab_size: Optional[int] = None):
    """The tokenizer that `data_cfg.tokenizer_type` names.

    `vocab_size` (--vocab-size) sizes NullTokenizer; the other tokenizers bring their own
    vocabulary, and a different --vocab-size for them is an error.
    """
    kind = data_cfg.tokenizer_type
    if kind == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("NullTokenizer needs --vocab-size (the number of ids before the eod token)")
        return NullTokenizer(vocab_size)
    if kind == "ByteLevelTokenizer":
        tokenizer = ByteLevelTokenizer()
    elif kind == "HuggingFaceTokenizer":
        if not data_cfg.tokenizer_model:
            raise ValueError("HuggingFaceTokenizer needs --tokenizer-model DIR (a local directory "
                             "written by save_pretrained)")
        tokenizer = HuggingFaceTokenizer(data_cfg.tokenizer_model)
    elif kind == "GPT2BPETokenizer":
        tokenizer = GPT2BPETokenizer(data_cfg.vocab_file, data_cfg.merge_file)
    else:
        raise ValueError(f"unknown --tokenizer-type {kind}; choose ByteLevelTokenizer, "
                         f"HuggingFaceTokenizer, GPT2BPETokenizer or NullTokenizer")
    if vocab_size is not None and vocab_size != tokenizer.vocab_size:
        raise ValueError(f"--vocab-size {vocab_size} disagrees with {kind}, which has "
                         f"{tokenizer.vocab_size} tokens; drop --vocab-size (it is for NullTokenizer)")
    return tokenizer
