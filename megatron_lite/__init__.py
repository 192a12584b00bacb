"""megatron_lite: Megatron-style tensor/pipeline/data-parallel training for GPT and Llama models."""
__version__ = "0.1.0"
