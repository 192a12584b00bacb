"""In-memory checkpoints (--local-ckpt-interval, checkpoint/local.py), tried as a crash would:
4 ranks (TP=2 x DP=2, gloo), kill -9 of one rank or of all of them at random moments, then the same
command again. Each restart resumes from the last or the second-to-last logged iteration, and the
run ends bitwise equal to a run that was never killed; a lost node's memory (a rank's directory
gone) is made good from the replica on another rank; damage is noticed, and snapshots never mix
two histories."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from megatron_lite.checkpoint.io.storage import load_file
from tests.unit_tests.dist_utils import free_port
from tests.unit_tests.checkpoint.test_resume import REPO
from tests.unit_tests.checkpoint.test_storage import assert_bitwise_equal

WORLD, ITERS = 4, 14
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--mock-data", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", "127", "--make-vocab-size-divisible-by", "32", "--lr", "1e-3", "--seed", "11",
         "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--lr-warmup-iters", "2",
         "--lr-decay-style", "cosine", "--log-interval", "1", "--eval-interval", "0"]
LAYOUT = ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer", "--train-iters", str(ITERS)]
LOGGED = re.compile(r"^ iteration +(\d+)/")
RESUMED = re.compile(r"iteration and consumed samples +restored \(iteration (\d+),")


def _args(tmp_path, name="run"):
    return MODEL + LAYOUT + ["--save", str(tmp_path / name), "--load", str(tmp_path / name), "--save-interval", "1000",
                    "--local-ckpt-interval", "1", "--local-ckpt-dir", str(tmp_path / "shm")]


class Job:
    """WORLD processes of pretrain_gpt.py started as torchrun starts them; rank 0's output is read."""

    def __init__(self, args, tmp_path):
        port = free_port()
        self.procs = []
        for rank in range(WORLD):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                       LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS="1")
            out = subprocess.PIPE if rank == 0 else open(tmp_path / f"rank{rank}.log", "w")
            self.procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *args],
                                               stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env))
        self.lines = []

    def read_until_logged(self, iteration):
        """Rank 0's lines up to the log line of `iteration` (or the end)."""
        for line in self.procs[0].stdout:
            self.lines.append(line)
            m = LOGGED.match(line)
            if m and int(m.group(1)) >= iteration:
                return int(m.group(1))
        return None

    def logged(self):
        return [int(m.group(1)) for m in map(LOGGED.match, self.lines) if m]

    def kill(self, who):
        """kill -9 `who` (ranks), then the others, as torchrun tears a job down when a worker dies."""
        for r in who:
            os.kill(self.procs[r].pid, signal.SIGKILL)
        time.sleep(0.2)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        self.wait()

    def wait(self, timeout=300):
        for p in self.procs:
            p.wait(timeout)
        rest = self.procs[0].stdout.read()
        self.lines += rest.splitlines(keepends=True)
        self.procs[0].stdout.close()
        return [p.returncode for p in self.procs]

    @property
    def text(self):
        return "".join(self.lines)


def _finished(args, tmp_path):
    job = Job(args, tmp_path)
    codes = job.wait()
    assert codes == [0] * WORLD, job.text
    return job


def _final_state(save):
    """Every file of the final checkpoint: each TP shard (model, optimizer-free) and each ZeRO-1 shard."""
    files = [f"mp_rank_{t:02d}_000/model_optim_rng.pt" for t in range(2)]
    files += [f"mp_rank_{t:02d}_000_{d:03d}/distrib_optim.pt" for t in range(2) for d in range(2)]
    return {f: load_file(save, ITERS, f) for f in files}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    job = _finished(_args(tmp), tmp)
    return _final_state(str(tmp / "run")), job


