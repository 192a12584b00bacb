"""Untrusted Hugging Face weight files: every malformed safetensors header and every .bin that needs
more than tensors stops the convert tool with one line naming the file and the tensor, before anything is
allocated or written."""

import json
import os
import struct

import pytest
import torch

from megatron_lite.checkpoint.hf.io import MAX_HEADER_BYTES, HFFileError, SafetensorsFile, load_bin, write_safetensors
from tests.unit_tests.checkpoint.test_convert_ckpt import convert_tool, hf_model, save_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    save_hf(hf_model("gpt2"), "gpt2", str(d))
    return d


def _rewrite(path, header=None, raw_header=None, data=None, length=None):
    """A safetensors file with the given header (dict, or raw bytes) and data bytes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        old_header, old_data = json.loads(f.read(n)), f.read()
    text = raw_header if raw_header is not None else json.dumps(header if header is not None else old_header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text) if length is None else length) + text)
        f.write(old_data if data is None else data)
    return old_header


def _convert(src, dst, capsys):
    code = convert_tool().main(["--loader", "hf", "--saver", "megatron_lite", "--load-dir", str(src),
                                "--save-dir", str(dst)])
    err = capsys.readouterr().err.strip()
    return code, err


def _damaged_copy(hf_dir, tmp_path, edit):
    import shutil
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    path = d / "model.safetensors"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    edit(path, header)
    return d


def _names(header):
    return sorted(k for k in header if k != "__metadata__")


CASES = {
    "negative offset": (lambda p, h: _rewrite(p, {**h, _names(h)[0]: {**h[_names(h)[0]], "data_offsets":
                                                  [-4, h[_names(h)[0]]["data_offsets"][1]]}}),
                        "data_offsets [-4,"),
    "overlapping": (lambda p, h: _rewrite(p, {**h, _names(h)[1]: {**h[_names(h)[1]], "data_offsets":
                                               h[_names(h)[0]]["data_offsets"], "shape": h[_names(h)[0]]["shape"],
                                               "dtype": h[_names(h)[0]]["dtype"]}}), "overlap"),
    "huge shape": (lambda p, h: _rewrite(p, {**h, _names(h)[0]: {**h[_names(h)[0]], "shape": [2 ** 40, 2 ** 20]}}),
                   "expected); the file is damaged"),
    "unknown dtype": (lambda p, h: _rewrite(p, {**h, _names(h)[0]: {**h[_names(h)[0]], "dtype": "F7"}}),
                      "has dtype 'F7'"),
    "list header": (lambda p, h: _rewrite(p, raw_header=b"[1, 2, 3]"), "the header is a JSON list"),
    "header longer than the file": (lambda p, h: _rewrite(p, length=2 ** 40), "does not fit the file"),
    "not JSON": (lambda p, h: _rewrite(p, raw_header=b"{not json"), "the header is not JSON"),
    "seven bytes": (lambda p, h: open(p, "wb").write(b"\x00" * 7), "is 7 bytes"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_safetensors_file_is_one_line_naming_it(case, hf_dir, tmp_path, capsys):
    edit, message = CASES[case]
    src = _damaged_copy(hf_dir, tmp_path, edit)
    code, err = _convert(src, tmp_path / "out", capsys)
    assert code != 0 and message in err and "model.safetensors" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_offsets_are_checked_before_anything_is_allocated(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    write_safetensors(str(path), {"w": torch.zeros(4, 4)})
    _rewrite(path, {"w": {"dtype": "F32", "shape": [2 ** 40, 2 ** 20], "data_offsets": [0, 64]}})
    monkeypatch.setattr(torch, "empty", lambda *a, **k: pytest.fail("allocated before checking"))
    with pytest.raises(HFFileError, match="'w' has 64 bytes for F32"):
        SafetensorsFile(str(path))
    assert MAX_HEADER_BYTES == 100_000_000


def test_an_intact_file_still_reads(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(3, dtype=torch.bfloat16), "e": torch.zeros(0)}
    write_safetensors(str(path), tensors)
    f = SafetensorsFile(str(path))
    for k, v in tensors.items():
        assert torch.equal(f.get_tensor(k), v)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo never",))


def test_a_bin_file_that_would_run_code_is_refused_naming_it(hf_dir, tmp_path, capsys):
    import shutil
    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    os.remove(d / "model.safetensors")
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "payload": _Evil()}, d / "pytorch_model.bin")
    with pytest.raises(HFFileError, match="pytorch_model.bin was refused: it holds objects other than tensors"):
        load_bin(str(d / "pytorch_model.bin"))
    code, err = _convert(d, tmp_path / "out", capsys)
    assert code != 0 and "pytorch_model.bin was refused" in err and len(err.splitlines()) == 1, err
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(HFFileError, match="cannot be read as a PyTorch state dict"):
        load_bin(str(d / "pytorch_model.bin"))
