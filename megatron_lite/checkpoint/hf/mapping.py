"""How Hugging Face tensors become megatron_lite global tensors and back.

An architecture (llama.py, gpt2.py) gives, for every megatron_lite global tensor name, a Rule:
the Hugging Face tensors it is made of and the two functions between them. Rules only
rearrange (concatenate, split, transpose, reorder rows), so a round trip is bitwise; the one
exception is a norm weight under --apply-layernorm-1p, stored as weight - 1 (`norm_rule`).

The layouts they produce are DESIGN.md's: the fused QKV weight holds, for each query group g,
[the q heads of g; k_g; v_g] (`pack_qkv`), SwiGLU's fc1 is the global [gate; up] (the
per-rank [gate_r; up_r] split is `partition_chunks`, applied by sharding.py), and the
vocabulary is padded by sharding.py when the rank pieces are cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_lite.config import ModelConfig

Tensors = List[torch.Tensor]


class UnsupportedModelError(ValueError):
    """A Hugging Face model (architecture, config field or tensor) that megatron_lite cannot represent."""


def expect(hf: dict, field: str, allowed, default=None, why: str = "") -> None:
    """Stop unless config.json's `field` (or `default` when absent) is one of `allowed`."""
    value = hf.get(field, default)
    if value not in allowed:
        raise UnsupportedModelError(f"config.json has {field}={value!r}, which megatron_lite does not support"
                                    + (f": {why}" if why else f" (supported: {list(allowed)})"))


@dataclass(frozen=True)
class Rule:
    """One megatron_lite global tensor: the Hugging Face tensors it is made of, and the two ways."""
    hf_names: Tuple[str, ...]
    to_megatron: Callable[[Tensors], torch.Tensor]
    to_hf: Callable[[torch.Tensor], Tensors]


def copy_rule(hf_name: str) -> Rule:
    return Rule((hf_name,), lambda ts: ts[0], lambda t: [t])


def norm_rule(hf_name: str, cfg: ModelConfig) -> Rule:
    """A norm weight. Hugging Face stores the multiplier itself; with --apply-layernorm-1p
    megatron_lite stores it zero-centred (multiplier - 1, added back when the norm is applied)."""
    if not cfg.apply_layernorm_1p:
        return copy_rule(hf_name)
    return Rule((hf_name,), lambda ts: (ts[0].double() - 1).to(ts[0].dtype),
                lambda t: [(t.double() + 1).to(t.dtype)])


def transposed_rule(hf_name: str) -> Rule:
    """GPT-2's Conv1D stores weight as [in, out]; a linear layer's is [out, in]."""
    return Rule((hf_name,), lambda ts: ts[0].t().contiguous(), lambda t: [t.t().contiguous()])


def concat_rule(hf_names: Sequence[str]) -> Rule:
    """Tensors stacked along dim 0 (SwiGLU fc1 = [gate; up], weight or bias)."""
    def split(t):
        return [c.contiguous() for c in t.chunk(len(hf_names), dim=0)]
    return Rule(tuple(hf_names), lambda ts: torch.cat(ts, dim=0), split)


def vocab_rule(hf_name: str, vocab_size: int) -> Rule:
    """Word embedding or output layer: megatron_lite's padding rows are dropped on the way out."""
    return Rule((hf_name,), lambda ts: ts[0], lambda t: [t[:vocab_size].clone()])


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q; k; v] rows (q: heads*d, k and v: groups*d) -> per query group [q heads of g; k_g; v_g].

    Query head j attends with key/value group j // (heads / groups), as in Hugging Face's
    repeat_kv and megatron_lite's attention. Works for weights [rows, hidden] and biases [rows]."""
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def unpack_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> Tensors:
    """Inverse of `pack_qkv`: [q, k, v]."""
    rest = qkv.shape[1:]
    per_group = qkv.reshape(groups, -1, *rest)
    q, k, v = per_group.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


def qkv_rule(hf_names: Sequence[str], cfg: ModelConfig) -> Rule:
    """Separate q, k, v projections (Llama family), weight or bias."""
    return Rule(tuple(hf_names), lambda ts: pack_qkv(*ts, cfg.query_groups),
                lambda t: unpack_qkv(t, cfg.num_attention_heads, cfg.query_groups, cfg.head_dim))


