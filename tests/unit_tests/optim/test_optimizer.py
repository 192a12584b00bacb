"""MegatronOptimizer in one process: the same numbers as torch's AdamW + clip_grad_norm_, param groups,
a plain state dict, and bitwise-identical continuation after save/load."""

import copy
import io

import pytest
import torch

from megatron_lite.config import ParallelConfig
from megatron_lite.optim import build_optimizer
from megatron_lite.parallel.data import DistributedDataParallel
from megatron_lite.parallel.state import initialize
from tests.unit_tests.optim.toy import ToyModel, build, make_batches, opt_config, params_of, train_steps


def test_grad_norm_and_update_equal_torch_adamw_with_clip_grad_norm():
    state = initialize()
    cfg = opt_config(lr_warmup_iters=0, clip_grad=0.5)
    model, optimizer, _ = build(state, cfg)
    reference = ToyModel()
    decay = [reference.fc1.weight, reference.fc2.weight]
    no_decay = [reference.norm_weight, reference.fc1.bias, reference.fc2.bias]
    torch_adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}],
                                    lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    for x, y in make_batches(3):
        optimizer.zero_grad()
        model(x, y).backward()
        ok, grad_norm, _ = optimizer.step()

        torch_adamw.zero_grad()
        reference(x, y).backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=cfg.clip_grad)
        torch_adamw.step()

        assert ok and grad_norm > cfg.clip_grad   # clipping is active
        assert grad_norm == pytest.approx(expected_norm.item(), rel=1e-6)
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_param_groups_split_weight_decay_by_dimension():
    model, optimizer, scheduler = build(initialize(), opt_config(weight_decay=0.1))
    names = {id(m.main_param): m.name for m in optimizer.main_params}
    groups = [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups]
    assert groups == [["fc1.weight", "fc2.weight"], ["fc1.bias", "fc2.bias", "norm_weight"]]
    scheduler.step(16)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.01)] * 2


def test_fp32_optimizer_updates_the_model_params_without_copies_and_bf16_keeps_fp32_copies():
    model, optimizer, _ = build(initialize(), opt_config())
    assert all(m.main_param is m.model_param for m in optimizer.main_params)
    model, optimizer, scheduler = build(initialize(), opt_config(bf16=True), dtype=torch.bfloat16)
    train_steps(model, optimizer, scheduler, initialize(), make_batches(3))
    for m in optimizer.main_params:
        assert m.main_param.dtype == torch.float32 and m.model_param.dtype == torch.bfloat16
        assert torch.equal(m.model_param.detach(), m.main_param.to(torch.bfloat16))


def test_reload_model_params_refreshes_fp32_copies_after_loading_weights():
    model, optimizer, _ = build(initialize(), opt_config(bf16=True), dtype=torch.bfloat16)
    new_weights = {k: v + 0.25 for k, v in model.state_dict().items()}
    model.load_state_dict(new_weights)
    assert not torch.equal(optimizer.main_params[0].main_param, optimizer.main_params[0].model_param.float())
    optimizer.reload_model_params()
    for m in optimizer.main_params:
        assert torch.equal(m.main_param, new_weights[m.name].float())


def save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_optimizer_states_equal(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"] and a["grad_scaler"] == b["grad_scaler"]
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert a["params"][name].keys() == b["params"][name].keys()
        for key, value in a["params"][name].items():
            assert torch.equal(value, b["params"][name][key]), (name, key)


@pytest.mark.parametrize("variant", ["adam-fp32", "adam-bf16", "sgd-fp32", "adam-fp16"])
def test_resume_from_state_dict_is_bitwise_identical(variant):
    optimizer_name, precision = variant.split("-")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    cfg = opt_config(optimizer=optimizer_name, bf16=precision == "bf16", fp16=precision == "fp16",
                     initial_loss_scale=2.0 ** 10)
    state = initialize()
    batches = make_batches(6)
    model, optimizer, scheduler = build(state, cfg, dtype=dtype)
    train_steps(model, optimizer, scheduler, state, batches[:3])
    saved = save_load({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict()})
    straight = train_steps(model, optimizer, scheduler, state, batches[3:])

    model2, optimizer2, scheduler2 = build(state, cfg, dtype=dtype)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    scheduler2.load_state_dict(saved["scheduler"])
    resumed = train_steps(model2, optimizer2, scheduler2, state, batches[3:])

    for a, b in zip(straight, resumed):
        assert torch.equal(a["loss"], b["loss"])
        assert (a["grad_norm"], a["lr"], a["loss_scale"]) == (b["grad_norm"], b["lr"], b["loss_scale"])
    for name, value in params_of(model).items():
        assert torch.equal(value, params_of(model2)[name]), name
    assert_optimizer_states_equal(optimizer.state_dict(), optimizer2.state_dict())


def test_state_dict_is_keyed_by_parameter_name_and_plain():
    model, optimizer, scheduler = build(initialize(), opt_config(bf16=True), dtype=torch.bfloat16)
    train_steps(model, optimizer, scheduler, initialize(), make_batches(1))
    sd = save_load(optimizer.state_dict())
    assert sd["optimizer"] == "adam" and sd["grad_scaler"] is None and "shard_ranges" not in sd
    assert set(sd["params"]) == {"fc1.weight", "fc1.bias", "norm_weight", "fc2.weight", "fc2.bias"}
    assert set(sd["params"]["fc1.weight"]) == {"main_param", "exp_avg", "exp_avg_sq", "step"}
    assert sd["params"]["fc1.weight"]["main_param"].dtype == torch.float32
    assert [(g["lr"], g["weight_decay"]) for g in sd["param_groups"]] == \
        [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def test_several_model_chunks_are_named_with_a_chunk_prefix_and_resume():
    state = initialize()
    cfg, parallel_cfg = opt_config(bf16=True), ParallelConfig(ddp_bucket_size=64)
    chunks = [DistributedDataParallel(ToyModel(torch.bfloat16), parallel_cfg, state) for _ in range(2)]
    optimizer = build_optimizer(chunks, cfg, parallel_cfg, state)
    assert sorted(optimizer.state_dict()["params"]) == sorted(
        f"chunk{i}.{n}" for i in range(2) for n, _ in ToyModel().named_parameters())
    (x, y), = make_batches(1)
    optimizer.zero_grad()
    (chunks[0](x, y) + 2 * chunks[1](x, y)).backward()
    optimizer.step()
    saved = save_load(optimizer.state_dict())
    fresh = build_optimizer([DistributedDataParallel(ToyModel(torch.bfloat16), parallel_cfg, state) for _ in range(2)],
                            cfg, parallel_cfg, state)
    fresh.load_state_dict(saved)
    assert_optimizer_states_equal(fresh.state_dict(), optimizer.state_dict())
    assert not torch.equal(saved["params"]["chunk0.fc1.weight"]["exp_avg"],
                           saved["params"]["chunk1.fc1.weight"]["exp_avg"])


def test_load_state_dict_rejects_another_optimizer_or_model():
    _, adam, _ = build(initialize(), opt_config(optimizer="adam"))
    _, sgd, _ = build(initialize(), opt_config(optimizer="sgd"))
    with pytest.raises(ValueError, match="optimizer is adam but this run uses sgd; pass --optimizer adam"):
        sgd.load_state_dict(adam.state_dict())
    sd = copy.copy(adam.state_dict())
    sd["params"] = {("renamed." + k if k == "fc2.bias" else k): v for k, v in sd["params"].items()}
    with pytest.raises(ValueError, match=r"missing \['fc2.bias'\], unexpected \['renamed.fc2.bias'\]"):
        adam.load_state_dict(sd)
