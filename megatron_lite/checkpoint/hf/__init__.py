"""Hugging Face <-> megatron_lite: one mapping per model family, and streaming file readers/writers.

    arch = architecture_of(hf_config)        # from config.json's model_type
    cfg = arch.model_config(hf_config)       # megatron_lite ModelConfig; unsupported fields stop here
    plan = plan_hf_to_megatron(arch, cfg, global_names, reader.names)   # global name -> Rule
    megatron_to_hf(arch, cfg, merge_to_global(...))                     # (HF name, tensor) stream

megatron_lite.tools.convert drives them; sharding.py cuts the global tensors into rank pieces.
"""

from megatron_lite.checkpoint.hf.gpt2 import GPT2_ARCH
from megatron_lite.checkpoint.hf.llama import LLAMA, MISTRAL, QWEN2
from megatron_lite.checkpoint.hf.mapping import (Architecture, UnsupportedModelError, megatron_to_hf,
                                                 plan_hf_to_megatron)
from megatron_lite.config import ModelConfig

ARCHITECTURES = {a.model_type: a for a in (LLAMA, MISTRAL, QWEN2, GPT2_ARCH)}


def architecture_of(hf_config: dict) -> Architecture:
    """The mapping for a config.json, by its model_type."""
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(f"config.json has model_type={model_type!r}; megatron_lite converts "
                                    f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def architecture_for(cfg: ModelConfig) -> Architecture:
    """The family to write a megatron_lite model as when no original config.json names one."""
    if cfg.position_embedding_type == "learned_absolute":
        return GPT2_ARCH
    if cfg.add_qkv_bias and not cfg.add_bias_linear:
        return QWEN2
    return LLAMA


__all__ = ["ARCHITECTURES", "Architecture", "UnsupportedModelError", "architecture_for", "architecture_of",
           "megatron_to_hf", "plan_hf_to_megatron"]
