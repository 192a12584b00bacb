"""megatron_lite's AdamW: torch.optim.AdamW's update, moments in fp32/bf16/fp16, the model copy
written in the same step, gradient scaling, state-dict round trips; on a GPU the CUDA kernel
against the torch path."""

import copy

import pytest
import torch

from megatron_lite.arguments import ConfigError, parse_args, validate
from megatron_lite.optim.adamw import AdamW
from megatron_lite.parallel.state import initialize
from tests.unit_tests.optim.toy import build, make_batches, opt_config, train_steps

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def make_params(sizes, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(device).requires_grad_() for n in sizes]


def set_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.device)


def run(optimizer_factory, sizes, steps=4, device="cpu", grad_scale=None):
    params = make_params(sizes, device)
    opt = optimizer_factory(params)
    for step in range(steps):
        set_grads(params, step)
        if grad_scale is not None:
            opt.grad_scale = torch.tensor(grad_scale, device=device)
        opt.step()
    return params, opt


def test_fp32_moments_equal_torch_adamw_bitwise():
    sizes = [7, 64, 1000]
    ours, _ = run(lambda p: AdamW(p, **HYPER), sizes)
    theirs, _ = run(lambda p: torch.optim.AdamW(p, foreach=False, **HYPER), sizes)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_moments_are_stored_low_and_track_fp32(dtype):
    sizes = [64, 1000]
    ours, opt = run(lambda p: AdamW(p, exp_avg_dtype=dtype, exp_avg_sq_dtype=dtype, **HYPER), sizes)
    reference, _ = run(lambda p: AdamW(p, **HYPER), sizes)
    for p, ref in zip(ours, reference):
        state = opt.state[p]
        assert state["exp_avg"].dtype == dtype and state["exp_avg_sq"].dtype == dtype
        torch.testing.assert_close(p, ref, rtol=2e-3, atol=2e-4)
    assert any(not torch.equal(p, ref) for p, ref in zip(ours, reference))   # the rounding shows


