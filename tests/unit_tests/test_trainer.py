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


# the tiny model of tests/unit_tests/checkpoint/test_resume.py (two layers; dropout on, so RNG restores count)
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--mock-data", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", "127", "--make-vocab-size-divisible-by", "32", "--hidden-dropout", "0.1",
         "--attention-dropout", "0.1", "--lr", "1e-3", "--lr-warmup-iters", "1", "--seed", "11",
         "--log-interval", "100", "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
         "--train-iters", "4", "--eval-interval", "4", "--eval-iters", "2"]


def _losses(*runs):
    return [h["lm loss"] for run in runs for h in run.history]


def test_train_checkpoint_resumes_a_stopped_run_as_a_straight_run(tmp_path):
    ck = str(tmp_path / "ck")
    straight = Trainer(MODEL).train()
    first = Trainer(MODEL + ["--exit-interval", "2"]).train(train_checkpoint=ck)   # --load and --save ck
    second = Trainer(MODEL).train(train_checkpoint=ck)
    assert (second.checkpoints.loaded_dir, second.checkpoints.loaded_iteration) == (ck, 2)
    assert second.progress.iteration == 4 and [h["iteration"] for h in second.history] == [3, 4]
    assert _losses(first, second) == _losses(straight)


def test_restarted_finetune_resumes_its_own_checkpoint_as_an_uninterrupted_finetune(tmp_path):
    base, ft, straight_dir = (str(tmp_path / d) for d in ("base", "ft", "straight"))
    Trainer(MODEL[:-6] + ["--train-iters", "2"]).train(train_checkpoint=base)
    straight = Trainer(MODEL + ["--save", straight_dir]).finetune(finetune_checkpoint=base)
    assert straight.checkpoints.loaded_dir == base and straight.checkpoints.decision.action == "finetune"
    assert [h["iteration"] for h in straight.history] == [1, 2, 3, 4]   # iteration fresh
    first = Trainer(MODEL + ["--save", ft, "--exit-interval", "2"]).finetune(finetune_checkpoint=base)
    second = Trainer(MODEL + ["--save", ft]).finetune(finetune_checkpoint=base)
    d = second.checkpoints.decision
    assert (second.checkpoints.loaded_dir, second.checkpoints.loaded_iteration) == (ft, 2)
    assert (d.action, d.own_restart, d.metadata["mode"], second.mode) == ("resume", True, "finetune", "finetune")
    assert _losses(first, second) == _losses(straight)
    # resume_training=False: the finetune starts again from base, whatever ft holds
    again = Trainer(MODEL + ["--save", ft]).finetune(finetune_checkpoint=base, resume_training=False)
    assert (again.checkpoints.loaded_dir, again.checkpoints.loaded_iteration) == (base, 2)
    assert again.checkpoints.decision.action == "finetune" and again.mode == "finetune"
    assert _losses(again) == _losses(straight)


def test_evaluate_equals_trainings_own_validation_loss(tmp_path):
    import pytest

    from megatron_lite.arguments import ConfigError

    ck = str(tmp_path / "ck")
    trainer = Trainer(MODEL)
    run = trainer.train(train_checkpoint=ck)
    assert run.checkpoints.validation["iteration"] == 4
    logged = run.checkpoints.validation["lm loss"]
    assert trainer.evaluate() == logged
    assert trainer.evaluate() == logged and run.progress.consumed_valid_samples == 2 * 4   # moves nothing
    assert Trainer(MODEL + ["--load", ck]).evaluate() == logged   # the same model, from its checkpoint
    no_eval = MODEL[:-4] + ["--eval-interval", "0", "--load", ck]
    with pytest.raises(ConfigError, match="--eval-interval"):
        Trainer(no_eval).evaluate()


def test_generate_greedy_equals_inference_generate_on_the_same_model(tmp_path):
    import dataclasses

    from megatron_lite.inference.generate import generate

    ck = str(tmp_path / "ck")
    trainer = Trainer(MODEL)
    run = trainer.train(train_checkpoint=ck)
    prompts = [[5, 17, 42], [3, 9]]
    direct = generate(run, prompts, dataclasses.replace(run.cfg.inference, greedy=True, max_new_tokens=6),
                      seed=11, stop_token_id=run.tokenizer.eod)
    ids = trainer.generate(prompts, max_new_tokens=6)
    assert ids == direct and all(isinstance(t, int) for row in ids for t in row) and len(ids[0]) >= 1
    assert trainer.generate(["5 17 42"], max_new_tokens=6) == [run.tokenizer.detokenize(direct[0])]
    assert Trainer(MODEL + ["--load", ck]).generate(prompts, max_new_tokens=6) == direct   # from --load
    sampled = trainer.generate(prompts, max_new_tokens=6, greedy=False, top_k=5, seed=3)
    assert sampled == generate(run, prompts, dataclasses.replace(run.cfg.inference, max_new_tokens=6, top_k=5),
                               seed=3, stop_token_id=run.tokenizer.eod)
