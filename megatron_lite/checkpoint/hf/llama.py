"""The Llama family on Hugging Face: Llama 2/3 (GQA, RoPE, Llama-3.1 scaling), Mistral, Qwen2.

All three are RMSNorm -> attention with separate q/k/v/o projections and rotate-half RoPE ->
RMSNorm -> SwiGLU MLP (gate, up, down). They differ only in config fields: Qwen2 has a bias
on q/k/v alone, Llama may have biases on every projection (attention_bias, mlp_bias),
Mistral and Qwen2 may have a sliding attention window.
"""

from __future__ import annotations

from typing import Dict, Optional

from megatron_lite.checkpoint.hf.mapping import (Architecture, Rule, UnsupportedModelError, concat_rule,
                                                 copy_rule, expect, norm_rule, qkv_rule, vocab_rule)
from megatron_lite.config import ModelConfig

# megatron_lite's RoPE scaling is Llama-3.1's with these constants (model/layers.py)
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_settings(hf: dict):
    """(rope_theta, Llama-3.1 scaling factor or None) from config.json, in transformers 5's
    `rope_parameters` form or the older `rope_theta` + `rope_scaling`."""
    if isinstance(hf.get("rope_parameters"), dict):
        rope, where = dict(hf["rope_parameters"]), "rope_parameters"
    else:
        rope, where = dict(hf.get("rope_scaling") or {}), "rope_scaling"
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1.0):
        raise UnsupportedModelError(f"config.json has partial_rotary_factor={partial!r}; megatron_lite's Llama "
                                    f"family rotates whole heads")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return float(rope["rope_theta"]), None
    if rope_type != "llama3":
        raise UnsupportedModelError(f"config.json has {where}.rope_type={rope_type!r}; megatron_lite implements "
                                    f"Llama-3.1 RoPE scaling ('llama3') only")
    for field, value in LLAMA3_ROPE_FIXED.items():
        if rope.get(field) != value:
            raise UnsupportedModelError(f"config.json has {where}.{field}={rope.get(field)!r}; megatron_lite's "
                                        f"Llama-3.1 RoPE scaling fixes it at {value}")
    return float(rope["rope_theta"]), float(rope["factor"])


def check_sliding_window(hf: dict, window_in_use: bool, seq_length: int) -> None:
    window = hf.get("sliding_window")
    if window_in_use and window is not None and window < seq_length:
        raise UnsupportedModelError(
            f"config.json has sliding_window={window}, shorter than the sequence length {seq_length}: "
            f"megatron_lite's attention has no sliding window, so it would differ past {window} tokens; "
            f"convert with --seq-length {window} (or less) to train at that length")


