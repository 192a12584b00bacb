"""Saving checkpoints: bitwise round trips, the commit protocol, crashes mid-save, async saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_lite.checkpoint.io import async_save, fastio, torchfile
from megatron_lite.checkpoint.io.async_save import AsyncSaver, wait_for_done_markers, write_done_marker
from megatron_lite.checkpoint.io.integrity import checksum_file, with_metadata_checksum
from megatron_lite.checkpoint.io.layout import (TRACKER_FILENAME, distrib_optim_shard_path, iteration_dir_name,
                                             model_shard_path, tmp_dir_name)
from megatron_lite.checkpoint.recovery import CheckpointLoadError, choose_checkpoint
from megatron_lite.checkpoint.io.storage import CheckpointSaveError, load_file, read_metadata, save_files
from megatron_lite.parallel.state import initialize
from tests.unit_tests.dist_utils import run_distributed

MODEL = model_shard_path(0, 0)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def tiny_state(seed: int) -> dict:
    """A model_optim_rng.pt-shaped object with several dtypes."""
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16)},
            "optimizer": {"step": seed, "exp_avg": [torch.randn(4, 3, generator=g)]},
            "opt_param_scheduler": {"num_steps": 8 * seed},
            "rng_state": {"torch": torch.randint(0, 255, (16,), dtype=torch.uint8, generator=g)},
            "iteration": seed}


def save_tiny(save_dir, iteration, kind: str = "full", seed=None) -> dict:
    """Save one single-process checkpoint; return the files it holds."""
    files = {MODEL: tiny_state(iteration if seed is None else seed)}
    save_files(str(save_dir), iteration, files, None, {"config": {"model": {"hidden_size": 4}}}, kind=kind)
    return files


def assert_bitwise_equal(a, b, where="") -> None:
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tracker_text(save_dir) -> str:
    with open(os.path.join(save_dir, TRACKER_FILENAME)) as f:
        return f.read()


# ---- one process ------------------------------------------------------------------------------

def test_single_process_round_trip_is_bitwise_and_metadata_describes_the_files(tmp_path):
    shared = torch.arange(6, dtype=torch.int64)
    obj = {**tiny_state(3), "shared_a": shared, "shared_b": shared, "nested": [(1, 2.5), None, "s", True]}
    result = save_files(str(tmp_path), 7, {MODEL: obj}, initialize(), {"config": {"model": {"num_layers": 2}}})

    loaded = load_file(str(tmp_path), 7, MODEL)
    assert_bitwise_equal(obj, loaded)
    assert loaded["shared_a"].data_ptr() == loaded["shared_b"].data_ptr()
    path = tmp_path / "iter_0000007" / MODEL
    meta = read_metadata(str(tmp_path / "iter_0000007"))
    assert (meta["iteration"], meta["kind"], meta["checksum_algorithm"]) == (7, "full", "crc32")
    assert meta["layout"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                              "data_parallel_size": 1, "world_size": 1}
    assert meta["config"] == {"model": {"num_layers": 2}}
    assert meta["files"][MODEL] == {"size": path.stat().st_size, "rank": 0,
                                    "checksum": f"{zlib.crc32(read_bytes(path)):08x}"}
    assert (result.bytes_written, result.committed) == (path.stat().st_size, True)
    assert tracker_text(tmp_path) == "7"
    assert sorted(os.listdir(tmp_path)) == ["iter_0000007", TRACKER_FILENAME]


def test_a_view_is_saved_without_the_rest_of_its_storage(tmp_path):
    big = torch.arange(1_000_000, dtype=torch.float32)
    save_files(str(tmp_path), 1, {MODEL: {"shard": big[10:20]}}, None, None)
    assert (tmp_path / "iter_0000001" / MODEL).stat().st_size < 4096
    assert torch.equal(load_file(str(tmp_path), 1, MODEL)["shard"], big[10:20])


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64]


def every_kind_of_tensor() -> dict:
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, generator=g)
    shared = torch.arange(12, dtype=torch.int64)
    obj = {str(d): (torch.randn(5, 3, generator=g) * 50).to(d) for d in DTYPES}
    obj.update({"scalar": torch.tensor(2.5, dtype=torch.bfloat16), "empty": torch.empty(0, 7),
                "transposed": torch.randn(3, 5, generator=g).t(), "strided": torch.randn(50, generator=g)[::7],
                "overlap_a": flat[100:200], "overlap_b": flat[150:260].view(11, 10), "far": flat[900:910],
                "shared": shared, "shared_again": shared, "shared_view": shared.view(3, 4),
                "leaves": [1, 2.5, None, "s", (True, b"x"), torch.bfloat16, torch.Size([2, 3])]})
    return obj


def test_every_dtype_and_layout_round_trips_bitwise_through_load_file_and_torch_load(tmp_path):
    obj = every_kind_of_tensor()
    save_files(str(tmp_path), 1, {MODEL: obj}, None, None)
    path = tmp_path / "iter_0000001" / MODEL
    for loaded in (load_file(str(tmp_path), 1, MODEL), torch.load(path, weights_only=True),
                   torch.load(path, weights_only=True, mmap=True)):
        assert_bitwise_equal(obj, loaded)
        assert loaded["transposed"].stride() == (1, 5) and loaded["strided"].stride() == (7,)
        assert loaded["shared"].data_ptr() == loaded["shared_again"].data_ptr() == loaded["shared_view"].data_ptr()
        # overlapping views share one storage again; a distant view of the same buffer does not drag the gap along
        assert loaded["overlap_a"].untyped_storage().data_ptr() == loaded["overlap_b"].untyped_storage().data_ptr()
        assert loaded["far"].untyped_storage().nbytes() == 40


def test_views_of_one_storage_as_two_dtypes_are_refused_before_anything_is_written(tmp_path):
    base = torch.zeros(8)
    with pytest.raises(CheckpointSaveError, match=r"tensors of dtypes .* view the same storage"):
        save_files(str(tmp_path), 1, {MODEL: {"a": base, "b": base.view(torch.int32)}}, None, None)
    assert not (tmp_path / "iter_0000001").exists() and not (tmp_path / tmp_dir_name(1)).exists()


def test_zip64_records_are_read_by_torch_load_and_load_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torchfile, "_ZIP64_LIMIT", 16)   # every size and offset takes the zip64 path
    obj = every_kind_of_tensor()
    save_files(str(tmp_path), 1, {MODEL: obj}, None, None)
    assert_bitwise_equal(obj, load_file(str(tmp_path), 1, MODEL))
    assert_bitwise_equal(obj, torch.load(tmp_path / "iter_0000001" / MODEL, weights_only=True))


def test_a_file_written_by_torch_save_loads(tmp_path):
    save_tiny(tmp_path, 1)
    obj = every_kind_of_tensor()
    path = tmp_path / "iter_0000001" / MODEL
    torch.save(obj, path)
    meta_path = tmp_path / "iter_0000001" / "metadata.json"
    meta = read_metadata(str(tmp_path / "iter_0000001"))
    meta["files"][MODEL].update(size=path.stat().st_size, checksum=f"{zlib.crc32(read_bytes(path)):08x}")
    meta_path.write_text(json.dumps(with_metadata_checksum(meta)))   # as a writer of the new file would
    assert_bitwise_equal(obj, load_file(str(tmp_path), 1, MODEL))


@pytest.mark.parametrize("io", ["o_direct", "buffered"])
def test_chunks_written_and_read_in_parallel_give_the_crc32_of_the_file(tmp_path, monkeypatch, io):
    if io == "buffered":   # as on a filesystem that refuses O_DIRECT
        monkeypatch.delattr(fastio.os, "O_DIRECT", raising=False)
    monkeypatch.setattr(fastio, "CHUNK_BYTES", 8192)
    monkeypatch.setattr(fastio, "IO_THREADS", 3)
    data = torch.randint(0, 256, (50_001,), dtype=torch.uint8)
    segments = [fastio.Segment(0, b"head" * 1000), fastio.Segment(4000, data), fastio.Segment(54_001, b"tail")]
    crc = fastio.write_segments(str(tmp_path / "f"), segments, 54_005)
    expected = b"head" * 1000 + data.numpy().tobytes() + b"tail"
    assert read_bytes(tmp_path / "f") == expected and crc == zlib.crc32(expected)
    buffer, size, read_crc = fastio.read_file(str(tmp_path / "f"))
    assert (bytes(buffer[:size]), read_crc) == (expected, crc)
    assert fastio.read_file(str(tmp_path / "f"), keep=False) == (None, 54_005, crc)


@pytest.mark.parametrize("len1, len2", [(0, 5), (5, 0), (1, 1), (1000, 3), (3, 70_000)])
def test_crc32_combine_is_the_crc32_of_the_concatenation(len1, len2):
    a, b = os.urandom(len1), os.urandom(len2)
    assert fastio.crc32_combine(zlib.crc32(a), zlib.crc32(b), len2) == zlib.crc32(a + b)


def test_layout_is_read_from_the_shard_names_when_one_process_writes_every_rank(tmp_path):
    files = {model_shard_path(t, p): {"w": torch.ones(1)} for t in range(2) for p in range(2)}
    files.update({distrib_optim_shard_path(t, p, d): {"m": torch.ones(1)}
                  for t in range(2) for p in range(2) for d in range(3)})
    save_files(str(tmp_path), 1, files, None, None)
    assert read_metadata(str(tmp_path / "iter_0000001"))["layout"] == {
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "data_parallel_size": 3, "world_size": 12}


@pytest.mark.parametrize("files, metadata, kind, message", [
    ({MODEL: {"rng": ("MT19937", np.zeros(3))}}, None, "full",
     r"files\['mp_rank_00_000/model_optim_rng.pt'\]\['rng'\]\[1\] is a numpy.ndarray, which torch.load\(weights_only"),
    ({"../escape.pt": {}}, None, "full", r"'../escape.pt' must be a relative path"),
    ({MODEL: {}}, {"files": 1}, "full", r"metadata keys \['files'\] are written by the checkpoint itself"),
    ({MODEL: {}}, {"t": torch.ones(1)}, "full", r"metadata must be JSON"),
    ({MODEL: {}}, None, "partial", r"kind must be one of \('full', 'weights'\)"),
], ids=["numpy-value", "escaping-path", "reserved-metadata-key", "non-json-metadata", "unknown-kind"])
def test_bad_input_stops_the_save_before_anything_is_written(tmp_path, files, metadata, kind, message):
    with pytest.raises(CheckpointSaveError, match=message):
        save_files(str(tmp_path / "save"), 1, files, None, metadata, kind=kind)
    assert not (tmp_path / "save").exists()


def test_saving_an_iteration_again_replaces_it_without_leftovers(tmp_path):
    save_tiny(tmp_path, 5, seed=1)
    second = save_tiny(tmp_path, 5, seed=2)
    assert_bitwise_equal(second[MODEL], load_file(str(tmp_path), 5, MODEL))
    assert sorted(os.listdir(tmp_path)) == ["iter_0000005", TRACKER_FILENAME]


def test_weights_only_save_leaves_the_tracker_and_never_replaces_a_full_checkpoint(tmp_path):
    save_tiny(tmp_path, 1)
    save_tiny(tmp_path, 2, kind="weights")
    assert tracker_text(tmp_path) == "1"
    assert read_metadata(str(tmp_path / "iter_0000002"))["kind"] == "weights"
    with pytest.raises(CheckpointSaveError, match="already holds a full checkpoint"):
        save_tiny(tmp_path, 1, kind="weights")
    assert read_metadata(str(tmp_path / "iter_0000001"))["kind"] == "full"


def test_tracker_keeps_its_old_content_when_a_crash_hits_before_the_replace(tmp_path, monkeypatch):
    save_tiny(tmp_path, 1)
    real_replace = os.replace

    def crash_on_tracker(src, dst):
        if os.path.basename(dst) == TRACKER_FILENAME:
            raise OSError("simulated crash between writing the new tracker and renaming it")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_tracker)
    with pytest.raises(CheckpointSaveError, match="simulated crash"):
        save_tiny(tmp_path, 2)
    monkeypatch.undo()
    assert tracker_text(tmp_path) == "1"
    leftovers = list(tmp_path.glob(f".{TRACKER_FILENAME}.tmp-*"))   # this write's own temporary name
    assert len(leftovers) == 1 and read_bytes(leftovers[0]) == b"2"   # the new content was complete, not in place
    plan = choose_checkpoint(str(tmp_path))
    assert (plan.iteration, plan.reason) == (1, "tracker")


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_chosen(tmp_path):
    script = f"""
