"""Batch-size schedules, per-token loss, decoupled learning rates, overlapped parameter all-gather,
averaging in the DP collective, gradient buffer dtypes and the rank mapping, each with
Megatron-LM's meaning."""

import os

import pytest
import torch

from megatron_lite.arguments import ConfigError, parse_args, validate
from megatron_lite.config import OptimizerConfig, ParallelConfig, TrainConfig
from megatron_lite.microbatches import MicroBatchCalculator
from megatron_lite.optim.optimizer import grad_buffer_dtype
from megatron_lite.parallel.data import DistributedDataParallel, finalize_model_grads
from megatron_lite.parallel.pipeline import forward_backward_no_pipelining
from megatron_lite.parallel.state import _layout, initialize
from megatron_lite.training import pretrain
from tests.unit_tests.dist_utils import run_distributed
from tests.unit_tests.optim.toy import ToyModel

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
        "--make-vocab-size-divisible-by", "32", "--lr", "1e-3", "--min-lr", "1e-5", "--lr-decay-style", "cosine",
        "--seed", "5", "--log-interval", "100", "--eval-interval", "1000", "--eval-iters", "1",
        "--untie-embeddings-and-output-weights", "--hidden-dropout", "0.1"]
# ramp 4 -> 12 in increments of 4 over 24 samples: one increment every 24 / 2 = 12 samples
RAMPUP = ["--rampup-batch-size", "4", "4", "24", "--global-batch-size", "12", "--train-samples", "60",
          "--lr-warmup-samples", "8"]


def _calculator(dp=1, **train):
    return MicroBatchCalculator(TrainConfig(micro_batch_size=2, **train), dp_size=dp, seq_length=16)


def test_rampup_microbatches_per_iteration_follow_megatron_formula():
    calc = _calculator(global_batch_size=12, rampup_batch_size=[4, 4, 24])
    consumed, per_iteration = 0, []
    for _ in range(8):
        per_iteration.append(calc.num_microbatches(consumed))
        consumed += calc.current_global_batch_size(consumed)
    # batch 4 + floor(consumed / 12) * 4 while consumed <= 24, then 12; microbatches = batch / (2 x 1)
    assert per_iteration == [2, 2, 2, 4, 4, 6, 6, 6]
    assert _calculator(dp=2, global_batch_size=12, rampup_batch_size=[4, 4, 24]).num_microbatches(12) == 2


def test_train_samples_with_rampup_give_megatrons_iteration_count():
    # ramp iterations while consumed <= 24: 0, 4, 8 (batch 4), 12, 20 (batch 8) -> 28 consumed; then
    # (60 - 28) // 12 = 2 full batches
    assert _calculator(global_batch_size=12, rampup_batch_size=[4, 4, 24]).train_iters(60) == 7
    assert _calculator(global_batch_size=12).train_iters(60) == 5


def test_step_batch_size_schedule_thresholds_are_tokens():
    cfg = parse_args(TINY + ["--step-batch-size-schedule", "0:4 256:12", "--train-samples", "40"])
    validate(cfg, world_size=1)
    assert cfg.train.global_batch_size == 12
    calc = MicroBatchCalculator(cfg.train, dp_size=1, seq_length=16)   # 256 tokens = 16 samples
    assert [calc.current_global_batch_size(c) for c in (0, 12, 15, 16, 100)] == [4, 4, 4, 12, 12]
    assert calc.train_iters(40) == 6    # 4 x 4 reach 16 samples, then 12 + 12 reach 40
    assert calc.train_iters(39) == 5    # a partial last batch is dropped


def test_rampup_with_train_iters_is_refused_as_in_megatron():
    cfg = parse_args(TINY + ["--rampup-batch-size", "4", "4", "24", "--global-batch-size", "12",
                             "--train-iters", "5"])
    with pytest.raises(ConfigError, match="expected no batch-size rampup for iteration-based training"):
        validate(cfg, world_size=1)


def test_per_token_loss_with_average_in_collective_is_refused_as_in_megatron():
    cfg = parse_args(TINY + ["--calculate-per-token-loss", "--ddp-average-in-collective", "--train-iters", "1"])
    with pytest.raises(ConfigError, match="Cannot average in collective when calculating per-token loss"):
        validate(cfg, world_size=1)


