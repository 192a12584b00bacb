"""apex's fused kernels, for the ops where apex has a general functional form.

apex provides RMSNorm and LayerNorm (fused_layer_norm_cuda) and rotary with cached cos/sin
(fused_rope); the other ops are left to the next backend. Inputs outside what these take
(a weight dtype unlike the input's, a LayerNorm without bias) use the torch form.

LayerNorm, as Megatron picks it: apex's persistent kernel (apex.contrib FastLayerNormFN) for the
hidden sizes it was built for, when installed, unless --no-persist-layer-norm; else the general
fused kernel. Both compute the same function.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron_lite.ops import torch_ops


# hidden sizes apex's persistent LayerNorm kernel is compiled for (Megatron's list)
PERSIST_LN_HIDDEN_SIZES = (1024, 1536, 2048, 2304, 3072, 3840, 4096, 5120, 6144, 8192, 10240, 12288, 12800,
                           15360, 16384, 18432, 20480, 24576, 25600, 30720, 32768, 40960, 49152, 65536)


def _persistent_layer_norm() -> Optional[object]:
    try:
        from apex.contrib.layer_norm.layer_norm import FastLayerNormFN
    except ImportError:
        return None
    return FastLayerNormFN


def use_persistent_layer_norm(hidden_size: int, persist_layer_norm: bool, available: bool) -> bool:
    """Megatron's choice: the persistent kernel unless --no-persist-layer-norm, when it is installed
    and built for this hidden size."""
    return persist_layer_norm and available and hidden_size in PERSIST_LN_HIDDEN_SIZES


def load(device: torch.device, persist_layer_norm: bool = True) -> Dict[str, object]:
    """Backend entry for dispatch.build_ops; ImportError when apex or its CUDA parts are missing.
    `persist_layer_norm` is False with --no-persist-layer-norm."""
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
        from apex.transformer.functional.fused_rope import fused_apply_rotary_pos_emb_cached
    except ImportError as e:
        raise ImportError(f"not installed with its CUDA extensions ({e})") from e
    fast_layer_norm = _persistent_layer_norm()

    def rms_norm(x, weight, eps):
        if weight.dtype != x.dtype:
            return torch_ops.rms_norm(x, weight, eps)
        return fused_rms_norm_affine(x, weight, x.shape[-1:], eps)

    def layer_norm(x, weight, bias, eps):
        if bias is None or weight.dtype != x.dtype or bias.dtype != x.dtype:
            return torch_ops.layer_norm(x, weight, bias, eps)
        if use_persistent_layer_norm(x.shape[-1], persist_layer_norm, fast_layer_norm is not None):
            return fast_layer_norm.apply(x, weight, bias, eps)
        return fused_layer_norm_affine(x, weight, bias, x.shape[-1:], eps)

    def rotary(t, cos, sin):
        torch_ops.check_rotary_input(t, cos, sin)
        return fused_apply_rotary_pos_emb_cached(t, cos, sin)

    return {"rms_norm": rms_norm, "layer_norm": layer_norm, "rotary": rotary}
