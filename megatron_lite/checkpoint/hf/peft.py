"""LoRA adapters in PEFT's format, and merged into their base weights.

PEFT stores a causal LM's adapters as `adapter_model.safetensors` with keys
`base_model.model.<HF module>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]), in
nn.Linear orientation even for GPT-2's Conv1D modules (whose weights are [in, out]: PEFT marks
them `fan_in_fan_out`), beside `adapter_config.json`.

A megatron_lite layer maps onto one or several Hugging Face modules (linear_qkv onto q/k/v_proj, or
onto c_attn with its rows in another order; SwiGLU's linear_fc1 onto gate_proj and up_proj). Each
of them gets the whole A (the rules rearrange output rows only, never inputs) and the rows of B
that the base weight's Rule gives that module: the rows are
found by sending row numbers through the Rule, so every layout the mappings know (per-group
QKV, [gate; up], transposes) carries over without a second copy of it. This is exact: the
module's output rows of B A x are those rows of B times A x.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Tuple

import torch

from megatron_lite.checkpoint.hf.mapping import Architecture, Rule
from megatron_lite.config import ModelConfig
from megatron_lite.model.lora import ADAPTER_KEY

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def base_weight_name(adapter_name: str) -> Tuple[str, str]:
    """(the base linear's weight name, "A" or "B") of an adapter tensor's global name."""
    linear, factor = adapter_name.split(ADAPTER_KEY)
    return linear + ".weight", factor.split(".")[0]


def _rows_per_module(rule: Rule, rows: int) -> List[torch.Tensor]:
    """For each of the Rule's Hugging Face tensors, the megatron rows (along dim 0 of the base weight)
    it is made of, in its own row order."""
    probe = torch.arange(rows, dtype=torch.float64)[:, None]
    out = []
    for piece in rule.to_hf(probe):
        transposed = piece.dim() == 2 and piece.shape[0] == 1 and piece.shape[1] > 1
        out.append((piece[0] if transposed else piece[:, 0]).long())
    return out


def _module(hf_weight_name: str) -> str:
    return hf_weight_name[:-len(".weight")]


def peft_tensors(arch: Architecture, cfg: ModelConfig,
                 adapters: Iterable[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(PEFT key, tensor) from (global adapter name, tensor) pairs."""
    rules = arch.rules(cfg)
    for name, tensor in adapters:
        base, factor = base_weight_name(name)
        rule = rules[base]
        if factor == "A":   # the rules rearrange rows only: every module takes A as it is
            for hf_name in rule.hf_names:
                yield f"{PEFT_PREFIX}{_module(hf_name)}.lora_A.weight", tensor.contiguous()
            continue
        for hf_name, rows in zip(rule.hf_names, _rows_per_module(rule, tensor.shape[0])):
            yield f"{PEFT_PREFIX}{_module(hf_name)}.lora_B.weight", tensor[rows].contiguous()


def target_modules(arch: Architecture, cfg: ModelConfig, adapter_names: Iterable[str]) -> List[str]:
    """PEFT's target_modules: each module's path inside its decoder layer (`self_attn.q_proj`,
    `mlp.c_proj`), which PEFT matches as a suffix and which tells GPT-2's two c_proj apart."""
    rules, body = arch.rules(cfg), arch.body_prefix(None)
    found = []
    for name in adapter_names:
        for hf_name in rules[base_weight_name(name)[0]].hf_names:
            layer_path = _module(hf_name)[len(f"{body}{arch.layers}."):]
            found.append(layer_path.split(".", 1)[1])
    return sorted(set(found))


def peft_config(arch: Architecture, cfg: ModelConfig, lora: dict, modules: List[str], base_model: str) -> dict:
    """adapter_config.json for PEFT's LoraConfig."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
            "target_modules": modules, "bias": "none", "fan_in_fan_out": arch.model_type == "gpt2",
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def merged(global_items: Iterable[Tuple[str, torch.Tensor]], adapters: Dict[str, torch.Tensor],
           scaling: float) -> Iterator[Tuple[str, torch.Tensor]]:
    """The base model's global tensors with every adapted weight replaced by W + scaling * B A
    (computed in float64, stored in W's dtype): the plain model that computes what the LoRA model does."""
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in adapters.items():
        base, factor = base_weight_name(name)
        pairs.setdefault(base, {})[factor] = tensor
    for name, tensor in global_items:
        if name in pairs:
            a, b = pairs[name]["A"].double(), pairs[name]["B"].double()
            tensor = (tensor.double() + scaling * (b @ a)).to(tensor.dtype)
        yield name, tensor