class LlamaFamily(Architecture):
    prefixes, word_embedding, layers = ("model.", ""), "embed_tokens.weight", "layers"
    ignored = (r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

    def __init__(self, model_type: str, hf_class: str):
        self.model_type, self.hf_class = model_type, hf_class

    # ------------------------------------------------------------------ config
    def _biases(self, hf: dict):
        """(add_bias_linear, add_qkv_bias) of this family's config."""
        if self.model_type == "qwen2":
            return False, True
        if self.model_type == "mistral":
            return False, False
        attention, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attention != mlp:
            raise UnsupportedModelError(f"config.json has attention_bias={attention} and mlp_bias={mlp}; "
                                        f"megatron_lite puts biases on every linear layer or on none "
                                        f"(--disable-bias-linear), or on q/k/v alone (Qwen2)")
        return attention, False

    def model_config(self, hf: dict, seq_length: Optional[int] = None) -> ModelConfig:
        expect(hf, "hidden_act", ("silu",), "silu", "the Llama family's MLP is SwiGLU (SiLU-gated)")
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        groups = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or hidden // heads
        max_positions = hf["max_position_embeddings"]
        seq_length = seq_length or max_positions
        sliding = self.model_type == "mistral" or (self.model_type == "qwen2" and hf.get("use_sliding_window"))
        check_sliding_window(hf, sliding, seq_length)
        layer_types = set(hf.get("layer_types") or ["full_attention"])
        if not layer_types <= {"full_attention", "sliding_attention"}:
            raise UnsupportedModelError(f"config.json has layer_types {sorted(layer_types)}; megatron_lite has "
                                        f"full attention only")
        theta, scaling = rope_settings(hf)
        bias_linear, qkv_bias = self._biases(hf)
        return ModelConfig(
            num_layers=hf["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=hf["intermediate_size"],
            num_attention_heads=heads, group_query_attention=groups != heads,
            num_query_groups=groups if groups != heads else None,
            kv_channels=head_dim if head_dim != hidden // heads else None,
            seq_length=seq_length, max_position_embeddings=max_positions, vocab_size=hf["vocab_size"],
            normalization="RMSNorm", norm_epsilon=hf.get("rms_norm_eps", 1e-6), swiglu=True,
            position_embedding_type="rope", rotary_base=theta, rotary_percent=1.0,
            use_rope_scaling=scaling is not None, rope_scaling_factor=scaling if scaling is not None else 8.0,
            add_bias_linear=bias_linear, add_qkv_bias=qkv_bias,
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
            hidden_dropout=0.0, attention_dropout=hf.get("attention_dropout", 0.0),
            init_method_std=hf.get("initializer_range", 0.02))

    def hf_config(self, cfg: ModelConfig) -> dict:
        problems = []
        if cfg.normalization != "RMSNorm" or not cfg.swiglu or cfg.position_embedding_type != "rope":
            problems.append("the Llama family needs --normalization RMSNorm --swiglu --position-embedding-type rope")
        if cfg.rotary_percent != 1.0:
            problems.append(f"--rotary-percent {cfg.rotary_percent} (the Llama family rotates whole heads)")
        if cfg.rotary_interleaved:
            problems.append("--rotary-interleaved (the Llama family rotates the two halves of each head)")
        if cfg.qk_layernorm:
            problems.append("--qk-layernorm (the Llama family has no query/key norms)")
        bias = (cfg.add_bias_linear, cfg.add_qkv_bias or cfg.add_bias_linear)
        allowed = {"qwen2": [(False, True)], "mistral": [(False, False)], "llama": [(False, False), (True, True)]}
        if bias not in allowed[self.model_type]:
            problems.append(f"add_bias_linear={cfg.add_bias_linear} add_qkv_bias={cfg.add_qkv_bias} has no "
                            f"{self.model_type} form (Qwen2: q/k/v bias only; Llama: all or none; Mistral: none)")
        if problems:
            raise UnsupportedModelError(f"this model cannot be written as {self.hf_class}: " + "; ".join(problems))
        rope = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
        if cfg.use_rope_scaling:
            rope.update(rope_type="llama3", factor=float(cfg.rope_scaling_factor), **LLAMA3_ROPE_FIXED)
        out = {
            "architectures": [self.hf_class], "model_type": self.model_type, "hidden_act": "silu",
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.query_groups, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings or cfg.seq_length,
            "rms_norm_eps": cfg.norm_epsilon, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
            "initializer_range": cfg.init_method_std, "attention_dropout": cfg.attention_dropout,
            # transformers >= 5 reads rope_parameters; older versions read rope_theta and rope_scaling
            "rope_parameters": rope, "rope_theta": rope["rope_theta"],
            "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.use_rope_scaling else None,
        }
        if self.model_type == "llama":
            out.update(attention_bias=cfg.add_bias_linear, mlp_bias=cfg.add_bias_linear)
        if self.model_type == "qwen2":
            out.update(use_sliding_window=False)
        if self.model_type == "mistral":
            out.update(sliding_window=None)
        return out

    # ------------------------------------------------------------------ tensors
    def outer_rules(self, cfg: ModelConfig, body: str) -> Dict[str, Rule]:
        return {"embedding.word_embeddings.weight": vocab_rule(body + "embed_tokens.weight", cfg.vocab_size),
                "decoder.final_layernorm.weight": norm_rule(body + "norm.weight", cfg),
                "output_layer.weight": vocab_rule("lm_head.weight", cfg.vocab_size)}

    def layer_rules(self, cfg: ModelConfig, hf_layer: str) -> Dict[str, Rule]:
        attn, mlp = hf_layer + "self_attn.", hf_layer + "mlp."
        rules = {"input_layernorm.weight": norm_rule(hf_layer + "input_layernorm.weight", cfg),
                 "pre_mlp_layernorm.weight": norm_rule(hf_layer + "post_attention_layernorm.weight", cfg)}
        for kind in ("weight", "bias"):
            rules[f"self_attention.linear_qkv.{kind}"] = qkv_rule([f"{attn}{x}_proj.{kind}" for x in "qkv"], cfg)
            rules[f"self_attention.linear_proj.{kind}"] = copy_rule(f"{attn}o_proj.{kind}")
            rules[f"mlp.linear_fc1.{kind}"] = concat_rule([f"{mlp}gate_proj.{kind}", f"{mlp}up_proj.{kind}"])
            rules[f"mlp.linear_fc2.{kind}"] = copy_rule(f"{mlp}down_proj.{kind}")
        return rules


LLAMA = LlamaFamily("llama", "LlamaForCausalLM")
MISTRAL = LlamaFamily("mistral", "MistralForCausalLM")
QWEN2 = LlamaFamily("qwen2", "Qwen2ForCausalLM")
