"""Reading and writing Hugging Face checkpoint directories, one tensor at a time.

Read: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
`pytorch_model.bin`, or sharded `.bin` with its index. A safetensors tensor is read with
plain file reads straight into its own buffer (a memory map would keep every page read so far
in the process's resident memory); `.bin` files are loaded with torch.load(mmap=True,
weights_only=True).

Write: safetensors shards of at most `max_shard_bytes`, named as `save_pretrained` names them
(`model.safetensors`, or `model-00001-of-00003.safetensors` ... with
`model.safetensors.index.json`); memory holds one shard while it fills.

The safetensors format is small enough to read and write here (an 8-byte header length, a
JSON header, the raw little-endian bytes), so conversion needs nothing beyond torch.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
from typing import Dict, Iterable, List, Optional

import torch

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin)$|.*\.(safetensors|bin)\.index\.json$")

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit on the JSON header


class HFFileError(ValueError):
    """A Hugging Face weight file that is damaged or not what it claims: one line naming it."""


class SafetensorsFile:
    """One safetensors file: an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the tensor bytes.

    The header is checked whole before any tensor is allocated: its length fits the file, it is
    a JSON object, and every tensor has a known dtype, a shape of non-negative integers and
    offsets inside the data whose length is dtype x shape, no two tensors overlapping."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        if size < 8:
            raise HFFileError(f"{path} is {size} bytes, shorter than a safetensors header length; not a safetensors file")
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise HFFileError(f"{path}: a header of {length} bytes does not fit the file's {size} bytes "
                                  f"(limit {MAX_HEADER_BYTES}); the file is damaged or not safetensors")
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, ValueError) as e:
                raise HFFileError(f"{path}: the header is not JSON ({e}); the file is damaged") from None
        if not isinstance(header, dict):
            raise HFFileError(f"{path}: the header is a JSON {type(header).__name__}, not an object of tensors")
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + length
        self._check_tensors(size - self.data_start)

    def _check_tensors(self, data_bytes: int) -> None:
        spans = []
        for name, info in self.header.items():
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(info, dict):
                raise HFFileError(f"{where} is described by a {type(info).__name__}, not an object")
            dtype = info.get("dtype")
            if dtype not in _SAFETENSORS_DTYPES:
                raise HFFileError(f"{where} has dtype {dtype!r}, not one of {', '.join(_SAFETENSORS_DTYPES)}")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise HFFileError(f"{where} has shape {shape!r}, not a list of non-negative integers")
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                    or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
                raise HFFileError(f"{where} has data_offsets {offsets!r} outside the file's {data_bytes} data bytes")
            numel = 1
            for d in shape:
                numel *= d
            expected = numel * _SAFETENSORS_DTYPES[dtype].itemsize
            if offsets[1] - offsets[0] != expected:
                raise HFFileError(f"{where} has {offsets[1] - offsets[0]} bytes for {dtype} {shape} ({expected} "
                                  f"expected); the file is damaged")
            spans.append((offsets[0], offsets[1], name))
        spans.sort()
        for (_, stop, first), (start, _, second) in zip(spans, spans[1:]):
            if start < stop:
                raise HFFileError(f"{self.path}: tensors {first!r} and {second!r} overlap (bytes {start} to {stop}); "
                                  f"the file is damaged")

    def keys(self) -> List[str]:
        return list(self.header)

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self.header[name]["dtype"]]

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        start, stop = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=self.dtype(name))
        buf = _bytes_of(tensor)
        if len(buf) != stop - start:
            raise ValueError(f"{self.path}: {name} has {stop - start} bytes for shape {info['shape']}; "
                             f"the file is damaged")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + start)
            done = 0
            while done < len(buf):          # one read returns at most ~2 GB on Linux
                n = f.readinto(buf[done:])
                if not n:
                    raise ValueError(f"{self.path} ends inside {name}; the file is truncated")
                done += n
        return tensor