import os, signal, sys, torch
from megatron_lite.checkpoint.io import fastio, storage
state = {{"model": {{f"w{{i}}": torch.full((250_000,), float(i)) for i in range(8)}}}}   # 8 x 1 MB
storage.save_files(sys.argv[1], 1, {{{MODEL!r}: state}}, None, None)
fastio.IO_THREADS, fastio.CHUNK_BYTES = 1, 1 << 20
written = [0]
real_write = fastio._pwrite_all
def write_then_die(fd, view, offset):
    real_write(fd, view, offset)
    written[0] += len(view)
    if written[0] > 2 << 20:
        os.kill(os.getpid(), signal.SIGKILL)
fastio._pwrite_all = write_then_die
storage.save_files(sys.argv[1], 2, {{{MODEL!r}: state}}, None, None)
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    partial = tmp_path / tmp_dir_name(2) / MODEL
    assert (2 << 20) < partial.stat().st_size < (tmp_path / iteration_dir_name(1) / MODEL).stat().st_size / 2
    assert not (tmp_path / iteration_dir_name(2)).exists()
    assert tracker_text(tmp_path) == "1"

    plan = choose_checkpoint(str(tmp_path))
    assert (plan.iteration, plan.reason) == (1, "tracker")
    assert plan.rejected == [("iter_0000002.tmp",
                              "incomplete: still has its temporary name, so the save did not finish")]
    assert torch.equal(load_file(str(tmp_path), 1, MODEL)["model"]["w7"], torch.full((250_000,), 7.0))

    save_tiny(tmp_path, 2)   # the next save of that iteration starts from a clean temporary directory
    assert choose_checkpoint(str(tmp_path)).iteration == 2
    assert not (tmp_path / tmp_dir_name(2)).exists()


