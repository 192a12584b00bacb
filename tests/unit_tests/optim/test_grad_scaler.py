"""Loss scaling: Megatron's dynamic scaler rules, and fp16 steps skipped on inf gradients."""

import pytest
import torch

from megatron_lite.config import OptimizerConfig
from megatron_lite.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler, build_grad_scaler
from megatron_lite.parallel.state import initialize
from tests.unit_tests.optim.toy import build, make_batches, opt_config, params_of, train_steps


def scaler(**kw):
    args = dict(initial_scale=1024.0, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5,
                growth_interval=3, hysteresis=2)
    args.update(kw)
    return DynamicGradScaler(**args)


def run(s, flags):
    scales = []
    for found_inf in flags:
        s.update(found_inf)
        scales.append(s.scale)
    return scales


def test_dynamic_scaler_holds_for_hysteresis_then_halves_each_overflow():
    assert run(scaler(), [True, True, True, False]) == [1024.0, 512.0, 256.0, 256.0]


def test_dynamic_scaler_grows_after_window_and_refills_hysteresis():
    s = scaler()
    assert run(s, [True, False, False, False]) == [1024.0, 1024.0, 1024.0, 2048.0]
    assert s.hysteresis_tracker == 2
    assert run(s, [True, True]) == [2048.0, 1024.0]


def test_overflow_restarts_the_growth_window():
    assert run(scaler(hysteresis=5), [False, False, True, False, False, False]) == [1024.0] * 5 + [2048.0]


def test_dynamic_scaler_never_goes_below_min_scale():
    assert run(scaler(initial_scale=4.0, min_scale=2.0, hysteresis=1), [True, True, True]) == [2.0, 2.0, 2.0]


def test_scaler_state_dict_round_trip():
    a = scaler()
    run(a, [True, False])
    b = scaler()
    b.load_state_dict(a.state_dict())
    assert run(a, [False, False, True, True]) == run(b, [False, False, True, True])


def test_build_grad_scaler_follows_megatron():
    assert build_grad_scaler(OptimizerConfig()) is None
    assert build_grad_scaler(OptimizerConfig(bf16=True)) is None
    assert isinstance(build_grad_scaler(OptimizerConfig(bf16=True, loss_scale=8.0)), ConstantGradScaler)
    dyn = build_grad_scaler(OptimizerConfig(fp16=True, initial_loss_scale=256.0, loss_scale_window=7, hysteresis=3))
    assert (dyn.scale, dyn.growth_interval, dyn.hysteresis, dyn.growth_factor, dyn.backoff_factor) == \
        (256.0, 7, 3, 2.0, 0.5)
    with pytest.raises(ValueError, match="--min-loss-scale"):
        build_grad_scaler(OptimizerConfig(fp16=True, initial_loss_scale=1.0, min_loss_scale=2.0))


def test_fp16_step_with_inf_gradient_is_skipped_and_scale_adjusts():
    state = initialize()
    cfg = opt_config(fp16=True, initial_loss_scale=1024.0, hysteresis=1, loss_scale_window=2)
    model, optimizer, scheduler = build(state, cfg, dtype=torch.float16)
    batches = make_batches(4)
    train_steps(model, optimizer, scheduler, state, batches[:1])
    before = params_of(model)
    main_before = [m.main_param.clone() for m in optimizer.main_params]
    adam_step_before = optimizer.state_dict()["params"]["fc1.weight"]["step"].item()

    skipped = train_steps(model, optimizer, scheduler, state, batches[1:2], inject_inf_at=0)[0]
    assert (skipped["ok"], skipped["grad_norm"]) == (False, None)
    assert optimizer.get_loss_scale() == 512.0
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name]), name
    for m, old in zip(optimizer.main_params, main_before):
        assert torch.equal(m.main_param, old)
    assert optimizer.state_dict()["params"]["fc1.weight"]["step"].item() == adam_step_before == 1.0

    clean = train_steps(model, optimizer, scheduler, state, batches[2:4])
    assert [r["ok"] for r in clean] == [True, True]
    assert [r["loss_scale"] for r in clean] == [512.0, 512.0]
    assert optimizer.get_loss_scale() == 1024.0     # grew after loss_scale_window=2 clean steps


def test_fp16_model_params_are_the_rounded_fp32_main_params():
    state = initialize()
    model, optimizer, scheduler = build(state, opt_config(fp16=True, initial_loss_scale=1024.0), dtype=torch.float16)
    train_steps(model, optimizer, scheduler, state, make_batches(3))
    for m in optimizer.main_params:
        assert m.main_param.dtype == torch.float32 and m.model_param.dtype == torch.float16
        assert torch.equal(m.model_param.detach(), m.main_param.to(torch.float16))


def test_power_of_two_loss_scale_gives_the_unscaled_update():
    state = initialize()
    results = []
    for loss_scale in (1.0, 1024.0):
        model, optimizer, scheduler = build(state, opt_config(fp16=True, loss_scale=loss_scale), dtype=torch.float16)
        records = train_steps(model, optimizer, scheduler, state, make_batches(3))
        results.append(([r["grad_norm"] for r in records], [m.main_param.clone() for m in optimizer.main_params]))
    (norms_1, mains_1), (norms_1024, mains_1024) = results
    assert norms_1 == pytest.approx(norms_1024, rel=1e-6)
    for a, b in zip(mains_1, mains_1024):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