def _kill_and_restart(tmp_path, kills, rng):
    """One run killed `kills` times at random moments, then finished; per kill (last logged, resumed)."""
    args, trials = _args(tmp_path), []
    last = 0
    for _ in range(kills):
        job = Job(args, tmp_path)
        if trials:   # the restart said where it resumed from
            job.read_until_logged(0)
        target = rng.randint(min(last + 1, ITERS - 2), min(last + 3, ITERS - 2))
        reached = job.read_until_logged(target)
        time.sleep(rng.uniform(0.0, 0.12))   # somewhere in the next step, or its snapshot
        who = rng.choice([[r] for r in range(WORLD)] + [list(range(WORLD))])
        job.kill(who)
        logged = job.logged()
        resumed = [int(m.group(1)) for m in RESUMED.finditer(job.text)]
        trials.append((logged[-1] if logged else None, resumed, reached, who))
        last = logged[-1] if logged else last
    final = _finished(args, tmp_path)
    return trials, final


def _check_trials(trials, final):
    """Each restart resumed from the last or the second-to-last iteration the killed run logged."""
    resumed = [int(m.group(1)) for m in RESUMED.finditer(final.text)]
    starts = [t[1][0] if t[1] else None for t in trials[1:]] + [resumed[0] if resumed else None]
    for (last_logged, _, _, who), start in zip(trials, starts):
        start = 0 if start is None else start   # nothing to load: from scratch
        assert last_logged - 1 <= start <= last_logged + 1, (last_logged, start, who, trials)


def test_kills_of_one_or_all_ranks_resume_within_one_iteration_and_end_bitwise_equal(straight, tmp_path):
    expected, _ = straight
    trials, final = _kill_and_restart(tmp_path, 3, random.Random(3))
    _check_trials(trials, final)
    assert "the newest state: every rank's in-memory snapshot (--local-ckpt-interval)" in final.text
    assert_bitwise_equal(_final_state(str(tmp_path / "run")), expected)
    # the run ended with its final save: the snapshots are gone from memory
    root = tmp_path / "shm" / "megatron_lite_local"
    assert not any(os.scandir(next(os.scandir(root)).path))


@pytest.mark.slow
def test_forty_kills_at_random_moments_each_resume_within_one_iteration(straight, tmp_path):
    expected, _ = straight
    rng = random.Random(40)
    for chain in range(10):
        directory = tmp_path / f"chain{chain}"
        directory.mkdir()
        trials, final = _kill_and_restart(directory, 4, rng)
        _check_trials(trials, final)
        assert_bitwise_equal(_final_state(str(directory / "run")), expected, f"chain {chain}")


def _snapshots(tmp_path):
    root = next(os.scandir(tmp_path / "shm" / "megatron_lite_local")).path
    return {d.name: sorted(os.listdir(d.path)) for d in os.scandir(root)}, root


def test_a_lost_nodes_memory_is_made_good_from_the_replicas(straight, tmp_path):
    """Rank 1's directory (its snapshots and the replica it held) is gone: rank 1's state comes
    back from its replica on rank 2, and the run still ends bitwise equal."""
    expected, _ = straight
    args = _args(tmp_path)
    job = Job(args, tmp_path)
    job.read_until_logged(8)
    job.kill(list(range(WORLD)))
    held, root = _snapshots(tmp_path)
    assert any(n.startswith("replica_00001_iter_") and n.endswith(".json") for n in held["rank_00002"]), held
    for name in held["rank_00001"]:
        os.remove(os.path.join(root, "rank_00001", name))
    final = _finished(args, tmp_path)
    assert re.search(r"rank 1's snapshot of iteration \d+: from its replica on rank 2", final.text), final.text
    assert int(RESUMED.search(final.text).group(1)) >= job.logged()[-1] - 2
    assert_bitwise_equal(_final_state(str(tmp_path / "run")), expected)


