"""Tokenizers: byte-level (the default, needs no files), Hugging Face, GPT-2 BPE, null,
Megatron's TikTokenizer, and SentencePiece as GPTSentencePieceTokenizer and Llama2Tokenizer.

Each has `vocab_size` (unpadded), `eod`, `tokenize(str) -> list[int]`,
`detokenize(list[int]) -> str`, and `description`, a string that identifies its vocabulary
(used to key caches of data tokenized with it).
"""

from __future__ import annotations

import base64
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_lite.arguments import ConfigError


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


TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
TIKTOKEN_DEFAULT_VOCAB_SIZE = 2 ** 17
TIKTOKEN_REQUIRED_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def tiktoken_special_tokens(special_tokens: Optional[Sequence[str]], num_special_tokens: int) -> List[str]:
    """The ids [0, num_special_tokens): the given special tokens (default <unk> <s> </s>) in order,
    then fillers <SPECIAL_i> up to num_special_tokens, as Megatron's TikTokenizer numbers them."""
    tokens = list(special_tokens) if special_tokens else list(TIKTOKEN_REQUIRED_SPECIAL_TOKENS)
    return tokens + [f"<SPECIAL_{i}>" for i in range(len(tokens), num_special_tokens)]


def load_tiktoken_ranks(path: str, count: int) -> Dict[bytes, int]:
    """The first `count` entries of a Megatron tiktoken vocabulary as {token bytes: rank}.

    The file is a JSON list whose entry i is {"rank": i, "token_bytes": base64, "token_str": ...};
    the first 256 entries are the single bytes 0..255, the rest are merges in rank order.
    """
    with open(path, encoding="utf-8") as f:
        vocab = json.load(f)
    if not isinstance(vocab, list):
        raise ConfigError(f"--tokenizer-model {path} is not a tiktoken vocabulary (a JSON list of "
                          f"{{rank, token_bytes, token_str}}); pass the .json file of a TikTokenizer")
    if len(vocab) < count:
        raise ConfigError(f"--tokenizer-model {path} holds {len(vocab)} tokens but the vocabulary needs "
                          f"{count} (--vocab-size minus --tiktoken-num-special-tokens); pass a --vocab-size "
                          f"of at most {len(vocab)} + --tiktoken-num-special-tokens")
    ranks: Dict[bytes, int] = {}
    for i, entry in enumerate(vocab[:count]):
        token = base64.b64decode(entry["token_bytes"])
        if entry.get("rank") != i or (i < 256 and token != bytes([i])) or token in ranks:
            raise ConfigError(f"--tokenizer-model {path}: entry {i} is not rank {i} of a byte-level "
                              f"tiktoken vocabulary; the file is damaged or of another format")
        ranks[token] = i
    return ranks


class TikTokenizer:
    """Megatron's TikTokenizer: byte-level BPE from a tiktoken .json vocabulary.

    Ids [0, num_special_tokens) are the special tokens (<unk> 0, <s> 1, </s> 2 by default, then
    <SPECIAL_i> fillers); vocabulary entry r gets id r + num_special_tokens, and only the first
    vocab_size - num_special_tokens entries are used. Text is pre-split by the v1 or v2 pattern
    and encoded as ordinary text (special-token strings in it are not special); eod is </s>.
    """

    def __init__(self, path: str, pattern: str, vocab_size: Optional[int], num_special_tokens: int,
                 special_tokens: Optional[Sequence[str]]):
        try:
            import tiktoken
        except ImportError as e:
            raise ImportError("TikTokenizer needs the tiktoken package: pip install tiktoken") from e
        if not os.path.isfile(path):
            raise ConfigError(f"--tokenizer-model {path} is not a file; TikTokenizer needs its .json vocabulary")
        self.vocab_size = vocab_size or TIKTOKEN_DEFAULT_VOCAB_SIZE
        specials = tiktoken_special_tokens(special_tokens, num_special_tokens)
        ranks = load_tiktoken_ranks(path, self.vocab_size - num_special_tokens)
        special_ids = {token: i for i, token in enumerate(specials)}
        self._model = tiktoken.Encoding(
            name=Path(path).parent.name, pat_str=TIKTOKEN_PATTERNS[pattern],
            mergeable_ranks={token: rank + num_special_tokens for token, rank in ranks.items()},
            special_tokens=special_ids)
        self.unk, self.bos, self.eos = (special_ids[t] for t in TIKTOKEN_REQUIRED_SPECIAL_TOKENS)
        self.eod = self.eos
        self.pad = special_ids.get("<pad>")
        self.description = (f"TikTokenizer({os.path.abspath(path)},{pattern},{self.vocab_size},"
                            f"{num_special_tokens},{' '.join(special_tokens or TIKTOKEN_REQUIRED_SPECIAL_TOKENS)})")

    def tokenize(self, text: str) -> List[int]:
        return self._model.encode_ordinary(text)

    def detokenize(self, ids: List[int]) -> str:
        return self._model.decode([int(i) for i in ids])


