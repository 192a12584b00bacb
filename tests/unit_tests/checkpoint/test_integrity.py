"""Integrity checks: every kind of damage is found and named, and the inspect tool reports it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import zlib

import pytest
import torch

from megatron_lite.checkpoint.io import fastio
from megatron_lite.checkpoint.io.integrity import (FORMAT_VERSION, CheckpointIntegrityError, checksum_file, read_metadata,
                                                verify_checkpoint)
from megatron_lite.checkpoint.recovery import choose_checkpoint
from megatron_lite.checkpoint.io.layout import distrib_optim_shard_path, model_shard_path, tmp_dir_name
from megatron_lite.checkpoint.io.storage import load_file, save_files
from megatron_lite.tools import inspect_checkpoint
from tests.unit_tests.checkpoint.test_storage import MODEL, save_tiny


def flip_byte(path, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def truncate(path, keep: int = 64) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


@pytest.fixture
def ckpt(tmp_path):
    save_tiny(tmp_path, 1)
    return tmp_path / "iter_0000001"


def test_checksum_file_is_the_crc32_of_the_bytes(tmp_path):
    data = os.urandom(9 << 20)   # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert checksum_file(str(tmp_path / "f")) == (len(data), f"{zlib.crc32(data):08x}")


def test_an_intact_checkpoint_has_no_problems(ckpt):
    assert verify_checkpoint(str(ckpt), deep=True) == []
    assert verify_checkpoint(str(ckpt), deep=False) == []


def test_a_truncated_shard_is_found_by_its_size_without_reading_it(ckpt):
    size = (ckpt / MODEL).stat().st_size
    truncate(ckpt / MODEL)
    expected = [f"{MODEL} is truncated: 64 bytes on disk, {size} in metadata.json"]
    assert verify_checkpoint(str(ckpt), deep=False) == expected
    assert verify_checkpoint(str(ckpt), deep=True) == expected


def test_a_flipped_byte_is_found_by_the_checksum(ckpt):
    recorded = read_metadata(str(ckpt))["files"][MODEL]["checksum"]
    flip_byte(ckpt / MODEL)
    assert verify_checkpoint(str(ckpt), deep=False) == []          # same size: only the checksum can tell
    on_disk = checksum_file(str(ckpt / MODEL))[1]
    assert verify_checkpoint(str(ckpt), deep=True) == [
        f"{MODEL} failed its crc32 checksum: {on_disk} on disk, {recorded} in metadata.json (the file is corrupted)"]


@pytest.mark.parametrize("damage, problem", [
    (lambda p: flip_byte(p, offset=p.stat().st_size - 40), "failed its crc32 checksum"),   # in the zip directory
    (lambda p: flip_byte(p, offset=200), "failed its crc32 checksum"),                     # in the pickle
    (truncate, "is truncated: 64 bytes on disk"),
], ids=["flipped-directory-byte", "flipped-pickle-byte", "truncated"])
def test_load_file_raises_the_integrity_error_and_returns_nothing_for_a_damaged_file(ckpt, damage, problem):
    damage(ckpt / MODEL)
    with pytest.raises(CheckpointIntegrityError, match=f"{MODEL} {problem}.*checkpoint .*iter_0000001 is damaged"):
        load_file(str(ckpt.parent), 1, MODEL)


def test_a_flipped_tensor_byte_is_an_integrity_error_although_the_file_still_parses(tmp_path):
    save_files(str(tmp_path), 1, {MODEL: {"w": torch.zeros(4096)}}, None, None)
    path = tmp_path / "iter_0000001" / MODEL
    data = path.read_bytes()
    flip_byte(path, offset=data.index(bytes(4096)) + 1000)
    with pytest.raises(CheckpointIntegrityError, match="failed its crc32 checksum"):
        load_file(str(tmp_path), 1, MODEL)


def test_choosing_a_checkpoint_reads_the_model_file_once_for_the_loader(ckpt, monkeypatch):
    reads = []
    real_read = fastio.read_file
    monkeypatch.setattr(fastio, "read_file", lambda path, **kw: (reads.append(kw.get("keep", True)),
                                                                  real_read(path, **kw))[1])
    plan = choose_checkpoint(str(ckpt.parent))
    assert [v.path for v in plan.verified_files] == [str(ckpt / MODEL)]
    expected = torch.load(ckpt / MODEL, weights_only=True)
    loaded = load_file(str(ckpt.parent), 1, MODEL, verified=plan.verified_files)
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert reads == [True]                                   # verified while read, then taken from memory
    assert plan.verified_files[0].buffer is None             # the plan no longer holds the bytes
    load_file(str(ckpt.parent), 1, MODEL, verified=plan.verified_files)
    assert reads == [True, True]                             # once only: a second load reads again
    load_file(str(ckpt.parent), 1, MODEL)
    assert reads == [True, True, True]                       # no decision, no kept buffer: read from disk


def test_a_file_replaced_after_it_was_verified_is_read_and_checked_again(ckpt):
    plan = choose_checkpoint(str(ckpt.parent))
    assert len(plan.verified_files) == 1
    flip_byte(ckpt / MODEL)
    with pytest.raises(CheckpointIntegrityError, match="failed its crc32 checksum"):
        load_file(str(ckpt.parent), 1, MODEL, verified=plan.verified_files)


def test_a_missing_shard_is_found(ckpt):
    os.remove(ckpt / MODEL)
    assert verify_checkpoint(str(ckpt)) == [f"{MODEL} is missing"]


def test_a_directory_without_metadata_json_is_not_committed(ckpt):
    os.remove(ckpt / "metadata.json")
    [problem] = verify_checkpoint(str(ckpt))
    held = ", ".join(sorted(os.listdir(ckpt)))
    assert problem == (f"{ckpt} has no metadata.json and is in none of Megatron-LM's formats either (it holds "
                       f"{held}): it was never committed (the save did not finish) or the file was deleted")


def test_a_directory_with_its_temporary_name_is_incomplete(ckpt):
    tmp = ckpt.parent / tmp_dir_name(1)
    os.rename(ckpt, tmp)
    assert verify_checkpoint(str(tmp)) == [
        "incomplete: iter_0000001.tmp still has its temporary name, so the save did not finish"]


def test_a_renamed_copy_is_found_by_its_iteration(ckpt):
    shutil.copytree(ckpt, ckpt.parent / "iter_0000002")
    assert verify_checkpoint(str(ckpt.parent / "iter_0000002")) == [
        "metadata.json says iter_0000001 but the directory is named iter_0000002: it was renamed or copied; "
        "rename it back"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=FORMAT_VERSION + 1), "upgrade megatron_lite to load it"),
    (lambda m: m.pop("files"), "is damaged: it has no 'files' table"),
])
def test_unreadable_metadata_is_named(ckpt, edit, message):
    meta = read_metadata(str(ckpt))
    edit(meta)
    (ckpt / "metadata.json").write_text(json.dumps(meta))
    [problem] = verify_checkpoint(str(ckpt))
    assert message in problem


def test_damaged_json_is_named(ckpt):
    (ckpt / "metadata.json").write_text('{"format_version": 1, "fil')
    [problem] = verify_checkpoint(str(ckpt))
    assert problem.startswith(f"{ckpt / 'metadata.json'} is damaged: ")


# ---- megatron_lite.tools.inspect_checkpoint ------------------------------------------------

def _run_inspect(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = inspect_checkpoint.main(list(argv))
    return status, out.getvalue()


def test_inspect_reports_layout_config_holdings_and_size(tmp_path):
    files = {model_shard_path(t, 0): {"model": {"w": torch.ones(2, 3)}, "opt_param_scheduler": {"num_steps": 1},
                                      "rng_state": [{"torch": torch.zeros(4, dtype=torch.uint8)}], "iteration": 3}
             for t in range(2)}
    files.update({distrib_optim_shard_path(t, 0, d): {"exp_avg": torch.zeros(3)} for t in range(2) for d in range(2)})
    metadata = {"config": {"model": {"num_layers": 2, "hidden_size": 8}}, "mode": "pretrain"}
    save_files(str(tmp_path), 3, files, None, metadata)
    status, out = _run_inspect(str(tmp_path), "--json")
    [info] = json.loads(out)["checkpoints"]
    assert status == 0 and info["intact"]
    assert info["holds"] == ["weights", "LR scheduler", "RNG", "optimizer"]
    assert (info["model_tensors"], info["model_elements"], info["distributed_optimizer_shards"]) == (2, 12, 4)
    assert info["layout"]["tensor_model_parallel_size"] == 2 and info["layout"]["data_parallel_size"] == 2
    assert info["model_config"] == {"num_layers": 2, "hidden_size": 8}
    assert (info["other_keys"], info["other_metadata"]) == (["iteration"], ["mode"])
    meta = read_metadata(str(tmp_path / "iter_0000003"))
    assert info["total_bytes"] == sum(e["size"] for e in meta["files"].values())
    assert json.loads(out)["tracker"] == "iter_0000003"


def test_inspect_exits_1_and_names_the_damage(tmp_path):
    save_tiny(tmp_path, 1)
    save_tiny(tmp_path, 2)
    os.makedirs(tmp_path / tmp_dir_name(3))
    flip_byte(tmp_path / "iter_0000001" / MODEL)
    status, out = _run_inspect(str(tmp_path))
    assert status == 1
    assert f"{MODEL} failed its crc32 checksum" in out and "integrity      FAILED" in out
    assert "iter_0000003.tmp: leftover of a save that did not finish" in out
    assert _run_inspect(str(tmp_path / "iter_0000002"))[0] == 0
    assert _run_inspect(str(tmp_path / tmp_dir_name(3)))[0] == 1
