"""megatron_lite: Megatron-style tensor/pipeline/data-parallel training for GPT and Llama models."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("megatron_lite")   # pyproject.toml's [project] version
except PackageNotFoundError:   # a source tree that is not installed
    __version__ = "unknown"