def test_async_commit_waits_for_every_done_marker(tmp_path):
    entries = [{f"f{r}.pt": {"size": r, "checksum": "0", "rank": r}} for r in range(2)]
    write_done_marker(str(tmp_path), 0, entries[0], None)
    with pytest.raises(CheckpointSaveError, match=r"ranks \[1\] did not finish writing"):
        wait_for_done_markers(str(tmp_path), 2, timeout_s=0.05)
    write_done_marker(str(tmp_path), 1, entries[1], None)
    assert wait_for_done_markers(str(tmp_path), 2, timeout_s=0.05) == entries
    assert os.listdir(tmp_path) == []

    write_done_marker(str(tmp_path), 1, None, "rank 1 could not write its files: disk full")
    with pytest.raises(CheckpointSaveError, match="rank 1 could not write its files: disk full"):
        wait_for_done_markers(str(tmp_path), 2, timeout_s=60)


def test_async_save_snapshots_at_once_and_writes_the_same_bytes_as_a_sync_save(tmp_path, monkeypatch):
    obj = {**tiny_state(4), "transposed": torch.arange(12.0).reshape(3, 4).t(), "view": torch.arange(100.0)[10:20]}
    save_files(str(tmp_path), 1, {MODEL: obj}, None, None)
    trained, real_write = threading.Event(), async_save.write_files
    monkeypatch.setattr(async_save, "write_files", lambda *a: (trained.wait(60), real_write(*a))[1])
    saver = AsyncSaver()
    pending = save_files(str(tmp_path), 2, {MODEL: obj}, None, None, async_saver=saver)
    for t in obj["model"].values():
        t.add_(1)                       # training changes the tensors before the background thread writes
    trained.set()
    done = saver.finalize()
    size = (tmp_path / "iter_0000002" / MODEL).stat().st_size
    assert (pending.committed, done.committed, done.bytes_written) == (False, True, size)
    assert read_bytes(tmp_path / "iter_0000001" / MODEL) == read_bytes(tmp_path / "iter_0000002" / MODEL)
    assert tracker_text(tmp_path) == "2"
    assert saver.finalize() is None

    save_files(str(tmp_path), 3, {MODEL: obj}, None, None, async_saver=saver)
    saver.finalize()
    assert_bitwise_equal(obj, load_file(str(tmp_path), 3, MODEL))