def _history(run):
    return [(h["lm loss"], h["lr"], h["grad_norm"]) for h in run.history]


def _weights(run):
    return {k: v.detach().clone() for k, v in run.module.state_dict().items()}


def _straight_and_resumed(flags, root, exit_at):
    straight = pretrain(parse_args(flags))
    ck = os.path.join(root, "ck")
    ckpt = ["--save", ck, "--load", ck, "--save-interval", "100"]
    first = pretrain(parse_args(flags + ckpt + ["--exit-interval", str(exit_at)]))
    second = pretrain(parse_args(flags + ckpt))
    return straight, first, second


def test_rampup_run_consumes_the_schedule_and_resumes_identically(tmp_path):
    straight, first, second = _straight_and_resumed(TINY + RAMPUP, str(tmp_path), exit_at=4)
    assert len(straight.history) == 7
    assert straight.progress.consumed_train_samples == 4 + 4 + 4 + 8 + 8 + 12 + 12
    assert straight.scheduler.num_steps == straight.progress.consumed_train_samples
    assert first.progress.consumed_train_samples == 20 and second.checkpoints.loaded_iteration == 4
    assert _history(first) + _history(second) == _history(straight)
    for name, value in _weights(straight).items():
        assert torch.equal(_weights(second)[name], value), name


DECOUPLED = ["--decoupled-lr", "5e-3", "--decoupled-min-lr", "1e-4", "--train-iters", "6", "--global-batch-size", "4",
             "--lr-warmup-iters", "2"]


def test_decoupled_lr_schedules_embedding_and_output_layer_and_resumes(tmp_path):
    straight, first, second = _straight_and_resumed(TINY + DECOUPLED, str(tmp_path), exit_at=3)
    names = {id(m.main_param): m.name for m in straight.optimizer.main_params}
    groups = straight.optimizer.param_groups
    decoupled = [g for g in groups if g["max_lr"] == 5e-3]
    assert {names[id(p)] for g in decoupled for p in g["params"]} == {"embedding.word_embeddings.weight",
                                                                       "output_layer.weight"}
    main = next(g for g in groups if g["max_lr"] == 1e-3 and g["params"])
    assert main["min_lr"] == 1e-5 and all(g["min_lr"] == 1e-4 for g in decoupled)
    coeff = (main["lr"] - 1e-5) / (1e-3 - 1e-5)   # the same point of the same schedule
    for g in decoupled:
        assert g["lr"] == pytest.approx(1e-4 + coeff * (5e-3 - 1e-4), rel=1e-12)
    assert _history(first) + _history(second) == _history(straight)
    assert [g["lr"] for g in second.optimizer.param_groups] == [g["lr"] for g in groups]
    for name, value in _weights(straight).items():
        assert torch.equal(_weights(second)[name], value), name


def test_decoupled_min_lr_defaults_to_min_lr():
    run = pretrain(parse_args(TINY + ["--decoupled-lr", "5e-3", "--train-iters", "1", "--global-batch-size", "2"]),
                   load=False)
    assert sorted({(g["max_lr"], g["min_lr"]) for g in run.optimizer.param_groups}) == [(1e-3, 1e-5), (5e-3, 1e-5)]


def test_eval_global_batch_size_sets_validation_samples():
    flags = TINY + ["--train-iters", "4", "--global-batch-size", "8", "--eval-interval", "2", "--eval-iters", "3"]
    default = pretrain(parse_args(flags), load=False)
    own = pretrain(parse_args(flags + ["--eval-global-batch-size", "2"]), load=False)
    assert default.progress.consumed_valid_samples == 2 * 3 * 8
    assert own.progress.consumed_valid_samples == 2 * 3 * 2