def load_bin(path: str) -> dict:
    """A pytorch_model.bin state dict, unpickled with weights_only (no code runs); a file that needs
    more, or is damaged, is one HFFileError naming it."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:   # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFFileError(f"{path} was refused: it holds objects other than tensors, which would run code when "
                          f"unpickled ({first[:200]}); convert it with its own library or re-save it as safetensors") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise HFFileError(f"{path} cannot be read as a PyTorch state dict ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); the file is damaged") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise HFFileError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (little-endian, as safetensors stores them)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    """One safetensors file holding `tensors` in order (the format SafetensorsFile reads)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)           # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors.values():
            f.write(_bytes_of(t.contiguous()))


class HFCheckpointReader:
    """The config and the tensors of a Hugging Face model directory, read by name on demand."""

    def __init__(self, directory: str):
        self.directory = directory
        config_path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: pass a Hugging Face model directory "
                                    f"(as written by save_pretrained) to --load-dir")
        self.config = read_json(config_path)
        self._open: Dict[str, object] = {}
        self.weight_map = self._find_weights()

    def _find_weights(self) -> Dict[str, str]:
        """{tensor name: file} from the index json, or from the single weights file."""
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            path = os.path.join(self.directory, index_name)
            if os.path.isfile(path):
                weight_map = read_json(path).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{path} has no weight_map; the index is damaged")
                return dict(weight_map)
        for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
            if os.path.isfile(os.path.join(self.directory, single)):
                return {name: single for name in self._handle(single).keys()}
        raise FileNotFoundError(f"{self.directory} holds no weights: expected {SAFETENSORS_SINGLE}, "
                                f"{SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")

    def _handle(self, file: str):
        """A SafetensorsFile, or the memory-mapped state dict of a .bin file."""
        if file not in self._open:
            path = os.path.join(self.directory, file)
            if file.endswith(".safetensors"):
                self._open[file] = SafetensorsFile(path)
            else:
                self._open[file] = load_bin(path)
        return self._open[file]

    @property
    def names(self) -> List[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.directory} has no tensor {name}")
        handle = self._handle(self.weight_map[name])
        return handle.get_tensor(name) if isinstance(handle, SafetensorsFile) else handle[name]

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor, without reading its data."""
        handle = self._handle(self.weight_map[name])
        return handle.dtype(name) if isinstance(handle, SafetensorsFile) else handle[name].dtype


class SafetensorsShardWriter:
    """Collects tensors into safetensors shards of at most `max_shard_bytes` (a larger tensor gets
    a shard of its own); `close()` names the shards and writes the index."""

    def __init__(self, directory: str, max_shard_bytes: int):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: List[List[str]] = []       # tensor names of each written shard
        self.total_bytes = 0

    def _shard_path(self, i: int) -> str:
        return os.path.join(self.directory, f"shard-{i:05d}.safetensors.part")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffered += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        write_safetensors(self._shard_path(len(self._shards)), self._buffer)
        self._shards.append(list(self._buffer))
        self._buffer, self._buffered = {}, 0

    def close(self) -> List[str]:
        """Write the last shard, give every shard its final name, write the index; the file names."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        names = [SAFETENSORS_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self._shard_path(i), os.path.join(self.directory, name))
        if n > 1:
            weight_map = {t: names[i] for i, tensors in enumerate(self._shards) for t in tensors}
            write_json(os.path.join(self.directory, SAFETENSORS_INDEX),
                       {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return names


def copy_files(src: str, dst: str, *, weights: bool, skip: Iterable[str] = ()) -> List[str]:
    """Copy the plain files of `src` (not subdirectories) into `dst`: all of them, or with
    weights=False everything but the weight files and their indexes (config, tokenizer,
    generation config, ...). Returns the names copied."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name in skip or (not weights and WEIGHT_FILE.fullmatch(name)):
            continue
        shutil.copy2(path, os.path.join(dst, name))
        copied.append(name)
    return copied


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes (decimal units, as save_pretrained)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 5GB, 500MB or 1000000")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def tokenizer_files(directory: Optional[str]) -> List[str]:
    """The tokenizer files a Hugging Face directory holds (empty when none or no directory)."""
    if not directory or not os.path.isdir(directory):
        return []
    known = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
             "special_tokens_map.json", "added_tokens.json")
    return [n for n in known if os.path.isfile(os.path.join(directory, n))]
