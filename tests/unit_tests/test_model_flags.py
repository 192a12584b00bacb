"""The flags that change the model's math compute what Megatron-LM computes with them: the MLP
activation (--no-bias-gelu-fusion, --squared-relu), zero-centred norms (--apply-layernorm-1p),
RoPE variants, --qk-layernorm, the attention backends and the softmax options of the explicit
one, the cross-entropy choice, selective recomputation and the apex LayerNorm choice."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.checkpoint.hf import GPT2_ARCH, LLAMA
from megatron_lite.config import ModelConfig
from megatron_lite.model.attention import CoreAttention, rotate_interleaved
from megatron_lite.model.gpt import GPTModel
from megatron_lite.model.layers import MLP, Norm
from megatron_lite.ops import build_ops, torch_ops
from megatron_lite.ops.apex_ops import use_persistent_layer_norm
from megatron_lite.parallel.random import seed_everything
from megatron_lite.parallel.state import initialize
from tests.unit_tests.dist_utils import run_distributed

OPS = build_ops(fused_kernels=False)
GPT2 = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
            vocab_size=64, padded_vocab_size=64, ffn_hidden_size=64, hidden_dropout=0.0, attention_dropout=0.0)
LLAMA_LIKE = dict(GPT2, normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
                  group_query_attention=True, num_query_groups=2, untie_embeddings_and_output_weights=True)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _model(state=None, **fields):
    state = state or initialize()
    seed_everything(3, state.tp_rank, state.pp_rank, state.rng)
    return GPTModel(ModelConfig(**fields), state, OPS)


def _batch(b=2, s=16, vocab=64):
    ids = torch.randint(0, vocab, (b, s), generator=_gen())
    return ids, torch.arange(s).expand(b, s)


def _loss_and_grads(model, ids, pos):
    model.zero_grad()
    loss = model(ids, pos, labels=ids.roll(-1, 1)).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- MLP activation

def _mlp(**fields):
    torch.manual_seed(0)
    mlp = MLP(ModelConfig(**dict(GPT2, **fields)), initialize(), OPS, torch.float32)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return mlp


def _mlp_reference(mlp, x, activation):
    h = F.linear(x, mlp.linear_fc1.weight, mlp.linear_fc1.bias)
    return F.linear(activation(h), mlp.linear_fc2.weight)   # fc2's bias is returned apart


def test_bias_gelu_fusion_is_tanh_gelu_and_no_bias_gelu_fusion_is_exact_erf_gelu():
    x = torch.randn(5, 2, 32, generator=_gen())
    fused, exact = _mlp(bias_gelu_fusion=True), _mlp(bias_gelu_fusion=False)
    y_fused, y_exact = fused(x)[0], exact(x)[0]
    torch.testing.assert_close(y_fused, _mlp_reference(fused, x, lambda h: F.gelu(h, approximate="tanh")),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_exact, _mlp_reference(exact, x, lambda h: F.gelu(h, approximate="none")),
                               rtol=1e-6, atol=1e-6)
    assert (y_fused - y_exact).abs().max() > 1e-4


def test_squared_relu_mlp_is_relu_squared():
    mlp = _mlp(squared_relu=True)
    x = torch.randn(5, 2, 32, generator=_gen())
    torch.testing.assert_close(mlp(x)[0], _mlp_reference(mlp, x, lambda h: F.relu(h) ** 2), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- norms

@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_layernorm_1p_stores_zeros_and_applies_one_plus_weight(normalization):
    cfg = ModelConfig(**dict(GPT2, normalization=normalization, apply_layernorm_1p=True))
    norm = Norm(cfg, initialize(), OPS, torch.float32)
    assert torch.equal(norm.weight, torch.zeros(32))
    with torch.no_grad():
        norm.weight.normal_(generator=_gen())
    x = torch.randn(4, 32, generator=_gen(1))
    plain = Norm(ModelConfig(**dict(GPT2, normalization=normalization)), initialize(), OPS, torch.float32)
    with torch.no_grad():
        plain.weight.copy_(norm.weight + 1)
    torch.testing.assert_close(norm(x), plain(x), rtol=0, atol=1e-6)


def test_layernorm_1p_model_equals_the_plain_model_with_weights_plus_one():
    ids, pos = _batch()
    plain, one_p = _model(**GPT2), _model(**GPT2, apply_layernorm_1p=True)
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in one_p.named_parameters() if "layernorm.weight" in n)
    state = {n: (p - 1 if "layernorm.weight" in n else p) for n, p in plain.state_dict().items()}
    one_p.load_state_dict(state)
    torch.testing.assert_close(one_p(ids, pos), plain(ids, pos), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- Hugging Face conversion

def _hf_gpt2(activation):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=64,
                                     activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.normal_(1.0, 0.3)
    return model, config.to_dict()


def _load_hf(model, hf_config, **overrides):
    cfg = GPT2_ARCH.model_config(hf_config)
    for key, value in dict(overrides, padded_vocab_size=cfg.vocab_size).items():
        setattr(cfg, key, value)
    hf_state = model.state_dict()
    ours = GPTModel(cfg, initialize(), OPS)
    rules = GPT2_ARCH.rules(cfg, hf_state.keys())
    ours.load_state_dict({n: rules[ours.global_name(n)].to_megatron([hf_state[h] for h in
                                                                    rules[ours.global_name(n)].hf_names])
                          for n in ours.state_dict()})
    return cfg, ours.eval(), rules


@pytest.mark.parametrize("activation, bias_gelu_fusion, one_p", [("gelu_new", True, False), ("gelu", False, False),
                                                                 ("gelu_new", True, True)])
def test_hf_gpt2_logits_match_with_exact_gelu_and_zero_centred_norms(activation, bias_gelu_fusion, one_p):
    model, hf_config = _hf_gpt2(activation)
    cfg, ours, rules = _load_hf(model, hf_config, apply_layernorm_1p=one_p)
    assert cfg.bias_gelu_fusion is bias_gelu_fusion
    assert GPT2_ARCH.hf_config(cfg)["activation_function"] == activation
    ids, pos = _batch()
    with torch.no_grad():
        expected = model(ids).logits
        got = ours(ids, pos).transpose(0, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    rule = rules["decoder.layers.0.input_layernorm.weight"]
    stored = ours.state_dict()["decoder.layers.0.input_layernorm.weight"]
    torch.testing.assert_close(rule.to_hf(stored)[0], model.state_dict()["transformer.h.0.ln_1.weight"],
                               rtol=0, atol=1e-7)
    if one_p:
        torch.testing.assert_close(stored + 1, model.state_dict()["transformer.h.0.ln_1.weight"], rtol=0, atol=1e-7)


def test_hf_gpt2_squared_relu_is_relu2_and_llama_refuses_what_it_lacks():
    cfg = ModelConfig(**dict(GPT2, squared_relu=True))
    assert GPT2_ARCH.hf_config(cfg)["activation_function"] == "relu2"
    assert GPT2_ARCH.model_config(GPT2_ARCH.hf_config(cfg)).squared_relu
    for flag, text in (("rotary_interleaved", "--rotary-interleaved"), ("qk_layernorm", "--qk-layernorm")):
        with pytest.raises(ValueError, match=text):
            LLAMA.hf_config(ModelConfig(**dict(LLAMA_LIKE, **{flag: True})))


# --------------------------------------------------------------------------- rotary embedding

def test_rotary_interleaved_rotates_pairs_as_rotate_half_rotates_halves():
    """Interleaved RoPE on dims (2i, 2i+1) is rotate-half RoPE on the dims reordered so that pair i
    becomes (i, i + d/2)."""
    s, d = 6, 8
    angles = torch.rand(s, 1, 1, d // 2, generator=_gen()) * 6
    t = torch.randn(s, 2, 3, d, generator=_gen(1))
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    halves = torch.cat([angles, angles], dim=-1)
    pairs = angles.repeat_interleave(2, dim=-1)
    expected = torch.empty_like(t)
    expected[..., order] = torch_ops.rotary(t[..., order], halves.cos(), halves.sin())
    torch.testing.assert_close(rotate_interleaved(t, pairs.cos(), pairs.sin()), expected, rtol=0, atol=1e-6)


def test_rope_fusion_on_and_off_and_interleaved_models():
    ids, pos = _batch()
    fused = _model(**LLAMA_LIKE, apply_rope_fusion=True)
    plain = _model(**LLAMA_LIKE, apply_rope_fusion=False)
    interleaved = _model(**LLAMA_LIKE, rotary_interleaved=True)
    assert torch.equal(fused(ids, pos), plain(ids, pos))
    assert not torch.allclose(fused(ids, pos), interleaved(ids, pos))


# --------------------------------------------------------------------------- qk layernorm

def test_qk_layernorm_normalises_each_head_of_q_and_k():
    model = _model(**LLAMA_LIKE, qk_layernorm=True, norm_epsilon=1e-12)
    attn = model.decoder.layers[0].self_attention
    names = {n for n, _ in model.named_parameters()}
    assert {"decoder.layers.0.self_attention.q_layernorm.weight",
            "decoder.layers.0.self_attention.k_layernorm.weight"} <= names
    assert attn.q_layernorm.weight.shape == (8,)
    seen = {}
    attn.core_attention.register_forward_pre_hook(lambda m, args: seen.update(q=args[0]))
    with torch.no_grad():
        attn.q_layernorm.weight.fill_(1.0)
        model(*_batch())
    rms = seen["q"].pow(2).mean(-1).sqrt()   # RMSNorm per head, then rotation (norm-preserving)
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-3)


def _qk_norm_grads(rank, world_size, sequence_parallel):
    state = initialize(tensor_model_parallel_size=world_size, sequence_parallel=sequence_parallel)
    model = _model(state, **dict(LLAMA_LIKE, qk_layernorm=True))
    ids, pos = _batch()
    model(ids, pos, labels=ids.roll(-1, 1)).mean().backward()
    grads = {}
    for n, p in model.named_parameters():
        if "q_layernorm" in n or "k_layernorm" in n:
            assert p.sequence_parallel == (world_size > 1), n   # summed over TP by finalize_model_grads
            g = p.grad.clone()
            if world_size > 1:
                torch.distributed.all_reduce(g, group=state.tp_group)
            grads[n] = g
    return grads


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_qk_layernorm_grads_summed_over_tp_equal_the_single_rank_grads(sequence_parallel):
    dense = run_distributed(_qk_norm_grads, 1, False)[0]
    tp = run_distributed(_qk_norm_grads, 2, sequence_parallel)
    for name, grad in dense.items():
        for rank_grads in tp:
            torch.testing.assert_close(rank_grads[name], grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- attention

def _core(dtype=torch.float32, layer_number=3, **fields):
    cfg = ModelConfig(**dict(LLAMA_LIKE, **fields))
    core = CoreAttention(cfg, initialize(), OPS, layer_number)
    g = _gen()
    q = torch.randn(2, 4, 16, 8, generator=g).to(dtype)
    k = torch.randn(2, 2, 16, 8, generator=g).to(dtype)
    v = torch.randn(2, 2, 16, 8, generator=g).to(dtype)
    return core, (q, k, v)


@pytest.mark.parametrize("backend", ["unfused", "local"])
@pytest.mark.parametrize("masked", [False, True])
def test_explicit_attention_equals_sdpa_in_fp32(backend, masked):
    mask = None
    if masked:   # causal and a document boundary at token 7 (True = masked)
        doc = torch.arange(16) < 7
        mask = (torch.ones(16, 16, dtype=torch.bool).triu(1) | (doc[:, None] != doc[None, :]))[None, None]
    sdpa, (q, k, v) = _core(attention_backend="auto")
    for extra in ({}, {"apply_query_key_layer_scaling": True, "attention_softmax_in_fp32": True},
                  {"masked_softmax_fusion": False}):
        explicit, _ = _core(attention_backend=backend, **extra)
        torch.testing.assert_close(explicit(q, k, v, mask), sdpa(q, k, v, mask), rtol=0, atol=1e-6)


def test_attention_softmax_in_fp32_is_closer_to_fp64_in_bf16():
    """bf16 scores: with --attention-softmax-in-fp32 the layer-scaling multiply, the mask and the
    softmax run in fp32 (torch's bf16 softmax accumulates in fp32 itself, so the multiply by the layer
    number is where the bf16 path rounds)."""
    reference, (q, k, v) = _core(attention_backend="unfused")
    exact = reference(q.double(), k.double(), v.double())
    outputs = {}
    for fp32 in (False, True):
        core, _ = _core(attention_backend="unfused", layer_number=7, apply_query_key_layer_scaling=True,
                        attention_softmax_in_fp32=fp32, masked_softmax_fusion=False)
        outputs[fp32] = core(q.bfloat16(), k.bfloat16(), v.bfloat16())
        assert outputs[fp32].dtype == torch.bfloat16
    assert not torch.equal(outputs[False], outputs[True])
    errors = {fp32: (out.double() - exact).abs().mean().item() for fp32, out in outputs.items()}
    assert errors[True] < errors[False]


def test_query_key_layer_scaling_divides_scores_and_multiplies_back_in_the_softmax():
    core, (q, k, v) = _core(attention_backend="unfused", layer_number=5, apply_query_key_layer_scaling=True,
                            attention_softmax_in_fp32=True)
    assert core.softmax_scale == pytest.approx(1 / math.sqrt(8) / 5)
    scores = torch.randn(2, 4, 16, 16, generator=_gen()).bfloat16()
    probs = core.scale_mask_softmax(scores, None)
    causal = torch.ones(16, 16, dtype=torch.bool).triu(1)
    expected = torch.softmax((scores.float() * 5).masked_fill(causal, -10000.0), -1).bfloat16()
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["flash", "fused", "auto"])
def test_sdpa_backends_run_on_cpu_with_the_same_numbers(backend):
    auto, (q, k, v) = _core(attention_backend="auto")
    core, _ = _core(attention_backend=backend)
    torch.testing.assert_close(core(q, k, v), auto(q, k, v), rtol=0, atol=0)


def test_models_with_explicit_and_sdpa_attention_agree():
    ids, pos = _batch()
    sdpa = _model(**LLAMA_LIKE)
    explicit = _model(**LLAMA_LIKE, attention_backend="unfused", apply_query_key_layer_scaling=True)
    torch.testing.assert_close(explicit(ids, pos), sdpa(ids, pos), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- cross entropy

class _CountingOps:
    """The model's ops with the fused cross entropy counted."""

    def __init__(self, ops):
        self.ops, self.calls = ops, 0

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def vocab_parallel_cross_entropy(self, *args, **kwargs):
        self.calls += 1
        return self.ops.vocab_parallel_cross_entropy(*args, **kwargs)