class _TokenModel(torch.nn.Module):
    """Per-token squared error of a linear map: x [b, t, 4] -> losses [b, t]."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([[0.5, -1.0, 0.25, 2.0]]))
            self.proj.bias.fill_(0.1)

    def set_input_tensor(self, tensor):
        pass

    def forward(self, x, y):
        return (self.proj(x).squeeze(-1) - y) ** 2


def _token_batches():
    """Four microbatches of 2 x 6 tokens whose loss masks keep different numbers of tokens."""
    g = torch.Generator().manual_seed(3)
    keep = [6, 1, 4, 2]
    batches = []
    for k in keep:
        mask = torch.zeros(2, 6)
        mask[:, :k] = 1.0
        batches.append({"x": torch.randn(2, 6, 4, generator=g), "y": torch.randn(2, 6, generator=g), "mask": mask})
    return batches


def _forward_step(per_token):
    def step(batch, model):
        out = model(batch["x"], batch["y"])

        def loss_func(losses):
            loss_sum = (losses * batch["mask"]).sum()
            if per_token:
                return loss_sum, batch["mask"].sum(), {"lm loss": loss_sum.detach()}
            loss = loss_sum / batch["mask"].sum()
            return loss, {"lm loss": loss.detach()}
        return out, loss_func
    return step


def _scheduled_grads(state, batches, per_token):
    model = DistributedDataParallel(_TokenModel(), ParallelConfig(ddp_bucket_size=1000), state)
    model.zero_grad_buffer()
    reported = forward_backward_no_pipelining(_forward_step(per_token), iter(batches), model, state,
                                              num_microbatches=len(batches))
    tokens = torch.stack([r["num_tokens"] for r in reported]).sum() if per_token else None
    finalize_model_grads([model], state, num_tokens=tokens)
    return {n: p.main_grad.clone() for n, p in model.module.named_parameters()}


def _reference_grads(batches, per_token_mean):
    model = _TokenModel()
    if per_token_mean:
        losses = [(model(b["x"], b["y"]) * b["mask"]).sum() for b in batches]
        loss = torch.stack(losses).sum() / sum(b["mask"].sum() for b in batches)
    else:
        loss = torch.stack([(model(b["x"], b["y"]) * b["mask"]).sum() / b["mask"].sum() for b in batches]).mean()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_per_token_loss_is_the_mean_over_every_token_of_the_global_batch():
    state, batches = initialize(), _token_batches()
    per_token = _scheduled_grads(state, batches, per_token=True)
    per_microbatch = _scheduled_grads(state, batches, per_token=False)
    for name, grad in _reference_grads(batches, per_token_mean=True).items():
        torch.testing.assert_close(per_token[name], grad, rtol=1e-6, atol=1e-7)
    for name, grad in _reference_grads(batches, per_token_mean=False).items():
        torch.testing.assert_close(per_microbatch[name], grad, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(per_token[name], per_microbatch[name], rtol=1e-3)


def test_per_token_loss_equals_per_microbatch_mean_when_every_token_counts():
    flags = TINY + ["--train-iters", "3", "--global-batch-size", "4", "--hidden-dropout", "0.0",
                    "--attention-dropout", "0.0"]
    mean = pretrain(parse_args(flags), load=False)
    per_token = pretrain(parse_args(flags + ["--calculate-per-token-loss"]), load=False)
    assert [h["lm loss"] for h in per_token.history] == pytest.approx([h["lm loss"] for h in mean.history], rel=1e-5)
    for name, value in _weights(mean).items():
        torch.testing.assert_close(_weights(per_token)[name], value, rtol=1e-4, atol=1e-6)


def test_grad_buffer_dtypes_follow_megatron():
    assert grad_buffer_dtype(OptimizerConfig(bf16=True, accumulate_allreduce_grads_in_fp32=True)) == torch.float32
    assert grad_buffer_dtype(OptimizerConfig(bf16=True, grad_reduce_in_bf16=True)) == torch.bfloat16
    assert grad_buffer_dtype(OptimizerConfig(fp16=True)) == torch.float16
    assert grad_buffer_dtype(OptimizerConfig(fp16=True, accumulate_allreduce_grads_in_fp32=True)) == torch.float32
    assert grad_buffer_dtype(OptimizerConfig()) == torch.float32
    cfg = parse_args(TINY + ["--bf16", "--train-iters", "1"])
    validate(cfg, world_size=1)
    assert cfg.optimizer.accumulate_allreduce_grads_in_fp32 and grad_buffer_dtype(cfg.optimizer) == torch.float32
    fp16 = ["--fp16", "--initial-loss-scale", "256", "--train-iters", "3", "--global-batch-size", "4"]
    runs = {name: pretrain(parse_args(TINY + fp16 + extra), load=False)
            for name, extra in (("fp16", []), ("fp32", ["--accumulate-allreduce-grads-in-fp32"]))}
    assert {b.grad_data.dtype for b in runs["fp16"].model.buckets} == {torch.float16}
    assert {b.grad_data.dtype for b in runs["fp32"].model.buckets} == {torch.float32}
    losses = {name: [h["lm loss"] for h in run.history] for name, run in runs.items()}
    assert losses["fp16"][0] == losses["fp32"][0]
    assert losses["fp16"] == pytest.approx(losses["fp32"], rel=1e-3)


def test_tp_pp_dp_mapping_orders_pipeline_before_data_parallel():
    # TP=2, PP=2, DP=2 on 8 ranks; rank 0's pipeline and data-parallel peers
    _, _, dp_default, pp_default, _ = _layout(8, 2, 2)
    _, _, dp_mapped, pp_mapped, _ = _layout(8, 2, 2, tp_pp_dp_mapping=True)
    assert pp_default[0] == [0, 4] and dp_default[0] == [0, 2]
    assert pp_mapped[0] == [0, 2] and dp_mapped[0] == [0, 4]
    assert sorted(r for g in pp_mapped for r in g) == list(range(8))


DP2 = TINY + ["--train-iters", "4", "--global-batch-size", "8", "--use-distributed-optimizer",
              "--overlap-grad-reduce", "--eval-interval", "3", "--ddp-bucket-size", "2000"]


def _dp2_body(rank, world_size):
    runs, pending = {}, {}
    for name, extra in (("sync", []), ("overlap", ["--overlap-param-gather"]),
                        ("avg-in-collective", ["--ddp-average-in-collective"])):
        run = pretrain(parse_args(DP2 + extra), load=False)
        pending[name] = sum(b.param_handle is not None for b in run.model.buckets)
        runs[name] = (_history(run), _weights(run))   # the state dict waits for the gathers
        pending[name + "-after-state-dict"] = sum(b.param_handle is not None for b in run.model.buckets)
        runs[name + "-buckets"] = len(run.model.buckets)
    state = initialize()
    batches = _token_batches()
    mine = batches[2 * state.dp_rank:2 * state.dp_rank + 2]
    return {"runs": runs, "pending": pending, "per_token": _scheduled_grads(state, mine, per_token=True)}


@pytest.fixture(scope="module")
def dp2():
    return run_distributed(_dp2_body, 2)


@pytest.mark.slow
def test_overlap_param_gather_gives_identical_losses_and_weights(dp2):
    for result in dp2:
        runs, pending = result["runs"], result["pending"]
        assert runs["sync-buckets"] > 1
        assert pending["overlap"] == runs["overlap-buckets"] and pending["sync"] == 0   # gathers in flight
        assert pending["overlap-after-state-dict"] == 0
        assert runs["overlap"][0] == runs["sync"][0]
        for name, value in runs["sync"][1].items():
            assert torch.equal(runs["overlap"][1][name], value), name


@pytest.mark.slow
def test_average_in_collective_equals_scaling_before_it(dp2):
    for result in dp2:
        runs = result["runs"]
        sync, avg = runs["sync"][0], runs["avg-in-collective"][0]
        assert [h[0] for h in avg] == pytest.approx([h[0] for h in sync], rel=1e-6)
        assert [h[2] for h in avg] == pytest.approx([h[2] for h in sync], rel=1e-5)
        for name, value in runs["sync"][1].items():
            torch.testing.assert_close(runs["avg-in-collective"][1][name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_per_token_loss_over_dp2_is_the_global_token_mean(dp2):
    reference = _reference_grads(_token_batches(), per_token_mean=True)
    for result in dp2:
        for name, grad in reference.items():
            torch.testing.assert_close(result["per_token"][name], grad, rtol=1e-6, atol=1e-7)