class SentencePieceTokenizer:
    """A SentencePiece .model as Megatron's GPTSentencePieceTokenizer (add_bos False) or
    Llama2Tokenizer (add_bos True: every text starts with the model's BOS id).

    The vocabulary is the model's pieces; eod is the model's EOS id; bos and pad are the model's
    own ids (-1 where the model has none).
    """

    def __init__(self, model_file: str, add_bos: bool, kind: str):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(f"{kind} needs the sentencepiece package: pip install sentencepiece") from e
        if not os.path.isfile(model_file):
            raise ConfigError(f"--tokenizer-model {model_file} is not a file; {kind} needs a SentencePiece .model")
        self._model = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.add_bos = add_bos
        self.vocab_size = self._model.get_piece_size()
        self.bos, self.eos, self.pad = self._model.bos_id(), self._model.eos_id(), self._model.pad_id()
        if self.eos < 0 or (add_bos and self.bos < 0):
            missing = "EOS" if self.eos < 0 else "BOS"
            raise ConfigError(f"--tokenizer-model {model_file} has no {missing} piece, which {kind} needs; "
                              f"train the SentencePiece model with {missing.lower()}_id set")
        self.eod = self.eos
        self.description = f"{kind}({os.path.abspath(model_file)})"

    def tokenize(self, text: str) -> List[int]:
        ids = self._model.encode_as_ids(text)
        return [self.bos] + ids if self.add_bos else ids

    def detokenize(self, ids: List[int]) -> str:
        return self._model.decode_ids([int(i) for i in ids])


def build_tokenizer(data_cfg, vocab_size: Optional[int] = None):
    """The tokenizer that `data_cfg.tokenizer_type` names.

    `vocab_size` (--vocab-size) sizes NullTokenizer and TikTokenizer (special tokens included,
    default 2**17); the other tokenizers bring their own vocabulary, and a different --vocab-size
    for them is an error.
    """
    kind = data_cfg.tokenizer_type
    if kind == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("NullTokenizer needs --vocab-size (the number of ids before the eod token)")
        return NullTokenizer(vocab_size)
    if kind == "TikTokenizer":
        return TikTokenizer(data_cfg.tokenizer_model, data_cfg.tiktoken_pattern or "v2", vocab_size,
                            data_cfg.tiktoken_num_special_tokens, data_cfg.tokenizer_special_tokens)
    if kind == "ByteLevelTokenizer":
        tokenizer = ByteLevelTokenizer()
    elif kind == "HuggingFaceTokenizer":
        if not data_cfg.tokenizer_model:
            raise ValueError("HuggingFaceTokenizer needs --tokenizer-model DIR (a local directory "
                             "written by save_pretrained)")
        tokenizer = HuggingFaceTokenizer(data_cfg.tokenizer_model)
    elif kind == "GPT2BPETokenizer":
        tokenizer = GPT2BPETokenizer(data_cfg.vocab_file, data_cfg.merge_file)
    elif kind in ("GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        if not data_cfg.tokenizer_model:
            raise ConfigError(f"--tokenizer-type {kind} needs --tokenizer-model (a SentencePiece .model)")
        tokenizer = SentencePieceTokenizer(data_cfg.tokenizer_model, kind == "Llama2Tokenizer", kind)
    else:
        raise ValueError(f"unknown --tokenizer-type {kind}; choose ByteLevelTokenizer, HuggingFaceTokenizer, "
                         f"GPT2BPETokenizer, NullTokenizer, TikTokenizer, GPTSentencePieceTokenizer or "
                         f"Llama2Tokenizer")
    if vocab_size is not None and vocab_size != tokenizer.vocab_size:
        raise ValueError(f"--vocab-size {vocab_size} disagrees with {kind}, which has "
                         f"{tokenizer.vocab_size} tokens; drop --vocab-size (it is for NullTokenizer)")
    return tokenizer
