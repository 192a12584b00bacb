"""megatron_lite.tools.preprocess_data (and its wrapper tools/preprocess_data.py) and the library call
behind it."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_lite.config import DataConfig
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.preprocess import preprocess_jsonl
from megatron_lite.tools import preprocess_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BYTES = DataConfig()                                      # ByteLevelTokenizer


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def corpus_records(n=400):
    rng = np.random.default_rng(0)
    words = ["data", "parallel", "tensor", "pipeline", "Größe", "日本語", "", "token"]
    return [{"text": " ".join(rng.choice(words, int(rng.integers(0, 30)))), "title": f"doc {i}"}
            for i in range(n)]


def read_bytes(prefix):
    return tuple(open(prefix + ext, "rb").read() for ext in (".bin", ".idx"))


def test_one_and_four_workers_write_identical_files(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", corpus_records())
    outputs = {}
    for workers in (1, 4):
        prefix = str(tmp_path / f"w{workers}")
        preprocess_jsonl(source, prefix, BYTES, json_keys=["text", "title"], append_eod=True,
                         workers=workers, log=None)
        outputs[workers] = [read_bytes(f"{prefix}_{key}_document") for key in ("text", "title")]
    assert outputs[1] == outputs[4]


def test_documents_are_tokenized_in_order_with_eod(tmp_path):
    records = corpus_records(50)
    source = write_jsonl(tmp_path / "in.jsonl", records)
    stats = preprocess_jsonl(source, str(tmp_path / "out"), BYTES, append_eod=True, log=None)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    texts = [r["text"] for r in records]
    assert stats.documents == 50 and ds.num_documents == 50 and ds.dtype == np.uint16
    # An empty text is a document with no sequence, as in Megatron.
    assert len(ds) == sum(1 for t in texts if t)
    nonempty = iter(t for t in texts if t)
    for i in range(len(ds)):
        assert ds[i].tolist() == list(next(nonempty).encode("utf-8")) + [256]


@pytest.mark.parametrize("lines, message", [
    ([{"text": "a"}, {"body": "b"}], r"line 2: no key 'text' \(keys: \['body'\]\)"),
    ([{"text": "a"}, {"text": "b"}, '{"text": "c"'], "line 3: invalid JSON"),
    ([{"text": 5}], "line 1: 'text' is a int, not a string"),
    (["[1, 2]"], "line 1: expected a JSON object"),
    ([], "holds no documents"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_names_the_line_and_leaves_nothing_behind(tmp_path, lines, message, workers):
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=message):
        preprocess_jsonl(source, str(out / "corpus"), BYTES, workers=workers, log=None)
    assert os.listdir(out) == []


def test_progress_line_reports_documents_and_throughput(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", corpus_records(30))
    log = io.StringIO()
    preprocess_jsonl(source, str(tmp_path / "out"), BYTES, log_interval=10, log=log)
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("processed 10 documents (")
    assert lines[-1].startswith("done: 30 documents (") and lines[-1].endswith(" MB/s)")


@pytest.mark.parametrize("command", [[os.path.join(REPO, "tools", "preprocess_data.py")],
                                     ["-m", "megatron_lite.tools.preprocess_data"]], ids=["wrapper", "module"])
def test_command_line_tool_runs_standalone(tmp_path, command):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}, {"text": "world"}])
    done = subprocess.run(
        [sys.executable, *command, "--input", source,
         "--output-prefix", str(tmp_path / "cli"), "--json-keys", "text", "--tokenizer-type",
         "ByteLevelTokenizer", "--append-eod", "--workers", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "done: 2 documents" in done.stderr
    assert IndexedDataset(str(tmp_path / "cli_text_document"))[1].tolist() == list(b"world") + [256]


def test_command_line_errors_exit_2_with_the_reason(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    code = preprocess_data.main(["--input", source, "--output-prefix", str(tmp_path / "cli"),
                                 "--json-keys", "body"])
    assert code == 2
    assert "preprocess_data.py: error: " in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["in.jsonl"]
