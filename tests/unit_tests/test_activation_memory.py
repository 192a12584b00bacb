"""What the backward keeps: --recompute-granularity selective gives the same numbers as no
recomputation with the discarded outputs' memory freed until the backward needs it (and its flag
errors); attention with RoPE does not keep the fused QKV output alive."""

import pytest
import torch

from megatron_lite.arguments import ConfigError, parse_args
from megatron_lite.initialize import build_run, setup_parallel

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
        "--train-iters", "1", "--hidden-dropout", "0", "--attention-dropout", "0"]
ARCH = {
    "gpt2": [],
    "llama": ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
              "--disable-bias-linear", "--untie-embeddings-and-output-weights"],
}
SELECTIVE = ["--recompute-granularity", "selective", "--recompute-modules"]
FULL = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]


def _forward_backward(argv):
    """(loss, parameter gradients, bytes held by the tensors the backward keeps, model config, the
    sizes of those tensors' storages) for one batch; parameters do not count, and the bytes are
    counted after the forward, when the discarded outputs are freed."""
    cfg = parse_args(argv)
    run = build_run(cfg, setup_parallel(cfg))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 63, (2, 16), generator=gen)
    positions = torch.arange(16).expand(2, 16)
    params = {p.untyped_storage().data_ptr() for p in run.module.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run.module(tokens, positions, labels=tokens.roll(-1, 1)).mean()
    held = sum(s.nbytes() for s in saved.values())
    sizes = sorted(s.nbytes() for s in saved.values())
    loss.backward()
    grads = {n: p.main_grad.clone() if getattr(p, "main_grad", None) is not None else p.grad.clone()
             for n, p in run.module.named_parameters()}
    return loss.item(), grads, held, run.cfg.model, sizes


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_selective_recompute_same_numbers_less_memory(arch):
    loss, grads, held, m, _ = _forward_backward(TINY + ARCH[arch])
    tokens, bytes_per = 2 * 16, 4   # fp32
    freed = {"layernorm": m.num_layers * 2 * tokens * m.hidden_size * bytes_per,
             "mlp_act": m.num_layers * tokens * m.ffn_size * bytes_per}
    for modules in (["layernorm"], ["mlp_act"], ["layernorm", "mlp_act"]):
        r_loss, r_grads, r_held, _, _ = _forward_backward(TINY + ARCH[arch] + SELECTIVE + modules)
        assert r_loss == loss
        assert r_grads.keys() == grads.keys()
        for name in grads:
            assert torch.equal(r_grads[name], grads[name]), (modules, name)
        assert held - r_held == sum(freed[mod] for mod in modules), modules
    for modules in (["core_attn"], ["mlp"]):   # keep only their inputs: the same numbers, less held
        r_loss, r_grads, r_held, _, _ = _forward_backward(TINY + ARCH[arch] + SELECTIVE + modules)
        assert r_loss == loss
        for name in grads:
            assert torch.equal(r_grads[name], grads[name]), (modules, name)
        assert r_held < held, modules


@pytest.mark.parametrize("extra, message", [
    (["--recompute-modules", "layernorm"], "--recompute-modules needs --recompute-granularity selective"),
    (SELECTIVE + ["attention"], "--recompute-modules takes core_attn layernorm mlp mlp_act, not attention"),
    (FULL + ["--recompute-activations"], "does not combine with --recompute-granularity full"),
    (["--recompute-granularity", "full"], 'recompute_method must be "block" or "uniform"'),
    (["--recompute-method", "uniform"], "apply to --recompute-granularity full"),
])
def test_recompute_flag_errors(extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        setup_parallel(parse_args(TINY + extra))


def test_recompute_activations_is_selective_recompute_of_core_attention():
    cfg = parse_args(TINY + ["--recompute-activations"])
    setup_parallel(cfg)
    assert (cfg.model.recompute_granularity, cfg.model.recompute_modules) == ("selective", ["core_attn"])


def test_rope_attention_keeps_v_not_the_qkv_output():
    _, _, _, m, sizes = _forward_backward(TINY + ARCH["llama"])
    tokens, bytes_per = 2 * 16, 4
    qkv = tokens * (m.num_attention_heads + 2 * m.query_groups) * m.head_dim * bytes_per
    v = tokens * m.query_groups * m.head_dim * bytes_per
    assert qkv not in sizes
    assert sizes.count(v) >= m.num_layers   # v itself (and k after RoPE: the same size)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_residual_adds_left_to_the_next_norm_give_the_same_numbers(arch):
    """Each layer's last residual add is done by the next norm (fused with it on GPUs); under
    full recompute every layer adds its own output instead. Same loss and gradients, bit
    for bit, dropout included."""
    dropout = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    loss, grads, _, _, _ = _forward_backward(TINY + ARCH[arch] + dropout)
    r_loss, r_grads, _, _, _ = _forward_backward(TINY + ARCH[arch] + dropout + FULL)
    assert r_loss == loss
    for name in grads:
        assert torch.equal(r_grads[name], grads[name]), name
