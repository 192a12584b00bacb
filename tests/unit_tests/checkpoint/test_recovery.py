"""Choosing the checkpoint to load, falling back past damage, the recovery report, and retention."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import shutil

import pytest
import torch

from megatron_lite.checkpoint.io.layout import TRACKER_FILENAME, replaced_dir_name, tmp_dir_name
from megatron_lite.checkpoint.recovery import CheckpointLoadError, choose_checkpoint, format_recovery_report
from megatron_lite.checkpoint.retention import apply_retention
from megatron_lite.checkpoint.io.storage import CheckpointSaveError, load_file
from tests.unit_tests.checkpoint.test_integrity import flip_byte, truncate
from tests.unit_tests.checkpoint.test_storage import MODEL, assert_bitwise_equal, save_tiny


def _unrename(d):
    os.rename(d / "iter_0000003", d / tmp_dir_name(3))


DAMAGE = {
    "truncated-shard": (lambda d: truncate(d / "iter_0000003" / MODEL), "iter_0000003",
                        f"{MODEL} is truncated: 64 bytes on disk"),
    "flipped-byte": (lambda d: flip_byte(d / "iter_0000003" / MODEL), "iter_0000003",
                     f"{MODEL} failed its crc32 checksum"),
    "deleted-metadata": (lambda d: os.remove(d / "iter_0000003" / "metadata.json"), "iter_0000003",
                         "has no metadata.json and is in none of Megatron-LM's formats"),
    "not-renamed": (_unrename, "iter_0000003.tmp", "incomplete: still has its temporary name"),
    # a valid-JSON edit of what decides the load (a model size, a tensor-index shape, a file's size)
    "edited-metadata": (lambda d: _edit_metadata(d, lambda m: m.update(iteration_note="x", kind="full",
                                                                       layout={**m["layout"], "tp": 2})),
                        "iter_0000003", "metadata.json is damaged: its content does not match the checksum"),
    "edited-file-size": (lambda d: _edit_metadata(d, lambda m: m["files"][MODEL].update(size=1)),
                         "iter_0000003", "does not match the checksum it was written with"),
}


def _edit_metadata(d, edit):
    path = d / "iter_0000003" / "metadata.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=1))


@pytest.fixture
def three(tmp_path):
    """A save directory with full checkpoints 1, 2, 3; the tracker names 3."""
    files = {it: save_tiny(tmp_path, it) for it in (1, 2, 3)}
    return tmp_path, files


def _listing(d):
    return sorted((os.path.relpath(os.path.join(root, n), d), os.path.getsize(os.path.join(root, n)))
                  for root, _, names in os.walk(d) for n in names)


def test_the_tracker_iteration_is_loaded_when_intact(three):
    d, files = three
    plan = choose_checkpoint(str(d))
    assert (plan.iteration, plan.reason, plan.rejected, plan.tracker_iteration) == (3, "tracker", [], 3)
    assert plan.iter_dir == str(d / "iter_0000003") and plan.metadata["iteration"] == 3
    assert_bitwise_equal(files[3][MODEL], load_file(str(d), plan.iteration, MODEL))


def test_ckpt_step_loads_that_iteration(three):
    d, _ = three
    plan = choose_checkpoint(str(d), 2)
    assert (plan.iteration, plan.reason) == (2, "--ckpt-step")


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damage_is_detected_and_the_fallback_is_chosen_reported_and_nothing_deleted(three, damage):
    d, files = three
    do, name, reason = DAMAGE[damage]
    do(d)
    before = _listing(d)
    plan = choose_checkpoint(str(d))
    assert (plan.iteration, plan.reason, plan.tracker_iteration) == (2, "fallback", 3)
    rejected_name, why = plan.rejected[0]   # not-renamed also rejects the tracker's now missing iter_0000003
    assert rejected_name == name and reason in why
    assert_bitwise_equal(files[2][MODEL], load_file(str(d), 2, MODEL))
    report = format_recovery_report(plan, {"weights": "loaded", "optimizer": "loaded"})
    assert f"    {name}: " in report and reason in report
    assert "  loading: iter_0000002 (full), fallback: the newest intact checkpoint" in report
    assert _listing(d) == before


def test_ckpt_step_on_a_damaged_checkpoint_is_an_error(three):
    d, _ = three
    flip_byte(d / "iter_0000003" / MODEL)
    with pytest.raises(CheckpointLoadError) as e:
        choose_checkpoint(str(d), 3)
    assert str(e.value).startswith(f"checkpoint iter_0000003 in {d} failed its checks: {MODEL} failed its crc32")
    assert str(e.value).endswith("; pick another with --ckpt-step or drop it to load the newest intact one")


def test_ckpt_step_that_does_not_exist_lists_what_does(three):
    d, _ = three
    with pytest.raises(CheckpointLoadError, match=r"--ckpt-step 7: .* has no committed checkpoint iter_0000007 "
                                                  r"\(committed iterations: 3, 2, 1\)"):
        choose_checkpoint(str(d), 7)


def test_a_broken_tracker_falls_back_to_the_newest_intact_checkpoint(three):
    d, _ = three
    (d / TRACKER_FILENAME).write_text("garbage")
    plan = choose_checkpoint(str(d))
    assert (plan.iteration, plan.reason) == (3, "fallback")
    assert plan.rejected == [(TRACKER_FILENAME, "says 'garbage', which is not an iteration number")]
    (d / TRACKER_FILENAME).write_text("9")
    assert choose_checkpoint(str(d)).rejected == [("iter_0000009", f"named by {TRACKER_FILENAME} but not in {d}")]
    (d / TRACKER_FILENAME).write_bytes(b"\xc2\xb2")   # '\u00b2': str.isdigit() says yes, int() says no
    plan = choose_checkpoint(str(d))
    assert (plan.iteration, plan.reason) == (3, "fallback")
    assert plan.rejected == [(TRACKER_FILENAME, "says '\u00b2', which is not an iteration number")]


def test_a_newer_checkpoint_than_the_tracker_is_left_alone_and_reported(three):
    d, _ = three
    (d / TRACKER_FILENAME).write_text("2")   # moved back by hand, as Megatron users do
    plan = choose_checkpoint(str(d))
    assert (plan.iteration, plan.reason) == (2, "tracker")
    assert "newer than the tracker's iter_0000002, not loaded (load it with --ckpt-step 3)" in \
        format_recovery_report(plan, {})


def test_weights_only_checkpoints_are_not_used_to_resume_unless_asked(tmp_path):
    save_tiny(tmp_path, 1, kind="weights")
    for ckpt_step in (None, 1):
        plan = choose_checkpoint(str(tmp_path), ckpt_step)
        assert (plan.iteration, plan.reason) == (None, "none")
        assert plan.rejected == [("iter_0000001", "weights only: it has no optimizer state to resume from; load it "
                                                  "with --finetune or --pretrained-checkpoint")]
    plan = choose_checkpoint(str(tmp_path), allow_weights_only=True)
    assert (plan.iteration, plan.kind, plan.reason) == (1, "weights", "fallback")
    save_tiny(tmp_path, 0)
    save_tiny(tmp_path, 2, kind="weights")
    plan = choose_checkpoint(str(tmp_path))
    assert (plan.iteration, plan.reason, plan.rejected) == (0, "tracker", [])
    assert "weights only: not used to resume" in format_recovery_report(plan, {})


def test_release_in_the_tracker_names_the_release_directory(tmp_path):
    files = save_tiny(tmp_path, "release", seed=5)
    assert (tmp_path / TRACKER_FILENAME).read_text() == "release"
    plan = choose_checkpoint(str(tmp_path))
    assert (plan.iteration, plan.iter_dir, plan.reason) == ("release", str(tmp_path / "release"), "tracker")
    assert_bitwise_equal(files[MODEL], load_file(str(tmp_path), "release", MODEL))


def test_an_empty_directory_means_a_fresh_start(tmp_path):
    plan = choose_checkpoint(str(tmp_path / "nothing"))
    assert (plan.iteration, plan.reason, plan.checkpoints) == (None, "none", [])
    assert "loading: nothing, training starts from scratch" in format_recovery_report(plan, {})


def test_when_every_checkpoint_is_damaged_loading_stops_with_the_reasons(three):
    d, _ = three
    for it in (1, 2, 3):
        flip_byte(d / f"iter_000000{it}" / MODEL)
    with pytest.raises(CheckpointLoadError, match=r"no intact checkpoint in .*\n  iter_0000003: failed its checks"):
        choose_checkpoint(str(d))


def test_a_resave_interrupted_between_its_renames_keeps_the_old_copy_loadable(three, monkeypatch):
    d, files = three
    real_rename = os.rename

    def crash_on_second_rename(src, dst):
        if src.endswith(tmp_dir_name(3)):
            raise OSError("simulated crash between the two renames")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_second_rename)
    with pytest.raises(CheckpointSaveError, match="simulated crash"):
        save_tiny(d, 3, seed=99)
    monkeypatch.undo()
    assert not (d / "iter_0000003").exists() and (d / replaced_dir_name(3)).is_dir()
    plan = choose_checkpoint(str(d))
    assert (plan.iteration, plan.iter_dir, plan.reason) == (3, str(d / replaced_dir_name(3)), "tracker")
    assert_bitwise_equal(files[3][MODEL], load_file(str(d), 3, MODEL))
    save_tiny(d, 3, seed=99)
    assert not (d / replaced_dir_name(3)).exists()
    assert load_file(str(d), 3, MODEL)["iteration"] == 99


def test_the_report_lists_found_chosen_and_restored():
    from megatron_lite.checkpoint.recovery import CheckpointInfo, LoadPlan
    found = [CheckpointInfo("iter_0000020", "/s/iter_0000020", 20, "committed", "full", 2_500_000,
                            status="failed its checks: x is missing"),
             CheckpointInfo("iter_0000010", "/s/iter_0000010", 10, "committed", "full", 2_500_000, status="intact")]
    plan = LoadPlan("/s", 10, "/s/iter_0000010", "fallback", "full", 20, [("iter_0000020", "x is missing")], found)
    assert format_recovery_report(plan, {"weights": "loaded", "optimizer": "reset (--finetune)"}) == "\n".join([
        "checkpoint recovery report for /s",
        "  tracker latest_checkpointed_iteration.txt names iter_0000020",
        "  found (newest first):",
        "    iter_0000020  full        2.5 MB  failed its checks: x is missing",
        "    iter_0000010  full        2.5 MB  intact   <- loaded",
        "  not loaded:",
        "    iter_0000020: x is missing",
        "  loading: iter_0000010 (full), fallback: the newest intact checkpoint",
        "  restored:",
        "    weights    loaded",
        "    optimizer  reset (--finetune)"])


# ---- retention ----------------------------------------------------------------------------------

def test_retention_keeps_the_last_n_and_the_protected_one(tmp_path):
    for it in range(1, 7):
        save_tiny(tmp_path, it)
    assert apply_retention(str(tmp_path), 2, protect={1}) == [2, 3, 4]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000005", "iter_0000006", TRACKER_FILENAME]
    assert apply_retention(str(tmp_path), 2, protect={1}) == []


def test_retention_deletes_only_once_enough_newer_checkpoints_are_intact(tmp_path):
    for it in range(1, 6):
        save_tiny(tmp_path, it)
    truncate(tmp_path / "iter_0000005" / MODEL)    # the newest is damaged: it does not count
    save_tiny(tmp_path, 6, kind="weights")          # weights-only: neither counted nor deleted
    (tmp_path / TRACKER_FILENAME).write_text("4")
    assert apply_retention(str(tmp_path), 2, protect=set()) == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "iter_0000004", "iter_0000005", "iter_0000006",
                                            TRACKER_FILENAME]


def test_retention_never_deletes_the_tracker_iteration(tmp_path):
    for it in range(1, 5):
        save_tiny(tmp_path, it)
    (tmp_path / TRACKER_FILENAME).write_text("1")
    assert apply_retention(str(tmp_path), 1, protect=set()) == [2, 3]


def test_retention_removes_only_leftovers_older_than_the_newest_checkpoint(tmp_path):
    save_tiny(tmp_path, 2)
    os.makedirs(tmp_path / tmp_dir_name(1))
    os.makedirs(tmp_path / tmp_dir_name(3))          # possibly a save in progress: kept
    shutil.copytree(tmp_path / "iter_0000002", tmp_path / replaced_dir_name(2))
    assert apply_retention(str(tmp_path), 1, protect=set()) == []
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", tmp_dir_name(3), TRACKER_FILENAME]


def test_retention_rejects_a_nonpositive_count(tmp_path):
    with pytest.raises(ValueError, match="--keep-last-n-checkpoints must be a positive integer, got 0"):
        apply_retention(str(tmp_path), 0, protect=set())


def test_loading_never_unpickles_code_and_names_a_missing_shard(tmp_path):
    save_tiny(tmp_path, 1)
    torch.save({"when": datetime.date(2020, 1, 1)}, tmp_path / "iter_0000001" / MODEL)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_file(str(tmp_path), 1, MODEL)
    with pytest.raises(FileNotFoundError, match=r"mp_rank_01_000/model_optim_rng.pt does not exist: the checkpoint "
                                                r"was saved with another parallel layout"):
        load_file(str(tmp_path), 1, "mp_rank_01_000/model_optim_rng.pt")
