"""The start-up summary, as Megatron-LM prints it on rank 0: the arguments block, the number of
parameters of every (tensor, pipeline) rank and of the whole model, and per split the
dataset's documents, tokens and samples.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron_lite.arguments import format_arguments
from megatron_lite.initialize import Run, print_rank0


def parameter_counts(run: Run) -> Tuple[Dict[Tuple[int, int], int], int]:
    """{(tp_rank, pp_rank): parameters held there} and the model's total.

    Copies count on their rank but once in the total: parameters replicated over TP (norms,
    biases of row-parallel layers, position embeddings) on TP rank 0 only, and a tied output
    layer on the last stage (PP > 1), a copy of the word embedding, not at all. Collective over
    all ranks."""
    s = run.state
    params = list(run.module.parameters())
    mine = sum(p.numel() for p in params)
    copies = sum(p.numel() for p in params
                 if (getattr(p, "shared_embedding", False) and not s.is_first_stage)
                 or (s.tp_rank > 0 and not getattr(p, "tensor_model_parallel", False)))
    row = torch.tensor([s.tp_rank, s.pp_rank, mine, copies], dtype=torch.int64, device=s.device)
    rows = [row]
    if dist.is_initialized() and s.world_size > 1:
        rows = [torch.empty_like(row) for _ in range(s.world_size)]
        dist.all_gather(rows, row)
    per_rank, total = {}, 0
    for tp_rank, pp_rank, count, copy in (r.tolist() for r in rows):
        if (tp_rank, pp_rank) not in per_rank:   # DP replicas hold the same
            per_rank[(tp_rank, pp_rank)] = count
            total += count - copy
    return per_rank, total


def parameter_lines(run: Run) -> List[str]:
    per_rank, total = parameter_counts(run)
    lines = [f" > number of parameters on (tensor, pipeline) model parallel rank ({tp}, {pp}): {n}"
             for (tp, pp), n in sorted(per_rank.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    lines.append(f" > number of parameters in total: {total}")
    return lines


def print_arguments(run: Run) -> None:
    print_rank0(format_arguments(run.cfg), run.state)


def print_parameters(run: Run) -> None:
    lines = parameter_lines(run)   # collective: every rank takes part
    print_rank0("\n".join(lines), run.state)
