"""pretrain_gpt.py as a user launches it: one line per mistake (printed once, on rank 0, also
under torchrun), exit code 0 for a finished run that a Ctrl-C reaches while it exits, and the
start-up summary.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from megatron_lite.arguments import parse_args
from megatron_lite.initialize import build_run, setup_parallel
from megatron_lite.summary import parameter_counts

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRETRAIN = str(ROOT / "pretrain_gpt.py")
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--train-iters", "3", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "64", "--eval-interval", "0", "--log-interval", "1"]


def _torchrun(nproc, args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), PRETRAIN, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)


def _main(args, capsys, rank=None, monkeypatch=None):
    import pretrain_gpt
    if rank is not None:
        monkeypatch.setenv("RANK", str(rank))
    code = pretrain_gpt.main(args)
    captured = capsys.readouterr()
    _main.out = captured.out
    return code, captured.err


@pytest.fixture(scope="module")
def pretrain_gpt_module():
    sys.path.insert(0, str(ROOT))
    yield
    sys.path.remove(str(ROOT))


def _write(path, text):
    path.write_text(text)
    return str(path)


def _mistakes(tmp):
    """(flags, the message's start, a part of it that names the fix) per mistake of the issue list."""
    from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder  # noqa: F401  (data package loads)
    ckpt = tmp / "ckpt"
    return {
        "missing --data-path prefix": (["--data-path", str(tmp / "nowhere_text_document")],
                                       "nowhere_text_document"),
        "tokenizer type without its model": (["--tokenizer-type", "HuggingFaceTokenizer"], "--tokenizer-model"),
        "--ckpt-step with no such checkpoint": (["--save", str(ckpt), "--load", str(ckpt), "--ckpt-step", "7"],
                                                "7"),
        "YAML value of the wrong type": (["--config", _write(tmp / "bad_type.yaml", "num-layers: 2\nhidden-size: "
                                                                                      "wide\n")],
                                         "bad_type.yaml:2: hidden-size must be an integer, got 'wide'"),
        "YAML syntax error": (["--config", _write(tmp / "bad_syntax.yaml", "num-layers: 2\nhidden-size: [64\n")],
                              "bad_syntax.yaml:3:1: YAML syntax error"),
        "--load directory that does not exist": (["--load", str(tmp / "no_such_run")],
                                                 "no_such_run: no such directory"),
        "mistyped flag": (["--hiden-size", "64"], "--hiden-size: unknown flag; did you mean --hidden-size?"),
    }


@pytest.mark.parametrize("mistake", ["missing --data-path prefix", "tokenizer type without its model",
                                     "--ckpt-step with no such checkpoint", "YAML value of the wrong type",
                                     "YAML syntax error", "--load directory that does not exist", "mistyped flag"])
def test_each_mistake_is_one_line_and_exit_code_2(mistake, tmp_path, capsys, monkeypatch, pretrain_gpt_module):
    flags, names = _mistakes(tmp_path)[mistake]
    base = [f for f in TINY if f != "--mock-data"] if "--data-path" in flags else TINY
    code, err = _main(base + flags, capsys, rank=0, monkeypatch=monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("pretrain_gpt.py: error: "), err
    assert names in lines[0]
    code, err = _main(base + flags, capsys, rank=1, monkeypatch=monkeypatch)
    assert code == 2 and err == ""   # only rank 0 says it


def test_a_scheduler_that_disagrees_with_the_checkpoint_is_one_line(tmp_path, capsys, monkeypatch,
                                                                    pretrain_gpt_module):
    ckpt = str(tmp_path / "ckpt")
    run = TINY + ["--save", ckpt, "--load", ckpt, "--save-interval", "3"]
    assert _main(run, capsys, rank=0, monkeypatch=monkeypatch)[0] == 0
    code, err = _main(run[:run.index("--train-iters") + 1] + ["6"] + run[run.index("--train-iters") + 2:] +
                      ["--lr-decay-iters", "9"], capsys, rank=0, monkeypatch=monkeypatch)
    assert code == 2 and err.count("\n") == 1
    assert "the checkpoint's decay samples is 6 but this run's is 18; pass --override-opt_param-scheduler" in err


@pytest.mark.slow
def test_a_mistake_under_torchrun_is_printed_once_without_a_traceback_from_the_ranks(tmp_path):
    proc = _torchrun(2, TINY + ["--load", str(tmp_path / "no_such_run")])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert out.count("pretrain_gpt.py: error: --load") == 1, out
    assert "ConfigError" not in out and "megatron_lite/" not in out, out   # no rank printed a traceback


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_ctrl_c_while_a_finished_run_exits_leaves_exit_code_0(tmp_path, delay):
    """SIGINT to every rank (what a Ctrl-C does to the processes torchrun started) right after
    the final save: the run has finished, so it still exits 0 and torchrun reports no failure."""
    ckpt = str(tmp_path / "ckpt")
    proc = _torchrun(2, TINY + ["--save", ckpt, "--save-interval", "100"])
    out = []
    for line in proc.stdout:
        out.append(line)
        if "saved checkpoint at iteration 3" in line:
            break
    time.sleep(delay)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in ranks:
        os.kill(int(pid), signal.SIGINT)
    rest, _ = proc.communicate(timeout=300)
    text = "".join(out) + rest
    assert proc.returncode == 0, text
    assert "ChildFailedError" not in text and "Traceback" not in text


def test_startup_summary_prints_arguments_and_parameter_counts(capsys, pretrain_gpt_module, monkeypatch):
    code, _ = _main(TINY, capsys, rank=0, monkeypatch=monkeypatch)
    out = _main.out.splitlines()
    assert code == 0
    block = out[out.index("------------------------ arguments ------------------------") + 1:
                out.index("-------------------- end of arguments ---------------------")]
    names = [line.split()[0] for line in block]
    assert names == sorted(names) and "hidden_size" in names and "log_throughput" in names
    assert "  hidden_size " + "." * 37 + " 32" in block
    cfg = parse_args(TINY)
    run = build_run(cfg, setup_parallel(cfg))
    total = sum(p.numel() for p in run.module.parameters())
    assert f" > number of parameters on (tensor, pipeline) model parallel rank (0, 0): {total}" in out
    assert f" > number of parameters in total: {total}" in out
    assert any(line.startswith("train: ") and "samples of 17 random tokens" in line for line in out), out


def _summary_body(rank, world_size, flags):
    cfg = parse_args(flags)
    run = build_run(cfg, setup_parallel(cfg))
    return parameter_counts(run)


@pytest.mark.slow
def test_parameter_total_over_tp_and_pp_equals_the_single_process_model():
    from tests.unit_tests.dist_utils import run_distributed
    flags = TINY + ["--make-vocab-size-divisible-by", "64"]
    (single, single_total), = run_distributed(_summary_body, 1, flags)
    split = run_distributed(_summary_body, 4, flags + ["--tensor-model-parallel-size", "2",
                                                       "--pipeline-model-parallel-size", "2"])
    per_rank, total = split[0]
    assert sorted(per_rank) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert total == single_total == single[(0, 0)]
    assert sum(per_rank.values()) > total   # the ranks also hold copies (TP-replicated norms, the tied output)
