"""One writer per --save directory (checkpoint/io/lock.py): a second run on a directory a live run
writes stops at start-up naming that run; a dead run's lock is taken over and said so; every
temporary name is the writing run's own."""

import json
import os
import socket
import subprocess
import sys

from megatron_lite.checkpoint.io import lock as save_lock
from megatron_lite.checkpoint.io.layout import parse_dir_name, tmp_dir_name
from megatron_lite.checkpoint.io.storage import load_file
from tests.unit_tests.checkpoint.test_resume import MODEL, REPO

CLI = [sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *MODEL, "--log-interval", "1", "--eval-interval", "0"]


def _cli(*args, timeout=300):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=REPO, timeout=timeout)


def _write_lock(save_dir, **holder):
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, save_lock.LOCK_FILENAME)
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", "token": "0123abcd",
                   **holder}, f)
    return path


def test_a_second_run_on_a_live_runs_save_directory_stops_naming_it(tmp_path):
    save = str(tmp_path / "ck")
    first = subprocess.Popen(CLI + ["--train-iters", "100000", "--save", save, "--save-interval", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        for line in first.stdout:   # the first run has saved: it is writing the directory
            if line.startswith("saved checkpoint at iteration 2"):
                break
        second = _cli("--train-iters", "4", "--save", save, "--load", save)
        assert second.returncode == 2, second.stdout + second.stderr
        message = second.stderr.strip()
        assert len(message.splitlines()) == 1, message
        assert f"is being written by another run (host {socket.gethostname()}, pid {first.pid}," in message
        assert "Traceback" not in second.stdout + second.stderr
        assert first.poll() is None   # the first run goes on
    finally:
        first.kill()
        first.wait()
    # the first run's checkpoints are its own: loadable, from its iterations
    assert load_file(save, 2, "mp_rank_00_000/model_optim_rng.pt")["iteration"] == 2


def test_a_dead_runs_lock_is_taken_over_and_released_at_the_end(tmp_path):
    save = str(tmp_path / "ck")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(save, pid=int(gone.stdout))
    out = _cli("--train-iters", "4", "--save", save)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"took over the lock of {save} from a run that is gone (process {int(gone.stdout)} on " in out.stdout
    assert not os.path.exists(os.path.join(save, save_lock.LOCK_FILENAME))


def test_another_hosts_lock_holds_while_it_is_touched_and_is_stale_after(tmp_path):
    save = str(tmp_path / "ck")
    path = _write_lock(save, host="node-that-is-not-here", pid=4242)
    busy = _cli("--train-iters", "4", "--save", save)
    assert busy.returncode == 2 and "(host node-that-is-not-here, pid 4242," in busy.stdout + busy.stderr
    old = os.path.getmtime(path) - save_lock.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    out = _cli("--train-iters", "4", "--save", save)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "its lock on node-that-is-not-here (pid 4242) has not been touched for" in out.stdout


def test_a_lock_of_a_live_process_on_this_host_holds(tmp_path):
    save = str(tmp_path / "ck")
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        _write_lock(save, pid=alive.pid, pid_start=save_lock._process_start(alive.pid))
        assert save_lock.holder_gone(json.load(open(os.path.join(save, save_lock.LOCK_FILENAME))), 0.0,
                                     0.0) == (False, "")
        # the same pid, started at another time: a reused pid, so the lock is stale
        _write_lock(save, pid=alive.pid, pid_start="1")
        gone, why = save_lock.holder_gone(json.load(open(os.path.join(save, save_lock.LOCK_FILENAME))), 0.0, 0.0)
        assert gone and "the pid is now another process's" in why
    finally:
        alive.communicate(b"")


def test_temporary_names_are_the_runs_own(tmp_path):
    a, b = save_lock.acquire(str(tmp_path / "a")), save_lock.acquire(str(tmp_path / "b"))
    assert a.token != b.token
    name = tmp_dir_name(7, a.token)
    assert name == f"iter_0000007.tmp-{a.token}" and parse_dir_name(name) == (7, "tmp")
    assert tmp_dir_name(7, b.token) != name
    a.release()
    assert not os.path.exists(a.path) and os.path.exists(b.path)