class Architecture:
    """How one Hugging Face model family maps onto megatron_lite; subclasses fill in the names."""

    model_type: str = ""
    hf_class: str = ""                       # the `architectures` entry of config.json
    prefixes: Tuple[str, ...] = ("",)        # body prefixes seen in checkpoints; the first is written
    word_embedding: str = ""                 # its name under the body prefix, which tells the prefix
    layers: str = ""                         # decoder layer i is `{prefix}{layers}.{i}.`
    ignored: Tuple[str, ...] = ()            # regexes of non-weight tensors some checkpoints carry

    def model_config(self, hf: dict, seq_length: Optional[int] = None) -> ModelConfig:
        """The ModelConfig of `hf` (config.json); UnsupportedModelError names any field that cannot be
        represented. seq_length defaults to max_position_embeddings; vocab_size is the Hugging
        Face one and padded_vocab_size is left to the caller."""
        raise NotImplementedError

    def hf_config(self, cfg: ModelConfig) -> dict:
        """config.json fields that describe `cfg`; UnsupportedModelError if this family cannot."""
        raise NotImplementedError

    def layer_rules(self, cfg: ModelConfig, hf_layer: str) -> Dict[str, Rule]:
        """Rules of one decoder layer, keyed by the megatron name after `decoder.layers.{i}.`;
        `hf_layer` is the layer's Hugging Face prefix (e.g. `model.layers.3.`)."""
        raise NotImplementedError

    def outer_rules(self, cfg: ModelConfig, body: str) -> Dict[str, Rule]:
        """Rules of the tensors outside the decoder layers; `body` is the model's prefix."""
        raise NotImplementedError

    def body_prefix(self, hf_names: Optional[Iterable[str]]) -> str:
        """The prefix under which a checkpoint stores the model body (the first for writing)."""
        if hf_names is None:
            return self.prefixes[0]
        names = set(hf_names)
        for prefix in self.prefixes:
            if prefix + self.word_embedding in names:
                return prefix
        raise UnsupportedModelError(f"no {self.model_type} weights found: the checkpoint's tensor names "
                                    f"(e.g. {sorted(names)[:3]}) do not match Hugging Face's {self.hf_class}")

    def rules(self, cfg: ModelConfig, hf_names: Optional[Iterable[str]] = None) -> Dict[str, Rule]:
        """Every possible megatron_lite global tensor of `cfg` -> its Rule, for a checkpoint whose
        tensor names are `hf_names` (None: the names this family writes)."""
        body = self.body_prefix(hf_names)
        rules = dict(self.outer_rules(cfg, body))
        for i in range(cfg.num_layers):
            for suffix, rule in self.layer_rules(cfg, f"{body}{self.layers}.{i}.").items():
                rules[f"decoder.layers.{i}.{suffix}"] = rule
        return rules

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.fullmatch(p, hf_name) for p in self.ignored)


# --------------------------------------------------------------------------- the two directions

def plan_hf_to_megatron(arch: Architecture, cfg: ModelConfig, global_names: Iterable[str],
                        hf_names: Iterable[str]) -> Dict[str, Rule]:
    """The rule of each global tensor, after checking that the checkpoint has every tensor they
    use and nothing else (a tensor no rule uses means a variant this mapping does not know)."""
    hf_names = set(hf_names)
    rules = arch.rules(cfg, hf_names)
    plan, used = {}, set()
    for name in global_names:
        if name not in rules:
            raise UnsupportedModelError(f"the {arch.model_type} mapping has no Hugging Face tensor for {name}")
        plan[name] = rules[name]
        used.update(rules[name].hf_names)
    missing = sorted(used - hf_names)
    if missing:
        raise UnsupportedModelError(f"the checkpoint lacks {_some(missing)} that config.json implies; the weights "
                                    f"and config.json do not belong together")
    unused = sorted(n for n in hf_names - used if not arch.is_ignored(n) and not _tied_copy(n, cfg))
    if unused:
        raise UnsupportedModelError(f"the checkpoint holds tensors that megatron_lite's {arch.model_type} model has "
                                    f"no place for: {_some(unused)}")
    return plan


def _some(names: List[str]) -> str:
    return f"{names[:5]}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _tied_copy(hf_name: str, cfg: ModelConfig) -> bool:
    """A tied model's lm_head.weight, which some checkpoints store although Hugging Face ignores it."""
    return hf_name == "lm_head.weight" and not cfg.untie_embeddings_and_output_weights


def megatron_to_hf(arch: Architecture, cfg: ModelConfig,
                   global_items: Iterable[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) from a stream of megatron_lite global tensors, one rule at a time."""
    rules = arch.rules(cfg)
    for name, tensor in global_items:
        if name not in rules:
            raise UnsupportedModelError(f"{name} has no Hugging Face {arch.hf_class} counterpart")
        rule = rules[name]
        yield from zip(rule.hf_names, rule.to_hf(tensor))