def test_persistent_ckpt_worker_keeps_the_host_buffers_between_saves(tmp_path):
    obj = tiny_state(4)
    released, kept = AsyncSaver(), AsyncSaver(persistent=True)
    for it, saver in ((1, released), (2, kept)):
        save_files(str(tmp_path), it, {MODEL: obj}, None, None, async_saver=saver)
        saver.finalize()
    assert released._buffers == {}
    first = [b.data_ptr() for bufs in kept._buffers.values() for b in bufs]
    assert len(first) == 4   # w, b, exp_avg and the RNG state
    save_files(str(tmp_path), 3, {MODEL: obj}, None, None, async_saver=kept)   # the same buffers again
    kept.finalize()
    assert [b.data_ptr() for bufs in kept._buffers.values() for b in bufs] == first
    assert_bitwise_equal(obj, load_file(str(tmp_path), 3, MODEL))


def test_a_failed_async_write_is_raised_by_finalize_and_leaves_nothing(tmp_path, monkeypatch):
    save_tiny(tmp_path, 1)

    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(async_save, "write_files", disk_full)
    saver = AsyncSaver()
    save_files(str(tmp_path), 2, {MODEL: tiny_state(2)}, None, None, async_saver=saver)
    with pytest.raises(CheckpointSaveError, match="rank 0: No space left on device"):
        saver.finalize()
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", TRACKER_FILENAME]
    assert tracker_text(tmp_path) == "1"


