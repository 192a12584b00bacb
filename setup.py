"""Builds megatron_lite's extension modules: its pybind11 data helpers and, where a CUDA torch is present, its
kernels (the package's metadata is in pyproject.toml).

The pybind11 helper needs no torch. The CUDA extension needs a CUDA build of torch and nvcc
in the *build* environment, so it is built only with `pip install --no-build-isolation -e .`
on a machine that has both; everywhere else it is skipped with one line and compiled on first
use instead (megatron_lite/ops).
"""

import glob
import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}

from pybind11.setup_helpers import Pybind11Extension, build_ext  # noqa: E402

if os.path.exists("csrc/helpers.cpp"):
    ext_modules.append(Pybind11Extension(
        "megatron_lite.data.helpers_cpp", ["csrc/helpers.cpp"],
        extra_compile_args=["-O3"], cxx_std=17))
cmdclass["build_ext"] = build_ext


def _cuda_extension():
    if os.environ.get("MEGATRON_LITE_SKIP_CUDA") == "1":
        return None, "MEGATRON_LITE_SKIP_CUDA=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not importable in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None or CUDA_HOME is None:
        return None, "no CUDA build of torch or no CUDA toolkit"
    sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if not sources:
        return None, "no CUDA sources"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext = CUDAExtension(
        "megatron_lite.ops._cuda_kernels", sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return (ext, BuildExtension), None


cuda, why_not = _cuda_extension()
if cuda is not None:
    ext, build_cls = cuda
    ext_modules.append(ext)

    class _build(build_cls):  # torch's BuildExtension also handles the pybind11 extension
        pass

    cmdclass["build_ext"] = _build
else:
    print(f"megatron_lite: skipping the CUDA kernels ({why_not})", file=sys.stderr)

# Metadata, packages and entry points are in pyproject.toml's [project] and [tool.setuptools] tables.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
