"""Checkpoint files in torch.save's format, written and read at the disk's bandwidth.

A file is the zip archive torch.save writes (`<name>/data.pkl`, `<name>/byteorder`,
`<name>/data/<key>` per storage, `<name>/version`), stored uncompressed, so torch.load,
torch.load(mmap=True) and megatron_lite.tools.inspect_checkpoint read it as before. What differs from
torch.save: the whole layout (headers, offsets, the pickle) is computed before any tensor byte
is copied, so fastio writes the file in parallel chunks straight from the tensors' devices; the
zip's per-record CRC fields are 0 (as with torch.serialization.set_crc32_options(False)), since
the CRC-32 of the whole file, recorded in metadata.json, covers every byte; and a tensor that
views part of a larger storage writes only the bytes it views.

Storages: tensors are grouped by the storage they view; each group's viewed byte ranges are
merged where they overlap, and every merged range becomes one record. Tensors that share bytes
therefore share a storage again after loading, and a shard of a large flat buffer costs only its
own bytes. Two tensors viewing the same bytes as different dtypes cannot be saved (as with
torch.save).

Loading (storage.load_file) reads the file once into memory with its checksum (fastio.read_file),
parses the zip's central directory and unpickles data.pkl with torch's weights-only unpickler;
every storage is a window of that memory (torch.frombuffer), so no byte is copied again. The
memory is freed (in the background) when the last tensor of the file is.
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import _weights_only_unpickler

from megatron_lite.checkpoint.io.fastio import Segment, write_segments

RECORD_ALIGN = 64           # tensor data starts at a multiple of this (torch.save's alignment; enough for mmap)
_ZIP64_LIMIT = 0xFFFFFFFF   # sizes and offsets at or above this go to the zip64 extra field
_LOCAL, _CENTRAL, _END, _END64, _LOCATOR64 = 0x04034B50, 0x02014B50, 0x06054B50, 0x06064B50, 0x07064B50
_UTF8_NAMES = 0x800
_DOS_DATE_1980 = 0x21
_PADDING_EXTRA_ID = 0x4246  # "FB": the padding field torch.save uses


class TorchFileError(ValueError):
    """The file is not a zip archive of torch.save's kind."""


@dataclass
class _Record:
    name: str
    data: object              # bytes, or a 1-D uint8 tensor over the bytes to write
    size: int
    header_offset: int = 0
    data_offset: int = 0


class _StorageRef:
    """A record of tensor bytes, pickled as torch.save pickles a storage."""

    def __init__(self, key: str, dtype: torch.dtype, nbytes: int) -> None:
        self.key, self.dtype = key, dtype
        self.numel = nbytes // torch._utils._element_size(dtype)
        self.storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


