"""OptimizerParamScheduler against Megatron-LM's formulas, build_scheduler's unit conversion,
and the checkpoint round trip with its override / use-checkpoint rules."""

import math
from types import SimpleNamespace

import pytest

from megatron_lite.config import OptimizerConfig, TrainConfig
from megatron_lite.optim.scheduler import OptimizerParamScheduler, build_scheduler


def fake_optimizer():
    return SimpleNamespace(param_groups=[{"wd_mult": 1.0}, {"wd_mult": 0.0}])


def make(**kw):
    args = dict(init_lr=0.0, max_lr=1.0, min_lr=0.1, lr_warmup_steps=10, lr_decay_steps=110,
                lr_decay_style="linear", start_wd=0.1, end_wd=0.1, wd_incr_steps=110, wd_incr_style="constant")
    args.update(kw)
    return OptimizerParamScheduler(fake_optimizer(), **args)


def lr_at(sched, step):
    sched.num_steps = step
    return sched.get_lr()


def test_linear_warmup_then_linear_decay_matches_formula():
    s = make(init_lr=0.2)
    assert lr_at(s, 0) == pytest.approx(0.2)
    assert lr_at(s, 5) == pytest.approx(0.2 + 0.8 * 5 / 10)
    assert lr_at(s, 10) == pytest.approx(1.0)
    assert lr_at(s, 60) == pytest.approx(0.1 + 0.9 * (1 - 50 / 100))
    assert lr_at(s, 110) == pytest.approx(0.1)
    assert lr_at(s, 111) == 0.1


def test_cosine_decay_matches_formula():
    s = make(lr_decay_style="cosine")
    for step in (10, 35, 60, 85, 110):
        ratio = (step - 10) / 100
        assert lr_at(s, step) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * ratio) + 1))


def test_constant_style_holds_max_lr_after_warmup_and_past_decay():
    s = make(lr_decay_style="constant")
    assert lr_at(s, 5) == pytest.approx(0.5)
    assert lr_at(s, 50) == 1.0
    assert lr_at(s, 500) == 1.0


def test_inverse_square_root_matches_formula():
    s = make(lr_decay_style="inverse-square-root", min_lr=0.0)
    assert lr_at(s, 40) == pytest.approx(math.sqrt(10) / math.sqrt(40))
    s = make(lr_decay_style="inverse-square-root", min_lr=0.4)
    assert lr_at(s, 100) == pytest.approx(0.4)  # sqrt(10/100) = 0.316 is below the floor


@pytest.mark.parametrize("wsd_style", ["exponential", "linear", "cosine"])
def test_wsd_is_stable_then_anneals_over_the_last_wsd_steps(wsd_style):
    s = make(lr_decay_style="WSD", wsd_decay_steps=40, lr_wsd_decay_style=wsd_style)
    assert lr_at(s, 30) == 1.0
    assert lr_at(s, 70) == 1.0              # anneal starts after 110 - 40
    q = (90 - 70) / 40
    coeff = {"exponential": 2 * 0.5 ** q - 1, "linear": 1 - q, "cosine": 0.5 * (math.cos(math.pi * q) + 1)}[wsd_style]
    assert lr_at(s, 90) == pytest.approx(0.1 + 0.9 * coeff)
    assert lr_at(s, 110) == pytest.approx(0.1)


def test_weight_decay_increments_and_wd_mult_zero_group():
    s = make(start_wd=0.0, end_wd=0.2, wd_incr_style="linear", wd_incr_steps=100)
    s.step(25)
    assert s.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.05)
    assert s.optimizer.param_groups[1]["weight_decay"] == 0.0
    s = make(start_wd=0.0, end_wd=0.2, wd_incr_style="cosine", wd_incr_steps=100)
    s.step(25)
    assert s.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.2 * 0.5 * (math.cos(math.pi * 0.75) + 1))
    s.step(100)
    assert s.get_wd() == 0.2


def test_step_sets_lr_on_every_group():
    s = make()
    s.step(5)
    assert [g["lr"] for g in s.optimizer.param_groups] == [pytest.approx(0.5)] * 2


