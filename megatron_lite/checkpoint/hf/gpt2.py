"""GPT-2 on Hugging Face: LayerNorm, GeLU (tanh, or exact, or squared ReLU), learned positions, biases,
tied embeddings.

Its linear layers are Conv1D modules whose weight is stored [in, out], the transpose of a
linear layer's; c_attn holds [q; k; v] (each hidden rows after the transpose), which becomes
megatron_lite's per-head [q_h; k_h; v_h] layout.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron_lite.checkpoint.hf.mapping import (Architecture, Rule, UnsupportedModelError, copy_rule, expect,
                                                 norm_rule, pack_qkv, transposed_rule, unpack_qkv, vocab_rule)
from megatron_lite.config import ModelConfig, default_ffn_hidden_size

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")   # the same function: --bias-gelu-fusion's tanh GeLU
# config.json activation_function -> (bias_gelu_fusion, squared_relu)
ACTIVATIONS = {**{name: (True, False) for name in GELU_TANH}, "gelu": (False, False), "relu2": (True, True)}


def activation_name(cfg: ModelConfig) -> str:
    """The activation_function of config.json that computes this model's MLP activation."""
    if cfg.squared_relu:
        return "relu2"
    return "gelu_new" if cfg.bias_gelu_fusion else "gelu"


def c_attn_rule(hf_name: str, cfg: ModelConfig, conv1d_weight: bool) -> Rule:
    """c_attn's weight ([hidden, 3 * hidden], Conv1D) or bias ([3 * hidden]) <-> linear_qkv."""
    heads, d = cfg.num_attention_heads, cfg.head_dim

    def to_megatron(ts):
        qkv = ts[0].t() if conv1d_weight else ts[0]
        return pack_qkv(*qkv.chunk(3, dim=0), heads)

    def to_hf(t):
        qkv = torch.cat(unpack_qkv(t, heads, heads, d), dim=0)
        return [qkv.t().contiguous() if conv1d_weight else qkv]

    return Rule((hf_name,), to_megatron, to_hf)


class GPT2(Architecture):
    model_type, hf_class = "gpt2", "GPT2LMHeadModel"
    prefixes, word_embedding, layers = ("transformer.", ""), "wte.weight", "h"
    ignored = (r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",)   # causal-mask buffers of older checkpoints

    def model_config(self, hf: dict, seq_length: Optional[int] = None) -> ModelConfig:
        expect(hf, "activation_function", tuple(ACTIVATIONS), "gelu_new",
               "megatron_lite's GPT-2 MLP is the tanh GeLU, the exact GeLU (--no-bias-gelu-fusion) or squared ReLU")
        bias_gelu_fusion, squared_relu = ACTIVATIONS[hf.get("activation_function", "gelu_new")]
        expect(hf, "scale_attn_weights", (True,), True, "attention scores are always scaled by 1/sqrt(head_dim)")
        expect(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
        expect(hf, "add_cross_attention", (False,), False)
        hidden, positions = hf["n_embd"], hf["n_positions"]
        seq_length = seq_length or positions
        if seq_length > positions:
            raise UnsupportedModelError(f"--seq-length {seq_length} exceeds the model's n_positions={positions} "
                                        f"learned positions")
        return ModelConfig(
            num_layers=hf["n_layer"], hidden_size=hidden,
            ffn_hidden_size=hf.get("n_inner") or default_ffn_hidden_size(hidden, swiglu=False),
            num_attention_heads=hf["n_head"], seq_length=seq_length, max_position_embeddings=positions,
            vocab_size=hf["vocab_size"], normalization="LayerNorm", norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            swiglu=False, squared_relu=squared_relu, bias_gelu_fusion=bias_gelu_fusion,
            position_embedding_type="learned_absolute", add_bias_linear=True, add_qkv_bias=False,
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True),
            hidden_dropout=hf.get("resid_pdrop", 0.1), attention_dropout=hf.get("attn_pdrop", 0.1),
            init_method_std=hf.get("initializer_range", 0.02))

    def hf_config(self, cfg: ModelConfig) -> dict:
        problems = []
        if cfg.normalization != "LayerNorm" or cfg.swiglu or cfg.position_embedding_type != "learned_absolute":
            problems.append("GPT-2 needs LayerNorm, GeLU and learned absolute positions")
        if not cfg.add_bias_linear:
            problems.append("GPT-2 has biases on every linear layer (drop --disable-bias-linear)")
        if cfg.query_groups != cfg.num_attention_heads or cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
            problems.append("GPT-2 has one key/value head per query head and head_dim = hidden / heads")
        if cfg.qk_layernorm:
            problems.append("GPT-2 has no query/key norms (drop --qk-layernorm)")
        if problems:
            raise UnsupportedModelError(f"this model cannot be written as {self.hf_class}: " + "; ".join(problems))
        return {"architectures": [self.hf_class], "model_type": self.model_type,
                "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_attention_heads,
                "n_inner": cfg.ffn_size if cfg.ffn_size != default_ffn_hidden_size(cfg.hidden_size, False) else None,
                "n_positions": cfg.max_position_embeddings or cfg.seq_length, "vocab_size": cfg.vocab_size,
                "layer_norm_epsilon": cfg.norm_epsilon, "activation_function": activation_name(cfg),
                "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
                "resid_pdrop": cfg.hidden_dropout, "embd_pdrop": cfg.hidden_dropout,
                "attn_pdrop": cfg.attention_dropout, "initializer_range": cfg.init_method_std}

    def outer_rules(self, cfg: ModelConfig, body: str) -> Dict[str, Rule]:
        return {"embedding.word_embeddings.weight": vocab_rule(body + "wte.weight", cfg.vocab_size),
                "embedding.position_embeddings.weight": copy_rule(body + "wpe.weight"),
                "decoder.final_layernorm.weight": norm_rule(body + "ln_f.weight", cfg),
                "decoder.final_layernorm.bias": copy_rule(body + "ln_f.bias"),
                "output_layer.weight": vocab_rule("lm_head.weight", cfg.vocab_size)}

    def layer_rules(self, cfg: ModelConfig, hf_layer: str) -> Dict[str, Rule]:
        h = hf_layer
        return {"input_layernorm.weight": norm_rule(h + "ln_1.weight", cfg),
                "input_layernorm.bias": copy_rule(h + "ln_1.bias"),
                "self_attention.linear_qkv.weight": c_attn_rule(h + "attn.c_attn.weight", cfg, True),
                "self_attention.linear_qkv.bias": c_attn_rule(h + "attn.c_attn.bias", cfg, False),
                "self_attention.linear_proj.weight": transposed_rule(h + "attn.c_proj.weight"),
                "self_attention.linear_proj.bias": copy_rule(h + "attn.c_proj.bias"),
                "pre_mlp_layernorm.weight": norm_rule(h + "ln_2.weight", cfg),
                "pre_mlp_layernorm.bias": copy_rule(h + "ln_2.bias"),
                "mlp.linear_fc1.weight": transposed_rule(h + "mlp.c_fc.weight"),
                "mlp.linear_fc1.bias": copy_rule(h + "mlp.c_fc.bias"),
                "mlp.linear_fc2.weight": transposed_rule(h + "mlp.c_proj.weight"),
                "mlp.linear_fc2.bias": copy_rule(h + "mlp.c_proj.bias")}


GPT2_ARCH = GPT2()