def _tensors_in(obj, out: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """Every distinct tensor object in the containers of `obj`, in pickling order."""
    if isinstance(obj, torch.Tensor):
        out.setdefault(id(obj), obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_in(v, out)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _tensors_in(v, out)
    return out


def _element_span(t: torch.Tensor) -> int:
    """How many elements of its storage `t` reaches from its storage offset (strides are never negative)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def _plan_storages(tensors: List[torch.Tensor]) -> Tuple[List[Tuple[_StorageRef, torch.Tensor]], Dict[int, tuple]]:
    """(records as (ref, uint8 source), {id(tensor): _rebuild_tensor_v2 arguments})."""
    groups: Dict[tuple, List[torch.Tensor]] = collections.defaultdict(list)
    for t in tensors:
        groups[(t.device, t.untyped_storage()._cdata)].append(t)
    records, rebuild = [], {}
    for members in groups.values():
        dtypes = {t.dtype for t in members}
        if len(dtypes) > 1:
            raise ValueError(f"tensors of dtypes {sorted(map(str, dtypes))} view the same storage; a checkpoint "
                             f"stores one dtype per storage: save a .clone() of one of them")
        es = members[0].element_size()
        ranges = sorted((t.storage_offset(), t.storage_offset() + _element_span(t), i) for i, t in enumerate(members))
        merged: List[List] = []     # [lo, hi, member indices]
        for lo, hi, i in ranges:
            if hi == lo or not merged or lo >= merged[-1][1] or merged[-1][1] == merged[-1][0]:
                merged.append([lo, hi, [i]])
            else:
                merged[-1][1] = max(merged[-1][1], hi)
                merged[-1][2].append(i)
        for lo, hi, indices in merged:
            ref = _StorageRef(str(len(records)), members[0].dtype, (hi - lo) * es)
            storage = members[0].untyped_storage()
            source = torch.empty(0, dtype=torch.uint8, device=members[0].device).set_(storage, lo * es, ((hi - lo) * es,))
            records.append((ref, source))
            for i in indices:
                t = members[i]
                rebuild[id(t)] = (ref, t.storage_offset() - lo, tuple(t.shape), t.stride(), False,
                                  collections.OrderedDict())
    return records, rebuild


class _Pickler(pickle.Pickler):
    """torch.save's pickle of `obj`, with tensors pointing at the planned records."""

    def __init__(self, f, rebuild: Dict[int, tuple]) -> None:
        super().__init__(f, protocol=2)
        self._rebuild = rebuild

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            return torch._utils._rebuild_tensor_v2, self._rebuild[id(obj)]
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return "storage", obj.storage_type, obj.key, "cpu", obj.numel
        return None


# ---- zip structures ---------------------------------------------------------------------------

def _zip64_extra(values: List[int]) -> bytes:
    return struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""


def _local_header(rec: _Record, offset: int) -> bytes:
    """The local header of `rec` at `offset`, padded so that the data starts at a multiple of RECORD_ALIGN."""
    big = rec.size >= _ZIP64_LIMIT
    name = rec.name.encode()
    extra = _zip64_extra([rec.size, rec.size] if big else [])
    pad = -(offset + 30 + len(name) + len(extra)) % RECORD_ALIGN
    if 0 < pad < 4:
        pad += RECORD_ALIGN
    if pad:
        extra += struct.pack("<HH", _PADDING_EXTRA_ID, pad - 4) + bytes(pad - 4)
    size32 = 0xFFFFFFFF if big else rec.size
    return struct.pack("<IHHHHHIIIHH", _LOCAL, 45 if big else 20, _UTF8_NAMES, 0, 0, _DOS_DATE_1980, 0,
                       size32, size32, len(name), len(extra)) + name + extra


def _central_directory(records: List[_Record], offset: int) -> bytes:
    out = io.BytesIO()
    for rec in records:
        name = rec.name.encode()
        wide = [rec.size, rec.size] if rec.size >= _ZIP64_LIMIT else []
        if rec.header_offset >= _ZIP64_LIMIT:
            wide.append(rec.header_offset)
        extra = _zip64_extra(wide)
        size32 = 0xFFFFFFFF if rec.size >= _ZIP64_LIMIT else rec.size
        offset32 = 0xFFFFFFFF if rec.header_offset >= _ZIP64_LIMIT else rec.header_offset
        out.write(struct.pack("<IHHHHHHIIIHHHHHII", _CENTRAL, 45, 45 if wide else 20, _UTF8_NAMES, 0, 0,
                              _DOS_DATE_1980, 0, size32, size32, len(name), len(extra), 0, 0, 0, 0, offset32))
        out.write(name + extra)
    cd = out.getvalue()
    end = b""
    count, cd_end = len(records), offset + len(cd)
    if count >= 0xFFFF or len(cd) >= _ZIP64_LIMIT or offset >= _ZIP64_LIMIT:
        end += struct.pack("<IQHHIIQQQQ", _END64, 44, 45, 45, 0, 0, count, count, len(cd), offset)
        end += struct.pack("<IIQI", _LOCATOR64, 0, cd_end, 1)
    end += struct.pack("<IHHHHIIH", _END, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                       min(len(cd), 0xFFFFFFFF), min(offset, 0xFFFFFFFF), 0)
    return cd + end


def plan_torch_file(obj, archive_name: str) -> Tuple[List[Segment], int]:
    """(segments that tile the file, its size): torch.save's archive of `obj`, nothing copied yet."""
    tensors = list(_tensors_in(obj, {}).values())
    storages, rebuild = _plan_storages(tensors)
    pickled = io.BytesIO()
    _Pickler(pickled, rebuild).dump(obj)
    records = [_Record(f"{archive_name}/data.pkl", pickled.getvalue(), len(pickled.getvalue())),
               _Record(f"{archive_name}/byteorder", sys.byteorder.encode(), len(sys.byteorder))]
    records += [_Record(f"{archive_name}/data/{ref.key}", src, src.numel()) for ref, src in storages]
    records.append(_Record(f"{archive_name}/version", b"3\n", 2))
    segments, offset = [], 0
    for rec in records:
        header = _local_header(rec, offset)
        rec.header_offset, rec.data_offset = offset, offset + len(header)
        segments.append(Segment(offset, header))
        if rec.size:
            segments.append(Segment(rec.data_offset, rec.data))
        offset = rec.data_offset + rec.size
    segments.append(Segment(offset, _central_directory(records, offset)))
    return segments, offset + segments[-1].size


def write_torch_file(path: str, obj) -> Tuple[int, int]:
    """Write `obj` (containers of tensors on any device, numbers, strings) to `path` durably; (size, crc32)."""
    archive = os.path.splitext(os.path.basename(path))[0] or "archive"
    segments, size = plan_torch_file(obj, archive)
    return size, write_segments(path, segments, size)


# ---- reading ----------------------------------------------------------------------------------

def _zip64_values(extra: bytes, wanted: int) -> List[int]:
    pos = 0
    while pos + 4 <= len(extra):
        field_id, length = struct.unpack_from("<HH", extra, pos)
        if field_id == 1:
            return list(struct.unpack_from(f"<{wanted}Q", extra, pos + 4))
        pos += 4 + length
    raise TorchFileError("a zip64 field is missing")


def zip_records(buf) -> Dict[str, Tuple[int, int]]:
    """{record name: (data offset, size)} of the stored (uncompressed) zip archive in `buf`."""
    size = len(buf)
    tail_start = max(0, size - (22 + 0xFFFF))
    end = bytes(buf[tail_start:size]).rfind(struct.pack("<I", _END))
    if end < 0:
        raise TorchFileError("no end-of-central-directory record: not a zip archive, or cut short")
    end += tail_start
    _, _, _, _, count, cd_size, cd_offset, _ = struct.unpack_from("<IHHHHIIH", buf, end)
    if end >= 20 and struct.unpack_from("<I", buf, end - 20)[0] == _LOCATOR64:
        end64 = struct.unpack_from("<IIQI", buf, end - 20)[2]
        count, _, cd_size, cd_offset = struct.unpack_from("<QQQQ", buf, end64 + 24)
    records, pos = {}, cd_offset
    for _ in range(count):
        (sig, _, _, _, method, _, _, _, csize, usize, name_len, extra_len, comment_len, _, _, _,
         offset) = struct.unpack_from("<IHHHHHHIIIHHHHHII", buf, pos)
        if sig != _CENTRAL:
            raise TorchFileError(f"damaged central directory at byte {pos}")
        name = bytes(buf[pos + 46:pos + 46 + name_len]).decode()
        extra = bytes(buf[pos + 46 + name_len:pos + 46 + name_len + extra_len])
        wide = [v for v in (usize, csize, offset) if v == 0xFFFFFFFF]
        if wide:
            values = _zip64_values(extra, len(wide))
            usize = values.pop(0) if usize == 0xFFFFFFFF else usize
            csize = values.pop(0) if csize == 0xFFFFFFFF else csize
            offset = values.pop(0) if offset == 0xFFFFFFFF else offset
        if method != 0 or csize != usize:
            raise TorchFileError(f"record {name} is compressed; checkpoint files store their records uncompressed")
        local_name_len, local_extra_len = struct.unpack_from("<HH", buf, offset + 26)
        data = offset + 30 + local_name_len + local_extra_len
        if struct.unpack_from("<I", buf, offset)[0] != _LOCAL or data + usize > size:
            raise TorchFileError(f"record {name} lies outside the file")
        records[name] = (data, usize)
        pos += 46 + name_len + extra_len + comment_len
    return records


def unpickle_torch_file(buf: Union[mmap.mmap, memoryview]) -> object:
    """The object saved in the torch.save archive held in `buf`, every storage a window of `buf`.

    Uses torch's weights-only unpickler: a file that would run code is refused with
    pickle.UnpicklingError.
    """
    records = zip_records(buf)
    pickle_name = next((n for n in records if n.endswith("/data.pkl") and n.count("/") == 1), None)
    if pickle_name is None:
        raise TorchFileError("the archive has no data.pkl: it was not written by torch.save")
    prefix = pickle_name[:-len("data.pkl")]
    swap = prefix + "byteorder" in records and _record_bytes(buf, records[prefix + "byteorder"]) != \
        sys.byteorder.encode()
    storages: Dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id):
        _, storage_type, key, _, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if key not in storages:
            offset, size = records[f"{prefix}data/{key}"]
            nbytes = numel * torch._utils._element_size(dtype)
            if nbytes > size:
                raise TorchFileError(f"storage {key} needs {nbytes} bytes but its record holds {size}")
            untyped = (torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).untyped_storage()
                       if nbytes else torch.UntypedStorage(0))
            if swap:
                untyped.byteswap(dtype)
            storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return storages[key]

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(_record_bytes(buf, records[pickle_name])),
                                                   encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        return unpickler.load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"Weights only load failed: the file holds something other than tensors, "
                                     f"numbers, strings and containers of them, which a checkpoint never does: "
                                     f"{e}") from e