# ---- four ranks: TP 2 x DP 2, one spawn for every check ----------------------------------------

def _rank_files(state) -> dict:
    g = torch.Generator().manual_seed(state.rank)
    optim_path = distrib_optim_shard_path(state.tp_rank, state.pp_rank, state.dp_rank)
    files = {optim_path: {"exp_avg": torch.randn(7, generator=g)}}
    if state.dp_rank == 0:
        files[model_shard_path(state.tp_rank, state.pp_rank)] = {"model": {"w": torch.randn(5, 3, generator=g)}}
    return files


def _four_rank_body(rank, world_size, save_dir):
    state = initialize(tensor_model_parallel_size=2)
    files, out = _rank_files(state), {}
    metadata = {"config": {"model": {"hidden_size": 8}}}
    iter_dir = lambda it: os.path.join(save_dir, iteration_dir_name(it))   # noqa: E731

    result = save_files(save_dir, 10, files, state, metadata)
    out["sync_durable_on_return"] = os.path.isfile(os.path.join(iter_dir(10), "metadata.json")) and \
        tracker_text(save_dir) == "10"
    out["sync_bytes"] = result.bytes_written
    out["mine"] = files
    out["loaded"] = {rel: load_file(save_dir, 10, rel) for rel in files}

    saver = AsyncSaver()
    pending = save_files(save_dir, 20, files, state, metadata, async_saver=saver)
    done = saver.finalize()
    out["async"] = (pending.committed, done.committed, done.bytes_written)
    out["async_same_bytes"] = all(read_bytes(os.path.join(iter_dir(10), rel)) ==
                                  read_bytes(os.path.join(iter_dir(20), rel)) for rel in files)

    # Rank 3's writer is held back: rank 0 must not commit before rank 3's files are durable.
    release, written, real_write = threading.Event(), threading.Event(), async_save.write_files
    if rank == 3:
        async_save.write_files = lambda *a: (release.wait(60), real_write(*a))[1]
    if rank == 0:
        async_save.write_files = lambda *a: (real_write(*a), written.set())[0]
    save_files(save_dir, 30, files, state, metadata, async_saver=saver)
    if rank == 0:
        written.wait(60)
        out["uncommitted_while_rank_3_writes"] = not os.path.exists(iter_dir(30)) and \
            os.path.isdir(os.path.join(save_dir, tmp_dir_name(30)))
    dist.barrier()
    release.set()
    saver.finalize()
    async_save.write_files = real_write
    meta = read_metadata(iter_dir(30))
    out["my_checksums_committed"] = all(checksum_file(os.path.join(iter_dir(30), rel))[1] ==
                                        meta["files"][rel]["checksum"] for rel in files)

    bad = {**files, "extra.pt": {"x": object()}} if rank == 2 else files
    try:
        save_files(save_dir, 40, bad, state, metadata)
        out["failure"] = None
    except CheckpointSaveError as e:
        out["failure"] = str(e)
    dist.barrier()   # rank 0 removes the failed save's temporary directory before it returns
    out["after_failure"] = (os.path.exists(iter_dir(40)), os.path.exists(os.path.join(save_dir, tmp_dir_name(40))),
                            tracker_text(save_dir))

    # Damage a file that only rank 2 checksums (each rank checks sorted(files)[rank::4]).
    out["damaged"] = sorted(meta["files"])[2]
    if rank == 0:
        with open(os.path.join(iter_dir(30), out["damaged"]), "r+b") as f:
            f.seek(30)
            byte = f.read(1)
            f.seek(30)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    plan = choose_checkpoint(save_dir, None, state)
    out["plan"] = (plan.iteration, plan.reason, plan.rejected)
    try:
        choose_checkpoint(save_dir, 30, state)
        out["ckpt_step_error"] = None
    except CheckpointLoadError as e:
        out["ckpt_step_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("four_rank_save"))
    return save_dir, run_distributed(_four_rank_body, 4, save_dir)


def test_four_rank_save_round_trip_is_bitwise_and_durable_on_return(four_ranks):
    save_dir, results = four_ranks
    for r in results:
        assert r["sync_durable_on_return"]
        for rel, obj in r["mine"].items():
            assert_bitwise_equal(obj, r["loaded"][rel], rel)
    files = read_metadata(os.path.join(save_dir, "iter_0000010"))["files"]
    assert len(files) == 6   # two model shards (dp_rank 0) and four distributed-optimizer shards
    assert {r["sync_bytes"] for r in results} == {sum(e["size"] for e in files.values())}


def test_four_rank_async_save_writes_the_same_bytes_as_sync(four_ranks):
    _, results = four_ranks
    for r in results:
        assert r["async"] == (False, True, r["sync_bytes"])
        assert r["async_same_bytes"]


def test_four_rank_async_commit_happens_only_after_every_rank_wrote(four_ranks):
    _, results = four_ranks
    assert results[0]["uncommitted_while_rank_3_writes"]
    assert all(r["my_checksums_committed"] for r in results)


def test_one_failing_rank_fails_the_save_on_every_rank_and_commits_nothing(four_ranks):
    _, results = four_ranks
    for r in results:
        assert "rank 2: files['extra.pt']['x'] is a builtins.object" in r["failure"]
        assert r["after_failure"] == (False, False, "30")


def test_every_rank_chooses_the_same_fallback_when_another_rank_finds_the_damage(four_ranks):
    save_dir, results = four_ranks
    damaged = results[0]["damaged"]
    for r in results:
        iteration, reason, rejected = r["plan"]
        assert (iteration, reason) == (20, "fallback")
        assert rejected[0][0] == "iter_0000030" and f"{damaged} failed its crc32 checksum" in rejected[0][1]
        assert r["ckpt_step_error"].startswith(f"checkpoint iter_0000030 in {save_dir} failed its checks: {damaged}")
