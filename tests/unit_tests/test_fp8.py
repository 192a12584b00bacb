"""FP8 training (--fp8-format, --fp8-recipe; megatron_lite/model/fp8.py) on what the CPU can check:
the three FP8 GEMMs against a float64 product of their quantized operands, the two scaling recipes
against Transformer Engine's formulas, the producers' casts, the flags, the checkpointed scaling
state and its moves between FP8 and high-precision runs, and the parallel layouts against one
process. torch._scaled_mm runs on the CPU, so the whole FP8 training step does; the kernels that
write FP8 are tested on the GPU (tests/unit_tests/ops/test_fp8_kernels.py).
"""

import pytest
import torch

from megatron_lite.arguments import ConfigError, parse_args
from megatron_lite.checkpoint.io.storage import load_file
from megatron_lite.model import fp8
from megatron_lite.model.fp8 import (E4M3, E5M2, FP8_MAX, GRAD, INPUT, WEIGHT, FP8Meta, FP8Recipe, FP8State,
                                     cast_to_fp8, fp8_linear)
from megatron_lite.parallel.state import initialize
from megatron_lite.training import pretrain
from megatron_lite.validation import validate
from tests.unit_tests.checkpoint.test_resume import _assert_bitwise, _state
from tests.unit_tests.dist_utils import run_distributed
from tests.unit_tests.test_parallel_training import ARCH, COMMON, _global_params, _train

DELAYED = ["--fp8-format", "hybrid", "--fp8-amax-history-len", "4", "--fp8-amax-compute-algo", "max"]
TENSORWISE = ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]


def _dequantized(q, scale_inv):
    return q.double() * scale_inv.double()


def _linear_vs_float64(device, dtype, recipe):
    """One FP8 linear forward and backward, and the float64 products of the operands it quantized."""
    torch.manual_seed(0)
    x = torch.randn(64, 48, device=device, dtype=dtype, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(32, 48, device=device, dtype=dtype) * 0.02)
    b = torch.nn.Parameter(torch.randn(32, device=device, dtype=dtype))
    g = torch.randn(64, 32, device=device, dtype=dtype) * 1e-3
    state = FP8State(recipe, ["layer"], device)
    if recipe.delayed:   # a step's scales as the previous step left them
        state.scale.copy_(torch.tensor([[30.0, 9000.0, 4.0e6]]))
        state.scale_inv.copy_(state.scale.reciprocal())
    meta = FP8Meta(state, 0)
    y = fp8_linear(x, w, b, meta, initialize(), None)
    y.backward(g)

    def operand(t, kind):
        dt = recipe.dtype(kind)
        scale = state.scale[0, kind] if recipe.delayed else FP8_MAX[dt] / t.detach().abs().max().float()
        return _dequantized(cast_to_fp8(t.detach(), scale, dt), scale.reciprocal())

    xq, wq, gq = operand(x, INPUT), operand(w, WEIGHT), operand(g, GRAD)
    want = {"y": xq @ wq.t() + b.detach().double(), "dx": gq @ wq, "dw": gq.t() @ xq}
    got = {"y": y.detach(), "dx": x.grad, "dw": w.grad}
    return got, want, state, (x, w, g)