def test_a_damaged_snapshot_is_named_and_the_older_one_or_the_replica_is_used(straight, tmp_path):
    expected, _ = straight
    args = _args(tmp_path)
    job = Job(args, tmp_path)
    job.read_until_logged(6)
    job.kill(list(range(WORLD)))
    held, root = _snapshots(tmp_path)
    newest = max(n for n in held["rank_00000"] if n.startswith("iter_") and n.endswith(".pt"))
    path = os.path.join(root, "rank_00000", newest)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    final = _finished(args, tmp_path)
    assert f"rank 0's {newest[:-3]}: its data fails the CRC-32 of its record" in final.text, final.text
    assert_bitwise_equal(_final_state(str(tmp_path / "run")), expected)


def test_a_persistent_checkpoint_newer_than_the_snapshots_wins_and_older_histories_are_removed(tmp_path):
    """Snapshots left from an earlier start never mix with this one's: with --ckpt-step the run
    goes back to a persistent checkpoint, and the snapshots of the abandoned history are removed."""
    args = _args(tmp_path) + ["--save-interval", "4"]
    job = Job(args, tmp_path)
    job.read_until_logged(9)
    job.kill(list(range(WORLD)))
    held, _ = _snapshots(tmp_path)
    assert any(n.startswith("iter_") for names in held.values() for n in names)
    back = Job(args + ["--ckpt-step", "4"], tmp_path)
    back.read_until_logged(6)   # its snapshot of iteration 5 is written
    back.kill(list(range(WORLD)))
    assert "restored (iteration 4," in back.text
    held, _ = _snapshots(tmp_path)
    iterations = {int(n[-12:-5]) for names in held.values() for n in names if n.endswith(".json")}
    assert iterations and max(iterations) <= 7, held   # nothing of the abandoned iterations 8 and 9 is left
    assert "local snapshots up to iteration 9: not used (a chosen --ckpt-step" in back.text or \
        "local snapshots up to iteration 8: not used (a chosen --ckpt-step" in back.text, back.text


def test_local_checkpoint_flags_are_checked_with_one_line(tmp_path):
    base = [sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *MODEL, "--train-iters", "8"]
    cases = [(["--local-ckpt-interval", "1"], "--local-ckpt-interval needs --save DIR"),
             (["--save", str(tmp_path), "--non-persistent-save-interval", "2", "--non-persistent-ckpt-type",
               "global"], "--non-persistent-ckpt-type global: megatron_lite's non-persistent checkpoints are "
                          "node-local snapshots"),
             (["--save", str(tmp_path), "--non-persistent-ckpt-type", "local"],
              "--non-persistent-ckpt-type local needs --non-persistent-save-interval N"),
             (["--save", str(tmp_path), "--local-ckpt-interval", "0"], "--local-ckpt-interval 0: give a positive"),
             (["--save", str(tmp_path), "--local-ckpt-interval", "1", "--replication-factor", "3"],
              "--replication-factor 3: megatron_lite keeps each snapshot twice"),
             (["--save", str(tmp_path), "--local-ckpt-interval", "1", "--local-ckpt-dir", "/proc/no_such_dir"],
              "--local-ckpt-dir: cannot create /proc/no_such_dir/megatron_lite_local/")]
    for extra, message in cases:
        out = subprocess.run(base + extra, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stdout, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_megatron_lms_spelling_takes_snapshots(tmp_path):
    """--non-persistent-save-interval 2 --non-persistent-ckpt-type local --non-persistent-local-ckpt-dir
    DIR, as a Megatron-LM launch script has them, is --local-ckpt-interval 2 --local-ckpt-dir DIR."""
    save = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *MODEL, "--train-iters", "1000",
           "--save", str(save), "--save-interval", "1000",
           "--non-persistent-save-interval", "2", "--non-persistent-ckpt-type", "local",
           "--non-persistent-local-ckpt-dir", str(tmp_path / "shm"), "--replication", "--replication-jump", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if LOGGED.match(line) and int(LOGGED.match(line).group(1)) == 5:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    held, _ = _snapshots(tmp_path)
    assert sorted(n for n in held["rank_00000"] if n.endswith(".json")) == \
        ["iter_0000002.json", "iter_0000004.json"], held
