"""Transformer Engine's functional kernels (used only with --transformer-impl transformer_engine).

TE exposes rotary embedding (from angles) and vocab-parallel cross entropy as functions; its
norms are modules that own their weights, so the norms come from the next backend. Rotary
recovers the angles from cos/sin; cross entropy needs TE's shard layout (this rank's
vocabulary starts at tp_rank * v_local) and bf16/fp32 logits, and uses the torch form otherwise.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist

from megatron_lite.ops import torch_ops


def _import_rope():
    try:
        from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb
    except ImportError:
        from transformer_engine.pytorch.attention import apply_rotary_pos_emb
    return apply_rotary_pos_emb


def load(device: torch.device) -> Dict[str, object]:
    """Backend entry for dispatch.build_ops; ImportError when Transformer Engine is missing."""
    try:
        apply_rotary_pos_emb = _import_rope()
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy
    except ImportError as e:
        raise ImportError(f"not installed ({e})") from e

    def rotary(t, cos, sin):
        torch_ops.check_rotary_input(t, cos, sin)
        freqs = torch.atan2(sin.float(), cos.float())
        return apply_rotary_pos_emb(t, freqs, tensor_format="sbhd", fused=True)

    def vocab_parallel_cross_entropy(logits, target, vocab_start, tp_group, inplace_backward=False):
        torch_ops.check_cross_entropy_input(logits, target)
        tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
        if logits.dtype not in (torch.bfloat16, torch.float32) or vocab_start != tp_rank * logits.shape[-1]:
            return torch_ops.vocab_parallel_cross_entropy(logits, target, vocab_start, tp_group)
        loss = parallel_cross_entropy(logits, target.long(), 0.0, False, tp_group)
        return loss.float().view(target.shape)

    return {"rotary": rotary, "vocab_parallel_cross_entropy": vocab_parallel_cross_entropy}
