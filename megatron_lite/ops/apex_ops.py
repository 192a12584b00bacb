"""apex's fused kernels, for the ops where apex has a general functional form.

apex provides RMSNorm and LayerNorm (fused_layer_norm_cuda) and rotary with cached cos/sin
(fused_rope); the other ops are left to the next backend. Inputs outside what these take
(a weight dtype unlike the input's, a LayerNorm without bias) use the torch form.
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron_lite.ops import torch_ops


def load(device: torch.device) -> Dict[str, object]:
    """Backend entry for dispatch.build_ops; ImportError when apex or its CUDA parts are missing."""
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
        from apex.transformer.functional.fused_rope import fused_apply_rotary_pos_emb_cached
    except ImportError as e:
        raise ImportError(f"not installed with its CUDA extensions ({e})") from e

    def rms_norm(x, weight, eps):
        if weight.dtype != x.dtype:
            return torch_ops.rms_norm(x, weight, eps)
        return fused_rms_norm_affine(x, weight, x.shape[-1:], eps)

    def layer_norm(x, weight, bias, eps):
        if bias is None or weight.dtype != x.dtype or bias.dtype != x.dtype:
            return torch_ops.layer_norm(x, weight, bias, eps)
        return fused_layer_norm_affine(x, weight, bias, x.shape[-1:], eps)

    def rotary(t, cos, sin):
        torch_ops.check_rotary_input(t, cos, sin)
        return fused_apply_rotary_pos_emb_cached(t, cos, sin)

    return {"rms_norm": rms_norm, "layer_norm": layer_norm, "rotary": rotary}
