"""metadata.json carries its own checksum: a valid-JSON edit of it (a model size, as a hand edit
would make) is damage like any other, reported by inspect.py and skipped by the loader, which
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
