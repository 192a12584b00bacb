"""Find megatron_lite's CUDA kernel extension, compiling it on first use when setup.py did not.

`pip install --no-build-isolation -e .` on a machine with nvcc and a CUDA torch builds
`megatron_lite.ops._cuda_kernels`. Elsewhere (a CPU install later run on a GPU node) the
sources in csrc/cuda are compiled here with torch.utils.cpp_extension.load into a cache
directory keyed by torch, CUDA and GPU architecture: local rank 0 of each node builds first,
the other ranks wait and then load the finished build.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch
import torch.distributed as dist

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
EXTENSION_NAME = "megatron_lite_cuda_kernels"
NVCC_FLAGS = ["-O3", "-lineinfo"]


def cache_dir(device: torch.device) -> Path:
    """$MEGATRON_LITE_KERNEL_CACHE or ~/.cache/megatron_lite/kernels, one folder per toolchain and GPU."""
    root = os.environ.get("MEGATRON_LITE_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron_lite", "kernels")
    major, minor = torch.cuda.get_device_capability(device)
    return Path(root) / f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{major}{minor}"


def _extra_include_paths() -> list:
    """CUDA headers that pip's nvidia-* wheels ship, for toolkits that lack the math libraries' headers."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for root in spec.submodule_search_locations:
        found += [os.path.dirname(h) for h in glob.glob(os.path.join(root, "*", "include", "cusparse.h"))]
    return found


def _jit_build(device: torch.device):
    from torch.utils.cpp_extension import load

    sources = sorted(glob.glob(str(SOURCE_DIR / "*.cu")) + glob.glob(str(SOURCE_DIR / "*.cpp")))
    if not sources:
        raise ImportError(f"the CUDA kernels are not built and their sources ({SOURCE_DIR}) are missing; "
                          f"install from a source checkout with `pip install --no-build-isolation -e .`")
    build_dir = cache_dir(device)
    build_dir.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability(device)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    return load(name=EXTENSION_NAME, sources=sources, build_directory=str(build_dir),
                extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS,
                extra_include_paths=_extra_include_paths(), verbose=False)


def load_extension(device: torch.device):
    """The kernel module: the installed one, or a JIT build (collective when distributed)."""
    try:
        from megatron_lite.ops import _cuda_kernels
        return _cuda_kernels
    except ImportError:
        pass
    if torch.version.cuda is None or not torch.cuda.is_available():
        raise ImportError("the CUDA kernels need a CUDA build of torch and a GPU")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _jit_build(device)

    builder = int(os.environ.get("LOCAL_RANK", "0")) == 0
    module, error = None, None
    if builder:
        try:
            module = _jit_build(device)
        except Exception as e:  # every rank must reach the collective below, then all raise
            error = e
    # One collective doubles as the "wait for local rank 0" barrier and carries its outcome.
    ok = torch.tensor([0 if error is not None else 1], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if error is not None:
        raise error
    if not ok.item():
        raise ImportError("compiling the CUDA kernels failed on another node's local rank 0 (see its log)")
    return module if module is not None else _jit_build(device)
