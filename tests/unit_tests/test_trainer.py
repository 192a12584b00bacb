"""The Python API runs the same loop as pretrain_gpt.py and resumes the same way."""

from megatron_lite.trainer import Trainer

FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
         "--eval-interval", "0", "--log-interval", "100", "--lr-warmup-iters", "1"]


def test_trainer_resumes_where_it_stopped(tmp_path):
    ck = str(tmp_path / "ck")
    straight = Trainer(FLAGS + ["--train-iters", "4"]).train()
    first = Trainer(FLAGS + ["--train-iters", "4", "--save", ck, "--load", ck, "--exit-interval", "2"]).train()
    second = Trainer(FLAGS + ["--train-iters", "4", "--save", ck, "--load", ck]).train(resume_training=True)
    assert second.checkpoints.loaded_iteration == 2
    assert [h["lm loss"] for h in first.history + second.history] == [h["lm loss"] for h in straight.history]
    fresh = Trainer(FLAGS + ["--train-iters", "4", "--save", ck, "--load", ck]).train(resume_training=False)
    assert fresh.checkpoints.loaded_iteration is None and len(fresh.history) == 4


class CountingMark:
    """A StepMark whose clock is the number of marks made before it (one per step)."""
    made = 0

    def __init__(self, device):
        self.n = CountingMark.made
        CountingMark.made += 1

    def wait(self):
        pass

    def seconds_until(self, later):
        return float(later.n - self.n)


def test_loop_reads_each_step_as_train_step_returns_it(capsys, monkeypatch):
    """train() reads a step's numbers after queuing the next one; every record and log line must
    still be that iteration's own (same loss, grad norm and lr as waiting for each step)."""
    from megatron_lite.arguments import parse_args
    from megatron_lite.initialize import build_run, setup_parallel
    from megatron_lite.parallel.random import preserved_rng
    from megatron_lite.training import build_data, train_step

    flags = [f for f in FLAGS if f != "100"]
    flags[flags.index("--log-interval") + 1:flags.index("--log-interval") + 1] = ["1"]
    flags += ["--train-iters", "5", "--clip-grad", "1.0"]
    import megatron_lite.training

    with monkeypatch.context() as m:
        m.setattr(megatron_lite.training, "StepMark", CountingMark)
        looped = Trainer(flags).train(resume_training=False)
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith(" iteration")]

    cfg = parse_args(flags)
    run = build_run(cfg, setup_parallel(cfg))
    with preserved_rng(run.state.rng):   # as pretrain() builds the data
        train_iter = build_data(run)[0]
    waited = []
    for _ in range(5):
        lr = run.scheduler.get_lr()
        step = train_step(run, train_iter)
        waited.append((step["lm loss"], step["grad_norm"], lr))

    assert [(h["lm loss"], h["grad_norm"], h["lr"]) for h in looped.history] == waited
    assert all(isinstance(g, float) for _, g, _ in waited)
    assert [int(line.split()[1].split("/")[0]) for line in logged] == [1, 2, 3, 4, 5]
    for line, (loss, norm, _) in zip(logged, waited):
        assert f"lm loss: {loss:.6E}" in line and f"grad norm: {norm:.6f}" in line
    # each line's time runs from the end of the previous step to the end of this one: with marks
    # that count steps instead of seconds, every line spans exactly one step (reading the numbers
    # one step late must not shift the intervals, as it did for the last line)
    ms = [float(line.split("elapsed time per iteration (ms):")[1].split("|")[0]) for line in logged]
    assert ms == [1000.0] * 5
