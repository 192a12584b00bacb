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
    assert second.loaded_iteration == 2
    assert [h["lm loss"] for h in first.history + second.history] == [h["lm loss"] for h in straight.history]
    fresh = Trainer(FLAGS + ["--train-iters", "4", "--save", ck, "--load", ck]).train(resume_training=False)
    assert fresh.loaded_iteration is None and len(fresh.history) == 4