def test_cross_entropy_loss_fusion_picks_the_fused_op_and_both_give_the_same_loss():
    ids, pos = _batch()
    losses = {}
    for fusion in (False, True):
        model = _model(**GPT2, cross_entropy_loss_fusion=fusion)
        model.ops = counting = _CountingOps(OPS)
        losses[fusion] = model(ids, pos, labels=ids)
        assert counting.calls == (1 if fusion else 0)
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=0)


# --------------------------------------------------------------------------- selective recompute

@pytest.mark.parametrize("modules", [["core_attn"], ["mlp"], ["core_attn", "mlp", "layernorm", "mlp_act"]])
def test_selective_recompute_gives_the_same_loss_and_grads_with_dropout(modules):
    ids, pos = _batch()
    fields = dict(LLAMA_LIKE, hidden_dropout=0.2, attention_dropout=0.2)
    loss, grads = _loss_and_grads(_model(**fields), ids, pos)
    r_loss, r_grads = _loss_and_grads(_model(**fields, recompute_granularity="selective", recompute_modules=modules),
                                      ids, pos)
    assert torch.equal(loss, r_loss)
    for name, grad in grads.items():
        assert torch.equal(r_grads[name], grad), name


# --------------------------------------------------------------------------- kernel choice

def test_persistent_layer_norm_is_megatrons_choice():
    assert use_persistent_layer_norm(4096, persist_layer_norm=True, available=True)
    assert not use_persistent_layer_norm(4096, persist_layer_norm=False, available=True)   # --no-persist-layer-norm
    assert not use_persistent_layer_norm(4000, persist_layer_norm=True, available=True)    # not a built size
    assert not use_persistent_layer_norm(4096, persist_layer_norm=True, available=False)


