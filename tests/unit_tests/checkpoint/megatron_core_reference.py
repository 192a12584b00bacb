"""Megatron-Core's own GPTModel (local spec) on a CPU, as the reference for checkpoint tests.

megatron-core is a test dependency (`.ci/run` installs it with --no-deps). Its GPTModel runs on a
CPU once three CUDA-only helpers are replaced, which `patch_for_cpu` does for the calling process:
  - `torch.cuda.current_device()`: asked for the device of scratch tensors; here "cpu";
  - `CudaRNGStatesTracker.fork`: forks the CUDA generator around dropout and initialisation; a
    no-op here (the tests run without dropout, and take weights from a checkpoint or a seed);
  - the global memory buffer (a scratch buffer allocated on CUDA by sequence parallelism): a
    plain `torch.empty` here.
Megatron-Core's default causal mask is also built on CUDA, so `core_logits` passes its own mask.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_lite.config import ModelConfig

core = pytest.importorskip("megatron.core", reason="megatron-core is a test dependency: pip install --no-deps "
                           "--ignore-requires-python megatron-core==0.19.2 triton==3.9.0 absl-py psutil")


class _CpuScratch:
    def get_tensor(self, shape, dtype, name, mem_alloc_context=None):
        return torch.empty(shape, dtype=dtype)


def patch_for_cpu() -> None:
    """Let Megatron-Core's GPTModel run on a CPU in this process (see the module docstring)."""
    import megatron.core.tensor_parallel.random as core_random
    from megatron.core import parallel_state

    torch.cuda.current_device = lambda: "cpu"
    core_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    parallel_state._set_global_memory_buffer = lambda: setattr(parallel_state, "_GLOBAL_MEMORY_BUFFER",
                                                               _CpuScratch())


def initialize_core(tp: int = 1, pp: int = 1) -> None:
    """Megatron-Core's process groups over the torch.distributed group that already exists (gloo)."""
    from megatron.core import parallel_state

    patch_for_cpu()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def transformer_config(m: ModelConfig, pp: int = 1):
    """Megatron-Core's TransformerConfig for the same architecture as `m` (no dropout, no fusions)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if m.swiglu:
        activation = torch.nn.functional.silu
    elif m.squared_relu:
        activation = lambda x: torch.pow(torch.nn.functional.relu(x), 2)   # noqa: E731
    else:
        activation = torch.nn.functional.gelu
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.query_groups, kv_channels=m.head_dim,
        normalization=m.normalization, layernorm_epsilon=m.norm_epsilon,
        layernorm_zero_centered_gamma=m.apply_layernorm_1p, gated_linear_unit=m.swiglu,
        activation_func=activation, add_bias_linear=m.add_bias_linear, add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=m.init_method_std,
        tensor_model_parallel_size=_tp(), pipeline_model_parallel_size=pp, use_cpu_initialization=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        params_dtype=torch.float32)


def _tp() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def build_core_gpt(m: ModelConfig, seed: int = 0):
    """This rank's stage of Megatron-Core's GPTModel (local spec) for the architecture `m`, whose
    padded_vocab_size must be set. `initialize_core` first."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel as CoreGPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    spec = get_gpt_layer_local_spec(normalization=m.normalization, qk_layernorm=m.qk_layernorm)
    return CoreGPTModel(
        transformer_config(m, pp), spec, vocab_size=m.padded_vocab_size,
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type, rotary_percent=m.rotary_percent,
        rotary_base=int(m.rotary_base))


def core_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, padded vocab / TP] of a single-stage Megatron-Core GPTModel (causal mask built here)."""
    s = ids.shape[1]
    mask = torch.triu(torch.ones(s, s), diagonal=1).bool()[None, None]
    model.eval()
    with torch.no_grad():
        return model(ids, torch.arange(s).expand_as(ids), mask)