@pytest.mark.parametrize("delayed", [False, True], ids=["tensorwise", "delayed"])
def test_fp8_gemms_equal_float64_products_of_the_quantized_operands(delayed):
    recipe = FP8Recipe(E4M3, E5M2, delayed)
    got, want, state, (x, w, g) = _linear_vs_float64("cpu", torch.float32, recipe)
    for k in want:   # fp32 accumulation against float64
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-5, atol=1e-6 * want[k].abs().max().item(), msg=k)
    # and not the unquantized products: FP8 moved them
    assert (got["y"].double() - (x.detach().double() @ w.detach().double().t())).abs().max() > 1e-3
    if delayed:   # the casts recorded this step's amaxes, of the tensors before scaling
        torch.testing.assert_close(state.amax_history[0, 0], torch.stack([x.abs().max(), w.abs().max(),
                                                                          g.abs().max()]).detach(), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("delayed", [False, True], ids=["tensorwise", "delayed"])
def test_fp8_gemms_on_the_gpu_equal_float64_products_to_bf16_rounding(delayed):
    got, want, _, _ = _linear_vs_float64("cuda", torch.bfloat16, FP8Recipe(E4M3, E5M2, delayed))
    for k in want:   # one bf16 rounding of an fp32-accumulated product
        torch.testing.assert_close(got[k].double().cpu(), want[k].cpu(), rtol=8e-3,
                                   atol=1e-3 * want[k].abs().max().item(), msg=k)


def _te_delayed(history, scale, algo, margin, fp8_max):
    """Transformer Engine's delayed-scaling update, written out for one tensor: the amax from the
    history, the new scale unless that amax is zero or not finite, the history rolled."""
    amax = max(history) if algo == "max" else history[0]
    if amax > 0 and amax == amax and amax != float("inf"):
        scale = fp8_max / amax / 2 ** margin
    history = history[1:] + history[:1]   # torch.roll(history, -1): the recorded amax goes last,
    history[0] = 0.0                       # the oldest comes first and is cleared for the next step
    return history, scale


@pytest.mark.parametrize("algo,margin", [("max", 0), ("most_recent", 1)])
def test_delayed_scaling_follows_transformer_engines_update(algo, margin):
    recipe = FP8Recipe(E4M3, E5M2, True, history_len=3, algo=algo, margin=margin)
    state = FP8State(recipe, ["a"], "cpu")
    group = initialize()
    steps = [(2.0, 0.5, 1e-3), (8.0, 0.25, float("inf")), (0.0, 0.75, 2e-3), (1.0, float("nan"), 4e-3)]
    hist = [[0.0] * 3 for _ in range(3)]     # per operand: the one being recorded, then oldest to newest
    scales = [1.0, 1.0, 1.0]
    for amaxes in steps:
        state.amax_history[0, 0] = torch.tensor(amaxes)
        state.update(group)
        for k in range(3):
            hist[k][0] = amaxes[k]
            hist[k], scales[k] = _te_delayed(hist[k], scales[k], algo, margin, FP8_MAX[recipe.dtype(k)])
        torch.testing.assert_close(state.scale[0].double(), torch.tensor(scales, dtype=torch.float64), rtol=1e-6,
                                   atol=0)
        torch.testing.assert_close(state.scale_inv[0], state.scale[0].reciprocal())
        assert state.amax_history[0, 0].tolist() == [0.0, 0.0, 0.0]
    assert state.generation == len(steps)   # each step invalidates the weight casts


def test_tensorwise_casts_each_tensor_with_its_own_amax():
    state = FP8State(FP8Recipe(E4M3, E5M2, False), ["a"], "cpu")
    meta = FP8Meta(state, 0)
    t = torch.tensor([[-3.0, 1.0, 0.001, 2.5]] * 4)
    q, scale_inv = meta.quantize(t, INPUT)
    assert q.dtype == E4M3 and q.float().abs().max().item() == 448.0      # the amax lands on the top
    torch.testing.assert_close(scale_inv, torch.tensor(3.0 / 448.0))
    g, g_inv = meta.quantize(t * 1e-4, GRAD)
    assert g.dtype == E5M2 and g.float().abs().max().item() == 57344.0
    assert state.amax_history.abs().sum() == 0                              # no history kept


def test_saturation_clamps_instead_of_overflowing():
    q = cast_to_fp8(torch.tensor([1e6, -1e6, 100.0]), torch.tensor(10.0), E4M3)
    assert q.float().tolist() == [448.0, -448.0, 448.0]


# ---------------------------------------------------------------------------------- training

def _run(flags, *extra):
    return pretrain(parse_args(COMMON + flags + list(extra)))


def test_fp8_training_records_amaxes_casts_weights_once_per_step_and_evaluation_leaves_the_history(monkeypatch):
    weight_casts = []
    real = FP8Meta.quantize

    def counting(self, t, operand, *args):
        if operand == WEIGHT:
            weight_casts.append(self.index)
        return real(self, t, operand, *args)

    monkeypatch.setattr(FP8Meta, "quantize", counting)
    run = _run(ARCH["llama"] + DELAYED, "--train-iters", "3", "--eval-interval", "1", "--eval-iters", "2")
    n = len(run.module.fp8_state.names)
    assert n == 4 * 4                                       # four linears in each of the four layers
    # 4 microbatches per step, 3 steps, an evaluation after each: each weight is cast once per version
    # it is used at (the initial one and the three the steps wrote), not per microbatch or per use
    assert sorted(weight_casts) == sorted(list(range(n)) * 4)
    history = run.module.fp8_state.amax_history
    assert (history[1:] > 0).all()                                     # recorded, then rolled
    # since the last step only the last evaluation ran: it cast the new weights (their amax is
    # theirs, whatever uses them) and recorded none of its activations
    assert (history[0, :, WEIGHT] > 0).all() and history[0, :, INPUT].abs().sum() == 0
    assert history[0, :, GRAD].abs().sum() == 0


def test_producers_cast_for_their_linear_as_the_linear_would(monkeypatch):
    """The norms and the MLP activation hand their FP8 linear a carrier with the cast already made:
    the same numbers as when the linear casts its input itself."""
    fused = _run(ARCH["llama"] + DELAYED, "--train-iters", "3")
    carriers = []
    real = fp8.quantized_input
    monkeypatch.setattr("megatron_lite.model.norms.quantized_input", lambda o, m: carriers.append(1) or real(o, m))
    monkeypatch.setattr("megatron_lite.model.layers.quantized_input", lambda o, m: carriers.append(1) or real(o, m))
    again = _run(ARCH["llama"] + DELAYED, "--train-iters", "3")
    assert len(carriers) == 3 * 4 * 4 * 3                  # iterations x microbatches x layers x (2 norms + act)
    monkeypatch.setattr("megatron_lite.model.norms.fits_fp8_gemm", lambda t: False)
    monkeypatch.setattr("megatron_lite.model.layers.fits_fp8_gemm", lambda t: False)
    plain = _run(ARCH["llama"] + DELAYED, "--train-iters", "3")
    _assert_bitwise(_state(fused), _state(plain), "run")
    _assert_bitwise(_state(fused), _state(again), "run")


def test_fp8_changes_the_numbers_but_not_the_parameters_kept():
    bf = _run(ARCH["gpt2"], "--train-iters", "3")
    f8 = _run(ARCH["gpt2"] + TENSORWISE, "--train-iters", "3")
    assert bf.history[-1]["lm loss"] != f8.history[-1]["lm loss"]
    torch.testing.assert_close(torch.tensor([h["lm loss"] for h in f8.history]),
                               torch.tensor([h["lm loss"] for h in bf.history]), rtol=1e-3, atol=0)
    assert {k: v.dtype for k, v in f8.module.state_dict().items()} == {k: v.dtype for k, v in bf.module.state_dict().items()}


def test_first_last_layers_bf16_and_lora_base_in_fp8():
    run = _run(ARCH["gpt2"] + DELAYED, "--train-iters", "3", "--first-last-layers-bf16")
    assert {n.split(".")[2] for n in run.module.fp8_state.names} == {"1", "2"}
    layers = run.module.decoder.layers
    assert layers[0].self_attention.linear_qkv.fp8 is None and layers[1].self_attention.linear_qkv.fp8 is not None


def test_a_lora_run_keeps_its_base_in_fp8_and_trains_the_adapters(tmp_path):
    base = str(tmp_path / "base")
    _run(ARCH["llama"], "--train-iters", "3", "--save", base)
    run = _run(ARCH["llama"] + DELAYED, "--lora-rank", "4", "--pretrained-checkpoint", base, "--train-iters", "3",
               "--lr", "1e-2")
    qkv = run.module.decoder.layers[0].self_attention.linear_qkv
    assert qkv.fp8 is not None and not qkv.weight.requires_grad and qkv.weight.grad is None
    assert qkv.adapter.lora_B.weight.abs().max() > 0
    assert run.module.decoder.layers[0].input_layernorm.fp8_consumer is None   # the adapter reads the real input


# ---------------------------------------------------------------------------------- flags

def _validated(*flags):
    return validate(parse_args(COMMON + list(flags)), 1)


def test_flags_are_megatrons():
    cfg = _validated("--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--fp8-amax-history-len", "1024",
                     "--fp8-amax-compute-algo", "max", "--fp8-margin", "1", "--fp8-interval", "1")
    m = cfg.model
    assert (m.fp8, m.fp8_recipe, m.fp8_amax_history_len, m.fp8_amax_compute_algo, m.fp8_margin) == \
        ("hybrid", "delayed", 1024, "max", 1)
    assert FP8Recipe.from_config(m) == FP8Recipe(E4M3, E5M2, True, 1024, "max", 1)
    assert FP8Recipe.from_config(_validated("--fp8-format", "e4m3").model).backward_dtype == E4M3
    assert FP8Recipe.from_config(_validated().model) is None
    defaults = _validated("--fp8-format", "e4m3").model   # Megatron-Core's defaults
    assert (defaults.fp8_recipe, defaults.fp8_amax_history_len, defaults.fp8_amax_compute_algo) == \
        ("delayed", 1, "most_recent")


@pytest.mark.parametrize("flags,message", [
    (["--fp8-recipe", "mxfp8"], "--fp8-recipe mxfp8 is Transformer Engine's"),
    (["--fp8-amax-history-len", "0"], "--fp8-amax-history-len 0: give at least 1"),
    (["--fp8-margin", "-1"], "--fp8-margin -1: give a margin of 0 or more"),
    (["--hidden-size", "40", "--num-attention-heads", "4"], "multiples of 16, but --hidden-size is 40"),
    (["--micro-batch-size", "1", "--seq-length", "8", "--global-batch-size", "8"],
     "--seq-length x --micro-batch-size is 8"),
    (["--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "2", "--num-layers-at-end-in-bf16", "2"],
     "leave no FP8 layer of --num-layers 4"),
])
def test_bad_fp8_flags_stop_with_one_line(flags, message):
    with pytest.raises(ConfigError) as e:
        _validated("--fp8-format", "hybrid", *flags)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fp8_param_gather_is_refused_by_name():
    with pytest.raises(ConfigError) as e:
        parse_args(COMMON + ["--fp8-format", "hybrid", "--fp8-param-gather"])
    assert "--fp8-param-gather" in str(e.value) and "FP8 parameters" in str(e.value)


# ---------------------------------------------------------------------------------- checkpoints

def test_resumed_fp8_run_is_bitwise_the_straight_run_and_the_state_is_in_the_checkpoint(tmp_path):
    flags = ARCH["llama"] + DELAYED + ["--train-iters", "6", "--save-interval", "3"]
    straight = _run(flags, "--save", str(tmp_path / "a"))
    _run(flags, "--save", str(tmp_path / "b"), "--exit-interval", "3")
    resumed = _run(flags, "--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"))
    assert "fp8 scaling                     restored" in resumed.checkpoints.load_report
    want = _state(straight)
    want["history"] = want["history"][3:]   # the resumed run logs iterations 4 to 6
    _assert_bitwise(want, _state(resumed), "run")
    _assert_bitwise(straight.module.fp8_state.state_dict(), resumed.module.fp8_state.state_dict(), "fp8")
    saved = load_file(str(tmp_path / "a"), 6, "mp_rank_00_000/model_optim_rng.pt")["fp8_state"]
    _assert_bitwise(saved, straight.module.fp8_state.state_dict(), "saved fp8 state")
    assert {v.dtype for v in saved["linears"]["decoder.layers.0.mlp.linear_fc1"].values()} == {torch.float32}


def test_checkpoints_move_between_fp8_and_high_precision_runs(tmp_path):
    f8_dir, bf_dir = str(tmp_path / "f8"), str(tmp_path / "bf")
    f8 = _run(ARCH["gpt2"] + DELAYED, "--train-iters", "3", "--save", f8_dir)
    bf = _run(ARCH["gpt2"], "--train-iters", "3", "--save", bf_dir)
    # FP8 -> high precision: the weights, as saved; the scaling state stays behind
    into_bf = _run(ARCH["gpt2"], "--train-iters", "3", "--load", f8_dir, "--finetune")
    assert len(into_bf.history) == 3
    assert "fp8 scaling                     not used (saved by an --fp8-format hybrid run" in \
        into_bf.checkpoints.load_report
    # high precision -> FP8: the weights, fresh scales
    into_f8 = pretrain(parse_args(COMMON + ARCH["gpt2"] + DELAYED + ["--train-iters", "3", "--load", bf_dir]),
                       load=True)
    assert "fp8 scaling                     fresh (the checkpoint has no FP8 scaling state)" in \
        into_f8.checkpoints.load_report
    saved = load_file(bf_dir, 3, "mp_rank_00_000/model_optim_rng.pt")["model"]
    _assert_bitwise(dict(into_f8.module.state_dict()), saved, "weights")   # nothing trained: iteration 3 of 3
    assert into_f8.module.fp8_state.scale.eq(1).all()
    assert f8.module.state_dict().keys() == bf.module.state_dict().keys()
    # a changed delayed-scaling setting: fresh state, named
    other = _run(ARCH["gpt2"] + DELAYED, "--fp8-amax-history-len", "2", "--train-iters", "3", "--load", f8_dir)
    assert "--fp8-amax-history-len 4, this run has 2" in other.checkpoints.load_report


def _resharded_fp8_state(rank, world_size, argv):
    run = pretrain(parse_args(argv))
    return run.module.fp8_state.state_dict()["linears"], run.checkpoints.load_report


def test_fp8_state_reshards_by_global_layer_names(tmp_path):
    d = str(tmp_path / "ck")
    saved = _run(ARCH["gpt2"] + DELAYED, "--train-iters", "3", "--save", d).module.fp8_state.state_dict()
    argv = COMMON + ARCH["gpt2"] + DELAYED + ["--train-iters", "3", "--load", d,
                                              "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    results = run_distributed(_resharded_fp8_state, 4, argv)
    got = {}
    for linears, report in results:
        assert "fp8 scaling" in report and "restored" in report.split("fp8 scaling")[1].split("\n")[0]
        got.update(linears)
    _assert_bitwise(got, saved["linears"], "fp8 state")


# ---------------------------------------------------------------------------------- layouts

LAYOUTS = [
    # (id, world, arch, flags, recipe, parameter rtol): delayed scales are reduced over TP and DP,
    # so TP and PP cast exactly what one process casts; tensorwise TP casts each shard with its own scale
    ("tp2-delayed", 2, "llama", ["--tensor-model-parallel-size", "2"], DELAYED, 1e-5),
    ("tp2-sp-delayed", 2, "gpt2", ["--tensor-model-parallel-size", "2", "--sequence-parallel"], DELAYED, None),
    ("pp2-tensorwise", 2, "gpt2", ["--pipeline-model-parallel-size", "2"], TENSORWISE, 1e-5),
    ("dp2-distopt-delayed", 2, "llama", ["--use-distributed-optimizer"], DELAYED, None),
    ("tp2-tensorwise", 2, "llama", ["--tensor-model-parallel-size", "2"], TENSORWISE, None),
]


@pytest.mark.parametrize("name,world,arch,flags,recipe,param_rtol", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_fp8_parallel_runs_match_the_single_process_fp8_run(name, world, arch, flags, recipe, param_rtol):
    single = run_distributed(_train, 1, COMMON + ARCH[arch] + recipe)[0]
    results = run_distributed(_train, world, COMMON + ARCH[arch] + recipe + flags)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=0)
    if param_rtol is not None:
        want, got = _global_params([single]), _global_params(results)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=param_rtol, atol=1e-7, msg=k)


def test_full_recompute_under_fp8_is_bitwise_the_plain_run():
    flags = ARCH["llama"] + DELAYED + ["--train-iters", "3"]
    plain = _run(flags)
    recomputed = _run(flags, "--recompute-granularity", "full", "--recompute-method", "uniform",
                      "--recompute-num-layers", "1")
    _assert_bitwise(_state(plain), _state(recomputed), "run")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", [DELAYED, TENSORWISE], ids=["delayed", "tensorwise"])
def test_resumed_fp8_run_on_the_gpu_is_bitwise_the_straight_run_with_deterministic_mode(recipe, tmp_path):
    """bf16 weights, the CUDA kernels (the norms and the activation writing FP8) and cuBLASLt's FP8 GEMMs."""
    flags = ARCH["llama"] + recipe + ["--bf16", "--deterministic-mode", "--train-iters", "6", "--save-interval", "3",
                                      "--hidden-size", "64", "--num-attention-heads", "4", "--kv-channels", "16"]
    straight = _run(flags, "--save", str(tmp_path / "a"))
    assert straight.module.decoder.layers[0].self_attention.linear_qkv.weight.is_cuda
    _run(flags, "--save", str(tmp_path / "b"), "--exit-interval", "3")
    resumed = _run(flags, "--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"))
    want = _state(straight)
    want["history"] = want["history"][3:]
    _assert_bitwise(want, _state(resumed), "run")
    bf16 = _run(ARCH["llama"] + ["--bf16", "--train-iters", "6", "--hidden-size", "64", "--num-attention-heads", "4",
                                 "--kv-channels", "16"])
    torch.testing.assert_close(torch.tensor([h["lm loss"] for h in straight.history]),
                               torch.tensor([h["lm loss"] for h in bf16.history]), rtol=2e-2, atol=0)