def test_no_fused_kernels_and_transformer_impl_reach_the_op_choice():
    assert build_ops(fused_kernels=False, device=torch.device("cuda")).describe().endswith("(--no-fused-kernels)")
    with pytest.raises(ValueError, match="transformer_impl"):
        build_ops(transformer_impl="te")


# --------------------------------------------------------------------------- on a GPU



@pytest.mark.parametrize("backend", ["flash", "fused", "auto", "unfused"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("cuda_ops", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attention_backends_on_gpu_in_bf16_match_fp64(backend, masked, gqa, cuda_ops):
    """Each backend's bf16 forward and backward against an fp64 reference; the unfused backend
    with the fused scale-mask-softmax kernels (cuda_ops) and without."""
    ops = build_ops(device=torch.device("cuda")) if cuda_ops else OPS
    fields = dict(LLAMA_LIKE, attention_backend=backend, num_query_groups=2 if gqa else 4, kv_channels=64)
    core = CoreAttention(ModelConfig(**fields), initialize(), ops, layer_number=2)
    g = _gen()
    s = 256
    q = torch.randn(2, 4, s, 64, generator=g)
    k, v = (torch.randn(2, 2 if gqa else 4, s, 64, generator=g) for _ in range(2))
    mask = None
    if masked:
        doc = torch.arange(s) < 100
        mask = (torch.ones(s, s, dtype=torch.bool).triu(1) | (doc[:, None] != doc[None, :]))[None, None].cuda()
    reference = CoreAttention(ModelConfig(**dict(fields, attention_backend="unfused")), initialize(), OPS, 2)
    leaves = [t.cuda().double().requires_grad_() for t in (q, k, v)]
    out_ref = reference(*leaves, mask)
    out_ref.square().sum().backward()
    tested = [t.cuda().bfloat16().requires_grad_() for t in (q, k, v)]
    out = core(*tested, mask)
    out.float().square().sum().backward()
    for got, expected in ((out, out_ref), *((a.grad, b.grad) for a, b in zip(tested, leaves))):
        assert (got.double() - expected).abs().max() < 0.05 * expected.abs().max()


def test_build_ops_for_reads_the_run_flags():
    from megatron_lite.ops import build_ops_for
    cfg = ModelConfig(fused_kernels=False, no_persist_layer_norm=True)
    assert build_ops_for(cfg, torch.device("cuda")).describe().endswith("(--no-fused-kernels)")