def test_build_scheduler_converts_iterations_to_samples():
    opt = OptimizerConfig(lr=1.0, min_lr=0.0, lr_warmup_iters=3, lr_decay_iters=20, lr_decay_style="linear")
    s = build_scheduler(fake_optimizer(), opt, TrainConfig(train_iters=30, global_batch_size=8))
    assert (s.lr_warmup_steps, s.lr_decay_steps, s.wd_incr_steps) == (24, 160, 240)
    s.step(8)
    assert s.get_lr() == pytest.approx(1 / 3)
    opt = OptimizerConfig(lr_warmup_fraction=0.1, lr_decay_style="WSD", lr_wsd_decay_iters=5)
    s = build_scheduler(fake_optimizer(), opt, TrainConfig(train_iters=30, global_batch_size=8))
    assert (s.lr_warmup_steps, s.lr_decay_steps, s.wsd_decay_steps) == (pytest.approx(24.0), 240, 40)


def test_build_scheduler_sample_based():
    opt = OptimizerConfig(lr_warmup_samples=100, weight_decay_incr_style="linear", start_weight_decay=0.0,
                          end_weight_decay=0.1)
    s = build_scheduler(fake_optimizer(), opt, TrainConfig(train_samples=1000, global_batch_size=8))
    assert (s.lr_warmup_steps, s.lr_decay_steps, s.wd_incr_steps, s.start_wd, s.end_wd) == (100, 1000, 1000, 0.0, 0.1)


def test_build_scheduler_errors_name_the_flag():
    with pytest.raises(ValueError, match="--train-iters or --train-samples"):
        build_scheduler(fake_optimizer(), OptimizerConfig(), TrainConfig())
    with pytest.raises(ValueError, match="--start-weight-decay and --end-weight-decay"):
        build_scheduler(fake_optimizer(), OptimizerConfig(weight_decay_incr_style="linear"),
                        TrainConfig(train_iters=10, global_batch_size=8))
    with pytest.raises(ValueError, match="--lr-wsd-decay-iters"):
        build_scheduler(fake_optimizer(), OptimizerConfig(lr_decay_style="WSD"),
                        TrainConfig(train_iters=10, global_batch_size=8))
    with pytest.raises(ValueError, match="warmup .* must be shorter"):
        build_scheduler(fake_optimizer(), OptimizerConfig(lr_warmup_iters=10),
                        TrainConfig(train_iters=10, global_batch_size=8))


def test_state_dict_round_trip_continues_identically():
    a = make(lr_decay_style="WSD", wsd_decay_steps=40, lr_wsd_decay_style="cosine",
             start_wd=0.0, end_wd=0.2, wd_incr_style="linear")
    for _ in range(7):
        a.step(8)
    b = make(lr_decay_style="WSD", wsd_decay_steps=40, lr_wsd_decay_style="cosine",
             start_wd=0.0, end_wd=0.2, wd_incr_style="linear")
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        assert b.optimizer.param_groups == a.optimizer.param_groups
        a.step(8)
        b.step(8)
    assert b.num_steps == a.num_steps == 136


def test_load_with_different_flags_is_an_error_naming_both_fixes():
    saved = make(max_lr=1.0).state_dict()
    with pytest.raises(ValueError, match=r"learning rate \(--lr\) is 1.0 but this run's is 2.0.*"
                                         r"--override-opt_param-scheduler.*--use-checkpoint-opt_param-scheduler"):
        make(max_lr=2.0).load_state_dict(saved)


def test_override_keeps_flags_and_use_checkpoint_takes_checkpoint():
    saved = make(max_lr=1.0, lr_decay_style="cosine")
    saved.step(50)
    sd = saved.state_dict()
    override = make(max_lr=2.0, override_opt_param_scheduler=True)
    override.load_state_dict(sd)
    assert (override.max_lr, override.lr_decay_style, override.num_steps) == (2.0, "linear", 50)
    from_ckpt = make(max_lr=2.0, use_checkpoint_opt_param_scheduler=True)
    from_ckpt.load_state_dict(sd)
    assert (from_ckpt.max_lr, from_ckpt.lr_decay_style) == (1.0, "cosine")
    assert from_ckpt.get_lr() == saved.get_lr()
    with pytest.raises(ValueError, match="contradict"):
        make(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True)
