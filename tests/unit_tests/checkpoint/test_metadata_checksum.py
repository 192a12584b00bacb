"""metadata.json carries its own checksum: a valid-JSON edit of it (a model size, as a hand edit
would make) is damage like any other, reported by inspect_checkpoint and skipped by the loader, which
falls back to the previous intact checkpoint."""

import json
import os
import subprocess

from megatron_lite.checkpoint.io.integrity import METADATA_CHECKSUM_KEY, metadata_checksum, read_metadata
from tests.unit_tests.checkpoint.test_integrity import _run_inspect
from tests.unit_tests.checkpoint.test_save_lock import CLI, REPO


def test_an_edited_metadata_json_is_reported_and_the_load_falls_back(tmp_path):
    save = str(tmp_path / "ck")
    first = subprocess.run(CLI + ["--train-iters", "6", "--exit-interval", "4", "--save", save, "--save-interval", "2"], capture_output=True,
                           text=True, cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    newest = os.path.join(save, "iter_0000004")
    meta = read_metadata(newest)
    assert meta[METADATA_CHECKSUM_KEY] == metadata_checksum(meta)
    path = os.path.join(newest, "metadata.json")
    text = open(path).read()
    assert '"hidden_size": 32' in text
    with open(path, "w") as f:
        f.write(text.replace('"hidden_size": 32', '"hidden_size": 42'))
    json.loads(open(path).read())   # still valid JSON
    status, out = _run_inspect(newest)
    assert status == 1 and "does not match the checksum it was written with" in out
    again = subprocess.run(CLI + ["--train-iters", "6", "--save", save, "--load", save, "--save-interval", "2"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "iter_0000004: " in again.stdout and "does not match the checksum" in again.stdout
    assert "loading: iter_0000002 (full), fallback: the newest intact checkpoint" in again.stdout
    assert " iteration        3/" in again.stdout   # resumed after iteration 2


def _replace_with_checksummed(iter_dir, relpath, obj):
    """Put `obj` (torch.save) in place of `relpath` and record its size and checksum in metadata.json,
    as someone who rewrites a checkpoint on purpose would: every checksum matches."""
    import torch

    from megatron_lite.checkpoint.io.integrity import checksum_file, with_metadata_checksum

    path = os.path.join(iter_dir, relpath)
    torch.save(obj, path)
    meta = read_metadata(iter_dir)
    size, checksum = checksum_file(path)
    meta["files"][relpath].update(size=size, checksum=checksum)
    with open(os.path.join(iter_dir, "metadata.json"), "w") as f:
        json.dump(with_metadata_checksum({k: v for k, v in meta.items() if k != METADATA_CHECKSUM_KEY}), f)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this never runs",))


def test_unsafe_pickles_with_matching_checksums_are_named_and_the_load_falls_back(tmp_path):
    """A model file and a distributed-optimizer file that would run code, their checksums recorded:
    inspect_checkpoint and the loader name each file, and the run resumes from the intact checkpoint."""
    save = str(tmp_path / "ck")
    args = ["--train-iters", "8", "--save", save, "--save-interval", "2", "--use-distributed-optimizer"]
    first = subprocess.run(CLI + args + ["--exit-interval", "6"], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    _replace_with_checksummed(os.path.join(save, "iter_0000006"), "mp_rank_00_000/model_optim_rng.pt",
                              {"model": {}, "payload": _RunsCode()})
    _replace_with_checksummed(os.path.join(save, "iter_0000004"), "mp_rank_00_000_000/distrib_optim.pt",
                              {"optimizer": _RunsCode()})
    for it, relpath in ((6, "mp_rank_00_000/model_optim_rng.pt"), (4, "mp_rank_00_000_000/distrib_optim.pt")):
        status, out = _run_inspect(os.path.join(save, f"iter_{it:07d}"))
        assert status == 1 and f"{relpath} holds something other than tensors" in out, out
        assert "this never runs" not in out
    again = subprocess.run(CLI + args + ["--load", save], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "this never runs" not in again.stdout + again.stderr
    assert "iter_0000006: failed its checks: mp_rank_00_000/model_optim_rng.pt holds something other than" \
        in again.stdout
    assert "iter_0000004: failed its checks: mp_rank_00_000_000/distrib_optim.pt holds something other than" \
        in again.stdout
    assert "loading: iter_0000002 (full), fallback: the newest intact checkpoint" in again.stdout
    assert " iteration        3/" in again.stdout


def test_inspect_reads_the_distributed_optimizer_shards(tmp_path):
    save = str(tmp_path / "ck")
    run = subprocess.run(CLI + ["--train-iters", "4", "--save", save, "--use-distributed-optimizer"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    status, out = _run_inspect(os.path.join(save, "iter_0000004"))
    # fp32 main params, exp_avg and exp_avg_sq of every parameter element (one DP rank holds them all)
    import re
    weights = int(re.search(r"weight tensors, ([\d,]+) elements", out).group(1).replace(",", ""))
    optimizer = int(re.search(r"1 distributed-optimizer shards, ([\d,]+) elements", out).group(1).replace(",", ""))
    assert status == 0 and optimizer >= 3 * weights, out


def test_a_tracker_of_non_ascii_digits_is_reported_by_inspect_and_the_loader(tmp_path):
    """`²` (bytes C2 B2) passes str.isdigit(): inspect_checkpoint and a restart name it, without a traceback,
    and the restart resumes from the newest intact checkpoint."""
    save = str(tmp_path / "ck")
    first = subprocess.run(CLI + ["--train-iters", "6", "--exit-interval", "4", "--save", save, "--save-interval", "2"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "wb") as f:
        f.write(b"\xc2\xb2")
    status, out = _run_inspect(save)
    assert status == 0 and "tracker names (says '\u00b2', which is not an iteration number)" in out, out
    assert "Traceback" not in out
    again = subprocess.run(CLI + ["--train-iters", "6", "--save", save, "--load", save, "--save-interval", "2"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and "Traceback" not in again.stdout + again.stderr, again.stdout + again.stderr
    assert "latest_checkpointed_iteration.txt: says '\u00b2', which is not an iteration number" in again.stdout
    assert "loading: iter_0000004 (full), fallback: the newest intact checkpoint" in again.stdout