def test_grad_scale_divides_the_gradients():
    sizes = [33, 500]
    scaled, _ = run(lambda p: AdamW(p, **HYPER), sizes, grad_scale=4.0)
    params = make_params(sizes)
    opt = AdamW(params, **HYPER)
    for step in range(4):
        set_grads(params, step, scale=0.25)
        opt.step()
    for a, b in zip(scaled, params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_model_copy_is_written_in_the_step():
    params = make_params([10, 300])
    models = {id(p): torch.zeros(p.numel(), dtype=torch.bfloat16) for p in params}
    opt = AdamW(params, model_view=lambda p: models[id(p)], **HYPER)
    set_grads(params, 0)
    opt.step()
    for p in params:
        assert torch.equal(models[id(p)], p.detach().to(torch.bfloat16))


def test_state_dict_round_trip_keeps_dtypes_and_resumes_exactly():
    sizes = [64, 100]
    straight, _ = run(lambda p: AdamW(p, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.float16, **HYPER),
                      sizes, steps=5)
    params, opt = run(lambda p: AdamW(p, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.float16, **HYPER),
                      sizes, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in params]
    fresh = AdamW(resumed, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.float16, **HYPER)
    fresh.load_state_dict(saved)
    assert fresh.state[resumed[0]]["exp_avg"].dtype == torch.bfloat16
    assert fresh.state[resumed[0]]["exp_avg_sq"].dtype == torch.float16
    for step in (3, 4):
        set_grads(resumed, step)
        fresh.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_torch_adamw_state_loads_into_ours():
    sizes = [64, 100]
    params, theirs = run(lambda p: torch.optim.AdamW(p, foreach=False, **HYPER), sizes, steps=2)
    mine = [p.detach().clone().requires_grad_() for p in params]
    ours = AdamW(mine, **HYPER)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    set_grads(params, 2)
    set_grads(mine, 2)
    theirs.step()
    ours.step()
    for a, b in zip(params, mine):
        assert torch.equal(a, b)


def test_precision_aware_flags_need_the_switch():
    base = ["--train-iters", "1", "--exp-avg-dtype", "bf16"]
    with pytest.raises(ConfigError, match="--use-precision-aware-optimizer"):
        validate(parse_args(base), world_size=1)
    with pytest.raises(ConfigError, match="--optimizer adam"):
        validate(parse_args(base + ["--use-precision-aware-optimizer", "--optimizer", "sgd"]), world_size=1)
    cfg = validate(parse_args(base + ["--use-precision-aware-optimizer", "--exp-avg-sq-dtype", "bf16"]), world_size=1)
    assert (cfg.optimizer.exp_avg_dtype, cfg.optimizer.exp_avg_sq_dtype) == ("bf16", "bf16")


def test_megatron_optimizer_with_bf16_moments_trains_a_bf16_model():
    state = initialize()
    cfg = opt_config(bf16=True, use_precision_aware_optimizer=True, exp_avg_dtype="bf16", exp_avg_sq_dtype="bf16")
    model, optimizer, scheduler = build(state, cfg, dtype=torch.bfloat16)
    assert isinstance(optimizer.optimizer, AdamW)
    records = train_steps(model, optimizer, scheduler, state, make_batches(4))
    for m in optimizer.main_params:    # the model holds the bf16 value of its fp32 main param
        assert torch.equal(m.model_param.detach().view(-1), m.main_param.detach().view(-1).to(torch.bfloat16))
        assert optimizer.optimizer.state[m.main_param]["exp_avg_sq"].dtype == torch.bfloat16
    ref_model, ref_optimizer, ref_scheduler = build(state, opt_config(bf16=True), dtype=torch.bfloat16)
    assert isinstance(ref_optimizer.optimizer, torch.optim.AdamW)
    reference = train_steps(ref_model, ref_optimizer, ref_scheduler, state, make_batches(4))
    assert records[0]["loss"] == reference[0]["loss"]
    torch.testing.assert_close(torch.stack([r["loss"] for r in records]),
                               torch.stack([r["loss"] for r in reference]), rtol=2e-2, atol=0)


def test_main_grads_dtype_flag_needs_precision_aware_bf16_adam():
    base = ["--train-iters", "1", "--main-grads-dtype", "bf16"]
    with pytest.raises(ConfigError, match="--use-precision-aware-optimizer"):
        validate(parse_args(base + ["--bf16"]), world_size=1)
    with pytest.raises(ConfigError, match="add --bf16"):
        validate(parse_args(base + ["--use-precision-aware-optimizer"]), world_size=1)
    with pytest.raises(ConfigError, match="--optimizer adam"):
        validate(parse_args(base + ["--bf16", "--use-precision-aware-optimizer", "--optimizer", "sgd"]), world_size=1)
    cfg = validate(parse_args(base + ["--bf16", "--use-precision-aware-optimizer"]), world_size=1)
    assert cfg.optimizer.main_grads_dtype == "bf16"


def test_optimizer_refuses_gradient_buffers_of_another_dtype():
    from megatron_lite.config import ParallelConfig
    from megatron_lite.optim import build_optimizer
    from megatron_lite.parallel.data import DistributedDataParallel
    from tests.unit_tests.optim.toy import ToyModel

    state = initialize()
    model = DistributedDataParallel(ToyModel(torch.bfloat16), ParallelConfig(), state)   # fp32 buffers
    cfg = opt_config(bf16=True, use_precision_aware_optimizer=True, main_grads_dtype="bf16")
    with pytest.raises(ValueError, match=r"gradient buffers are torch.float32 but --main-grads-dtype is bf16"):
        build_optimizer([model], cfg, ParallelConfig(), state)


def test_bf16_main_grads_train_a_bf16_model_close_to_fp32_grads():
    """--main-grads-dtype bf16: gradients accumulate in bf16 buffers and AdamW reads them as they
    are; the fp32 main params, the moments and the model copy behave as with fp32 gradients."""
    state = initialize()
    cfg = opt_config(bf16=True, use_precision_aware_optimizer=True, main_grads_dtype="bf16")
    model, optimizer, scheduler = build(state, cfg, dtype=torch.bfloat16)
    assert all(b.grad_data.dtype == torch.bfloat16 for b in model.buckets)
    assert isinstance(optimizer.optimizer, AdamW)
    records = train_steps(model, optimizer, scheduler, state, make_batches(6))
    for m in optimizer.main_params:
        assert m.main_param.dtype == torch.float32 and m.main_param.grad is None
        assert torch.equal(m.model_param.detach().view(-1), m.main_param.detach().view(-1).to(torch.bfloat16))
    reference = train_steps(*build(state, opt_config(bf16=True), dtype=torch.bfloat16), state, make_batches(6))
    assert records[0]["loss"] == reference[0]["loss"]
    assert records[0]["grad_norm"] == pytest.approx(reference[0]["grad_norm"], rel=1e-2)
    losses, ref_losses = torch.stack([r["loss"] for r in records]), torch.stack([r["loss"] for r in reference])
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=0)
    assert not torch.equal(losses, ref_losses)   # the bf16 gradients really were used


