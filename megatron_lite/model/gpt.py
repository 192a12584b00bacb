"""GPTModel: embedding -> decoder layers -> final norm -> output layer, one pipeline stage.

GPT-2 (LayerNorm, GeLU, learned positions, biases, tied embeddings) and the Llama family
(RMSNorm, SwiGLU, RoPE, GQA, no biases, untied output) are the same class with different
ModelConfig values. Parameter names are Megatron-Core's (see DESIGN.md); decoder layers are
numbered locally within the stage, and `layer_offset` says where the stage starts.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.model import fp8, lora
from megatron_lite.model.layers import Norm, RotaryEmbedding, TransformerLayer
from megatron_lite.ops import torch_ops
from megatron_lite.parallel.random import recompute
from megatron_lite.parallel.state import ParallelState
from megatron_lite.parallel.tensor import (ColumnParallelLinear, VocabParallelEmbedding, column_parallel_linear,
                                           init_param_, init_std_for, reduce_from_tp_region,
                                           reduce_scatter_to_sequence_parallel_region, set_partition)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, dtype):
        super().__init__()
        self.cfg, self.state = cfg, state
        self.word_embeddings = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.hidden_size, state, dtype=dtype)
        self.position_embeddings = None
        if cfg.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype)
            set_partition(self.position_embeddings.weight, None)
            # under sequence parallelism each TP rank adds only its slice of positions
            self.position_embeddings.weight.sequence_parallel = state.sequence_parallel

    def forward(self, input_ids, position_ids):
        x = self.word_embeddings(input_ids.t())                    # [s, b, h] (partial sums over TP)
        if self.state.sequence_parallel:
            x = reduce_scatter_to_sequence_parallel_region(x, self.state)
        else:
            x = reduce_from_tp_region(x, self.state)
        if self.position_embeddings is not None:
            pos = self.position_embeddings(position_ids.t())
            if self.state.sequence_parallel:
                pos = pos.chunk(self.state.tp_size, dim=0)[self.state.tp_rank]
            x = x + pos
        p = self.cfg.hidden_dropout if self.training else 0.0
        if p > 0:
            if self.state.sequence_parallel:
                with self.state.rng.fork():
                    x = torch.nn.functional.dropout(x, p=p, training=True)
            else:
                x = torch.nn.functional.dropout(x, p=p, training=True)
        return x


class GPTModel(nn.Module):
    """One pipeline stage of a GPT model.

    forward(input_ids [b, s], position_ids [b, s], labels [b, s] | None, attention_mask) returns
    the per-token loss [b, s] on the last stage when labels are given, its logits [s, b, v/tp]
    when not, and the hidden states [s, b, h] (split along s under sequence parallelism) on
    the other stages. Non-first stages take their input through `set_input_tensor`.
    """

    def __init__(self, cfg: ModelConfig, state: ParallelState, ops, *, seed: int = 1234,
                 dtype=torch.float32, device=None, init_weights: bool = True):
        super().__init__()
        self.cfg, self.state, self.ops = cfg, state, ops
        self.pre_process, self.post_process = state.is_first_stage, state.is_last_stage
        per_stage = cfg.num_layers // state.pp_size
        self.layer_offset = state.pp_rank * per_stage
        self.share_embeddings = not cfg.untie_embeddings_and_output_weights
        self.input_tensor = None

        if self.pre_process:
            self.embedding = Embedding(cfg, state, dtype)
        self.rotary = RotaryEmbedding(cfg) if cfg.position_embedding_type == "rope" else None
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(TransformerLayer(cfg, state, ops, dtype, self.layer_offset + i + 1)
                                            for i in range(per_stage))
        if self.post_process:
            self.decoder.final_layernorm = Norm(cfg, state, ops, dtype)
            if not (self.share_embeddings and self.pre_process):
                self.output_layer = ColumnParallelLinear(cfg.hidden_size, cfg.padded_vocab_size, state,
                                                         bias=False, dtype=dtype)
                if self.share_embeddings:
                    self.output_layer.weight.shared_embedding = True
        if self.share_embeddings and self.pre_process and not self.post_process:
            self.embedding.word_embeddings.weight.shared_embedding = True
        if cfg.lora_rank:
            lora.add_adapters(self, cfg, state)
        if init_weights:   # False for a skeleton (e.g. under `with torch.device("meta")`)
            self._initialize(seed)
        if device is not None:
            self.to(device)
        self.fp8_state = fp8.enable_fp8(self, cfg, state, device or "cpu")   # None without --fp8-format

    def global_name(self, local_name: str) -> str:
        """The name a parameter has in the whole (unsplit) model: layer numbers are global, and
        the untied-looking output layer of a tied model is the word embedding."""
        parts = local_name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(int(parts[2]) + self.layer_offset)
        name = ".".join(parts)
        if name == "output_layer.weight" and self.share_embeddings:
            return "embedding.word_embeddings.weight"
        return name

    def global_shape(self, local_name: str, param: nn.Parameter):
        module = self.get_submodule(local_name.rsplit(".", 1)[0])
        if param.tensor_model_parallel and hasattr(module, "global_shape"):
            shape = list(module.global_shape)
            if param.dim() == 1:
                shape = shape[:1]
            return tuple(shape)
        return tuple(param.shape)

    @torch.no_grad()
    def _initialize(self, seed: int) -> None:
        for name, p in self.named_parameters():
            gname, distribution = self.global_name(name), "normal"
            if lora.is_adapter(name):
                std, distribution = lora.adapter_init(name, self.global_shape(name, p))
            elif name.endswith("bias"):
                std = None
            elif "layernorm" in name:   # norm weights; zero-centred (applied as 1 + w) with --apply-layernorm-1p
                std = None if self.cfg.apply_layernorm_1p else "ones"
            else:
                std = init_std_for(gname, self.cfg.init_method_std, self.cfg.num_layers)
            init_param_(p, gname, self.global_shape(name, p), std, seed, self.state.tp_rank, self.state.tp_size,
                        distribution)

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        self.input_tensor = tensor

    def output_weight(self) -> torch.Tensor:
        if self.share_embeddings and self.pre_process:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def _recomputed_layers(self, x, rotary, attention_mask):
        """--recompute-granularity full: the layers of this stage as checkpointed chunks that keep
        only their input. uniform: chunks of --recompute-num-layers layers; block: the first
        --recompute-num-layers layers one by one, the rest not recomputed."""
        layers, n = self.decoder.layers, self.cfg.recompute_num_layers
        rot = tuple(rotary) if rotary is not None else ()

        def chunk(start, end):
            def run(h, *cos_sin):
                for layer in layers[start:end]:
                    h = layer(h, cos_sin or None, attention_mask)
                return h
            return run

        if self.cfg.recompute_method == "uniform":
            for start in range(0, len(layers), n):
                x = recompute(chunk(start, min(start + n, len(layers))), self.state.rng, x, *rot)
            return x
        for i in range(len(layers)):
            x = recompute(chunk(i, i + 1), self.state.rng, x, *rot) if i < n else chunk(i, i + 1)(x, *rot)
        return x

    def _inference_positions(self, x, inference_context):
        """(rotary tables, attention mask) of a generation step's tokens, which are the positions
        offset .. offset + s - 1: the rotary tables are one table for the whole generation, sliced."""
        start, s = inference_context.sequence_len_offset, x.shape[0]
        rotary = None
        if self.rotary is not None:
            cos, sin = self.rotary(inference_context.max_sequence_length, x.device, x.dtype)
            rotary = (cos[start:start + s], sin[start:start + s])
        return rotary, inference_context.attention_mask(s, x.device)

    def forward(self, input_ids, position_ids, labels=None, attention_mask=None, inference_context=None):
        """`inference_context` (megatron_lite.inference.InferenceContext): generation with a KV cache;
        the tokens given are the next ones after the context's sequence_len_offset cached positions."""
        x = self.embedding(input_ids, position_ids) if self.pre_process else self.input_tensor
        rotary = None
        if inference_context is not None:
            rotary, attention_mask = self._inference_positions(x, inference_context)
        elif self.rotary is not None:
            seq = input_ids.shape[1] if input_ids is not None else x.shape[0] * (
                self.state.tp_size if self.state.sequence_parallel else 1)
            rotary = self.rotary(seq, x.device, x.dtype)
        # each layer's last residual add is left to the next norm, which does it in the same kernel
        # (under full recompute a layer is one checkpointed tensor-to-tensor function instead)
        pending = None
        if self.cfg.recompute_full and self.training and inference_context is None:
            x = self._recomputed_layers(x, rotary, attention_mask)
        else:
            for layer in self.decoder.layers:
                x, pending = layer.forward_deferred(x, pending, rotary, attention_mask, inference_context)
        if not self.post_process:
            return x if pending is None else x + pending
        norm = self.decoder.final_layernorm
        x = norm(x) if pending is None else norm.add_forward(pending, x)[1]
        # a tied embedding on this stage also gets the lookup's gradient: no wgrad fusion for it
        tied_here = self.share_embeddings and self.pre_process
        logits = column_parallel_linear(x, self.output_weight(), None, self.state,
                                        fuse_wgrad=not tied_here)               # [s, b, v/tp]
        logits = self._mask_padded_vocab(logits)
        if labels is None:
            return logits
        # --cross-entropy-loss-fusion: the fused op (one pass over the logits, fp32 inside, no fp32 copy;
        # nothing reads the logits after the loss, so its backward may write their gradient over them);
        # without it Megatron's plain vocab-parallel cross entropy in torch
        cross_entropy = (self.ops.vocab_parallel_cross_entropy if self.cfg.cross_entropy_loss_fusion
                         else torch_ops.vocab_parallel_cross_entropy)
        loss = cross_entropy(logits, labels.t(), self._vocab_start(),
                             self.state.tp_group if self.state.tp_size > 1 else None, inplace_backward=True)
        return loss.t().contiguous()                               # [b, s]

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Padding rows of the vocabulary (beyond the tokenizer's vocab_size) get the lowest finite
        logit, so they take no probability mass: the loss is the same at every TP size (whose
        padding differs) and equals an unpadded model's, e.g. the Hugging Face original's.
        Finite rather than -inf so that a TP rank holding only padding has a finite local max."""
        true_vocab = self.cfg.vocab_size
        start, local = self._vocab_start(), logits.shape[-1]
        if true_vocab is None or start + local <= true_vocab:
            return logits
        padded = torch.arange(start, start + local, device=logits.device) >= true_vocab
        return logits.masked_fill(padded, torch.finfo(logits.dtype).min)

    def _vocab_start(self) -> int:
        return self.state.tp_rank * (self.cfg.padded_vocab_size // self.state.tp_size)