def pickle_problem(buf: Union[mmap.mmap, memoryview]) -> Optional[str]:
    """Why the loader would refuse the archive in `buf`, found without touching a tensor byte: its
    pickle runs through the same weights-only unpickler with every storage on the meta device.
    None for a file the loader reads."""
    try:
        records = zip_records(buf)
        pickle_name = next((n for n in records if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if pickle_name is None:
            return "is not a torch.save archive (no data.pkl)"

        def persistent_load(saved_id):
            _, storage_type, _, _, numel = saved_id
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
            untyped = torch.UntypedStorage(numel * torch._utils._element_size(dtype), device="meta")
            return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

        unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(_record_bytes(buf, records[pickle_name])),
                                                       encoding="utf-8")
        unpickler.persistent_load = persistent_load
        unpickler.load()
    except pickle.UnpicklingError as e:
        return (f"holds something other than tensors, numbers, strings and containers of them (code, or "
                f"objects a checkpoint never holds), so it is refused unpickled: {str(e).split('. ')[0]}")
    except Exception as e:   # a damaged archive, whatever the parser meets first
        return f"is not a readable torch.save archive ({e.__class__.__name__}: {e})"
    return None


def file_pickle_problem(path: str) -> Optional[str]:
    """`pickle_problem` of the file at `path`, reading only its directory and its pickle."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return "is empty"
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return pickle_problem(buf)


def _record_bytes(buf, record: Tuple[int, int]) -> bytes:
    offset, size = record
    return bytes(buf[offset:offset + size])

