"""Host-side logic of the CUDA backend that needs no GPU: the row limits it checks before
calling a kernel, and the merge of per-shard cross-entropy statistics."""

import torch

from megatron_lite.ops.cuda_ops import combine_shard_stats, row_fits
from tests.unit_tests.ops.test_cross_entropy import VOCAB, full_problem


def test_row_fits_mirrors_the_kernel_row_budget():
    # 512 threads x 4 vectors of 16 bytes when aligned, 512 x 16 elements otherwise (common.cuh)
    bf16, fp32 = torch.zeros(16400, dtype=torch.bfloat16), torch.zeros(16400)
    assert row_fits(16384, bf16) and not row_fits(16392, bf16)
    assert row_fits(8192, fp32) and not row_fits(8196, fp32)
    assert row_fits(8191, bf16) and not row_fits(8193, bf16)  # odd: unvectorised
    assert not row_fits(9000, bf16[1:])  # misaligned start: unvectorised limit
    scores = torch.zeros(2, 3, 4, 16384, dtype=torch.bfloat16)
    assert row_fits(16384, scores, mask=torch.zeros(2, 1, 4, 16384, dtype=torch.bool))
    assert not row_fits(16384, scores, mask=torch.zeros(2, 1, 16384, 4, dtype=torch.bool).transpose(-1, -2))


def test_merged_shard_statistics_give_the_full_vocabulary_log_sum_exp():
    logits, target = full_problem(torch.float32)
    logits, target = logits.view(-1, VOCAB).double(), target.view(-1)
    shards = []
    for start in (0, 10, 17):  # uneven shards: the merge does not assume equal sizes
        end = {0: 10, 10: 17, 17: VOCAB}[start]
        part = logits[:, start:end]
        m = part.max(-1).values
        inside = (target >= start) & (target < end)
        picked = part.gather(-1, (target - start).clamp(0, end - start - 1).unsqueeze(-1)).squeeze(-1)
        shards.append(torch.stack([m, (part - m.unsqueeze(-1)).exp().sum(-1), torch.where(inside, picked, 0.0)]))
    lse, target_logit = combine_shard_stats(torch.stack(shards))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(target_logit, logits.gather(-1, target.unsqueeze(-1)).squeeze(-1))
