"""Generation with a KV cache at any TP/PP: the inference context (Megatron-Core's InferenceParams),
sampling (greedy, temperature, top-k, top-p) and the loop that runs the pipeline stages in order.

    run = load_for_inference(cfg)                                   # load.py, or a training Run
    new_ids = generate(run, [prompt_ids], cfg.inference, seed=cfg.train.seed)

Prompts of different lengths are batched as Megatron does: the first step runs the shortest
prompt, each later step one token per row, the row's own prompt token while its prompt lasts.
Every rank of a model replica takes part with the same arguments. The last stage picks the tokens
from logits gathered over TP with the padded vocabulary rows cut off, and broadcasts them over the
replica, so every rank returns the same ids. Sampling draws from its own generator, seeded with
`seed`: no other generator moves.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_lite.arguments import ConfigError
from megatron_lite.config import InferenceConfig
from megatron_lite.initialize import Run, model_dtype, print_rank0
from megatron_lite.parallel.pipeline import P2P
from megatron_lite.parallel.random import preserved_rng
from megatron_lite.parallel.state import ParallelState


class InferenceContext:
    """The KV cache of one generation: per layer (keyed by its global layer number) key and value
    buffers [max_sequence_length, max_batch_size, query groups / TP, head_dim], made at the layer's
    first step, and `sequence_len_offset`, the positions already in them, which the generation loop
    advances after each forward (as Megatron-Core's InferenceParams)."""

    def __init__(self, max_batch_size: int, max_sequence_length: int):
        self.max_batch_size, self.max_sequence_length = max_batch_size, max_sequence_length
        self.sequence_len_offset = 0
        self.key_value_memory_dict: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def update_kv(self, layer_number: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values [s, b, groups, d] after the cached positions; return
        those of every position so far, [offset + s, b, groups, d]."""
        s, b = k.shape[:2]
        start, end = self.sequence_len_offset, self.sequence_len_offset + s
        if end > self.max_sequence_length or b > self.max_batch_size:
            raise ValueError(f"a step of {s} tokens x {b} rows at offset {start} does not fit the cache of "
                             f"{self.max_sequence_length} positions x {self.max_batch_size} rows")
        if layer_number not in self.key_value_memory_dict:
            shape = (self.max_sequence_length, self.max_batch_size, *k.shape[2:])
            self.key_value_memory_dict[layer_number] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = self.key_value_memory_dict[layer_number]
        keys[start:end, :b] = k
        values[start:end, :b] = v
        return keys[:end, :b], values[:end, :b]

    def attention_mask(self, s: int, device) -> Optional[torch.Tensor]:
        """[1, 1, s, offset + s], True where query i (position offset + i) must not see a key (the
        keys after it); None at offset 0, where it is the plain causal mask."""
        start = self.sequence_len_offset
        if start == 0:
            return None
        return torch.ones(s, start + s, dtype=torch.bool, device=device).triu_(start + 1)[None, None]


def sample(logits: torch.Tensor, sampling: InferenceConfig, generator: torch.Generator) -> torch.Tensor:
    """The next token of each row of `logits` [b, v]: the argmax with --greedy; otherwise a draw from
    softmax(logits / temperature) restricted to the top-k tokens, then to the most likely tokens
    whose probabilities add up to top-p (the most likely one always stays): Hugging Face's order of
    its temperature, top-k and top-p warpers, with Megatron's nucleus boundary."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        beyond = probs.cumsum(dim=-1) - probs > sampling.top_p   # the more likely ones already reach top-p
        logits = logits.masked_fill(beyond.scatter(-1, order, beyond), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@contextlib.contextmanager
def sequence_parallel_off(state: ParallelState):
    """Generation steps of one token cannot be split over the TP ranks: run them without sequence
    parallelism (the layers read the flag at each forward; the weights are the same either way)."""
    saved, state.sequence_parallel = state.sequence_parallel, False
    try:
        yield
    finally:
        state.sequence_parallel = saved


def _step_logits(model, state: ParallelState, tokens, positions, context: InferenceContext, hidden_size: int,
                 dtype) -> Optional[torch.Tensor]:
    """The new tokens [b, s] through this rank's stage (the hidden states [s, b, h] come from the
    previous stage and go to the next); on the last stage the logits of the last position over
    the whole padded vocabulary, [b, v], None elsewhere."""
    b, s = tokens.shape
    p2p = P2P(state, (s, b, hidden_size), dtype)
    model.set_input_tensor(p2p.recv_forward())
    out = model(tokens, positions, inference_context=context)
    if not state.is_last_stage:
        p2p.send_forward(out)
        return None
    logits = out[-1]                                            # [b, v/tp]
    if state.tp_size > 1:
        parts = [torch.empty_like(logits) for _ in range(state.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=state.tp_group)
        logits = torch.cat(parts, dim=-1)
    return logits


def _from_last_stage(tokens: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """The last stage's TP rank 0's tokens on every rank of the model replica."""
    if state.is_distributed and state.tp_size * state.pp_size > 1:
        dist.broadcast(tokens, src=state.rank_of(0, state.dp_rank, state.pp_size - 1), group=state.mp_group)
    return tokens


def _check_prompts(prompts: Sequence[Sequence[int]], run: Run, sampling: InferenceConfig) -> None:
    m = run.cfg.model
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generation needs a prompt of at least one token in every row")
    bad = sorted({int(t) for p in prompts for t in p if not 0 <= int(t) < m.vocab_size})
    if bad:
        raise ConfigError(f"prompt token ids {' '.join(map(str, bad[:8]))} are outside the model's vocabulary "
                          f"of {m.vocab_size} tokens (ids 0 to {m.vocab_size - 1})")
    total = max(len(p) for p in prompts) + sampling.max_new_tokens
    if m.position_embedding_type == "learned_absolute" and total > m.max_position_embeddings:
        raise ConfigError(f"a prompt of {max(len(p) for p in prompts)} tokens and --max-new-tokens "
                          f"{sampling.max_new_tokens} need {total} positions but the model has "
                          f"{m.max_position_embeddings} learned ones; shorten the prompt or lower --max-new-tokens")


@torch.no_grad()
def generate(run: Run, prompts: Sequence[Sequence[int]], sampling: InferenceConfig, *, seed: int = 1234,
             stop_token_id: Optional[int] = None) -> List[List[int]]:
    """The tokens generated after each prompt: sampling.max_new_tokens of them, or fewer when a row
    draws `stop_token_id` (kept as its last token). Collective over the ranks of the model replica;
    the model runs in eval mode, without sequence parallelism, and is left in the mode it was in."""
    _check_prompts(prompts, run, sampling)
    m, state, module = run.cfg.model, run.state, run.module
    device = state.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    rows, total = len(prompts), int(lengths.max()) + sampling.max_new_tokens
    tokens = torch.zeros(rows, total, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = torch.tensor([int(t) for t in prompt], device=device)
    produced = torch.zeros(rows, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    context = InferenceContext(rows, total)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = module.training
    module.eval()
    try:
        with sequence_parallel_off(state):
            prev = 0
            for cur in range(int(lengths.min()), total):
                positions = torch.arange(prev, cur, device=device).expand(rows, -1)
                logits = _step_logits(module, state, tokens[:, prev:cur], positions, context, m.hidden_size,
                                      model_dtype(run.cfg))
                new = (torch.empty(rows, dtype=torch.long, device=device) if logits is None
                       else sample(logits[:, :m.vocab_size], sampling, generator))   # never a padding row
                new = _from_last_stage(new, state)
                context.sequence_len_offset, prev = cur, cur
                generating = (lengths <= cur) & ~done   # rows past their prompt
                tokens[:, cur] = torch.where(generating, new, tokens[:, cur])
                produced += generating.long()
                done |= generating & (produced >= sampling.max_new_tokens)
                if stop_token_id is not None:
                    done |= generating & (new == stop_token_id)
                if bool(done.all()):
                    break
    finally:
        module.train(was_training)
        module.set_input_tensor(None)
    return [tokens[i, lengths[i]:lengths[i] + produced[i]].tolist() for i in range(rows)]


def print_training_sample(run: Run) -> None:
    """--generate-interval: generate from --generate-prompt with the model as trained so far and print
    it on rank 0 (every rank of each replica takes part). No generator moves, no gradient is kept
    and the model goes back to training mode, so training continues bit for bit as without it."""
    tokenizer, prompt = run.tokenizer, run.cfg.logging.generate_prompt
    with preserved_rng(run.state.rng):
        new = generate(run, [tokenizer.tokenize(prompt)], run.cfg.inference, seed=run.cfg.train.seed,
                       stop_token_id=tokenizer.eod)[0]
    print_rank0(f" sample at iteration {run.progress.iteration} | prompt: {prompt!r} | generated: "
                f"{tokenizer.detokenize(new)!r}", run.state)