# ------------------------------------------------------------------------------ GPU kernel

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_scale", [None, 3.0])
@pytest.mark.parametrize("model_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_the_torch_path(moments, grad_scale, model_dtype, grad_dtype):
    from megatron_lite.optim.adamw import fused_adamw_available
    assert fused_adamw_available(torch.device("cuda"))
    # odd sizes take the scalar path; an offset slice of a flat buffer is unaligned
    sizes = [1, 3, 4096, 1000003]
    results = []
    for fused in (True, False):
        params = make_params(sizes, "cuda")
        flat = torch.full((sum(sizes) + 1,), float("nan"), device="cuda",
                          dtype=model_dtype or torch.bfloat16)
        views, offset = {}, 1
        for p in params:
            views[id(p)] = flat[offset:offset + p.numel()]
            offset += p.numel()
        opt = AdamW(params, exp_avg_dtype=moments, exp_avg_sq_dtype=moments, fused=fused,
                    model_view=(lambda p: views[id(p)]) if model_dtype else (lambda p: None), **HYPER)
        grads = {}
        if grad_dtype != torch.float32:   # bf16 main grads reach AdamW through grad_of
            opt.grad_of = lambda p: grads.get(id(p))
        for step in range(3):
            set_grads(params, step)
            if grad_dtype != torch.float32:
                for p in params:
                    grads[id(p)], p.grad = p.grad.to(grad_dtype), None
            if grad_scale is not None:
                opt.grad_scale = torch.tensor(grad_scale, device="cuda")
            opt.step()
        results.append((params, opt, views))
    (fast, fast_opt, fast_views), (slow, slow_opt, _) = results
    # fp32: the kernel and torch round differently in the last bit. bf16/fp16 moments: such a
    # bit can move a stored moment by one ulp of its dtype (0.4 % for bf16), which changes the
    # next update by that fraction: params within 2 % of one lr-sized step.
    low = moments != torch.float32
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0 if low else 1e-5, atol=2e-2 * HYPER["lr"] if low else 1e-6)
        sa, sb = fast_opt.state[a], slow_opt.state[b]
        assert sa["exp_avg"].dtype == moments and sa["exp_avg_sq"].dtype == moments
        for key in ("exp_avg", "exp_avg_sq"):
            # a moment near zero (m after a sign change) has no meaningful relative error: the
            # absolute bound scales with the moment's typical size
            expected = sb[key].float()
            torch.testing.assert_close(sa[key].float(), expected, rtol=2e-2 if low else 1e-5,
                                       atol=(2e-2 if low else 1e-6) * expected.abs().mean().item())
        if model_dtype is not None:
            assert torch.equal(fast_views[id(a)], a.detach().to(model_dtype))
