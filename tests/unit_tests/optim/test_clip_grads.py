"""The global grad norm counts each gradient element of the full model exactly once under TP and PP,
after finalize_model_grads has summed sequence-parallel and shared-embedding grads."""

import math

import pytest
import torch

from megatron_lite.config import OptimizerConfig, ParallelConfig
from megatron_lite.optim import build_optimizer
from megatron_lite.parallel.data import DistributedDataParallel, finalize_model_grads
from megatron_lite.parallel.state import initialize
from tests.unit_tests.dist_utils import run_distributed


class Params(torch.nn.Module):
    """Named 1-D parameters with the attributes the model layers set."""

    def __init__(self, **specs):
        super().__init__()
        for name, (numel, attrs) in specs.items():
            p = torch.nn.Parameter(torch.ones(numel))
            for attr in attrs:
                setattr(p, attr, True)
            self.register_parameter(name, p)

    def forward(self, coeffs: dict):
        return sum((getattr(self, name) * c).sum() for name, c in coeffs.items())


def _step_with_grads(specs: dict, coeffs: dict, state):
    """Backward sum(param * coeff) (so each grad is its coeff), finalize, step; return norm and grads."""
    model = DistributedDataParallel(Params(**specs), ParallelConfig(), state)
    optimizer = build_optimizer([model], OptimizerConfig(optimizer="sgd", lr=0.0, clip_grad=0.0),
                                ParallelConfig(), state)
    optimizer.zero_grad()
    model(coeffs).backward()
    finalize_model_grads([model], state)
    grads = {name: p.main_grad.clone() for name, p in model.module.named_parameters()}
    _, grad_norm, _ = optimizer.step()
    return grad_norm, grads


def _coeff(rank: int, numel: int, salt: float) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.float32) + 10.0 * rank + salt


def _norms_under_tp_and_pp(rank, world_size):
    tp_state = initialize(tensor_model_parallel_size=2)
    tp_norm, tp_grads = _step_with_grads(
        {"split": (4, ["tensor_model_parallel"]), "replicated": (3, []), "norm": (2, ["sequence_parallel"])},
        {"split": _coeff(rank, 4, 1.0), "replicated": _coeff(0, 3, 2.0), "norm": _coeff(rank, 2, 3.0)},
        tp_state)
    pp_state = initialize(pipeline_model_parallel_size=2)
    pp_norm, pp_grads = _step_with_grads(
        {"tied": (5, ["shared_embedding"]), "stage": (3, [])},
        {"tied": _coeff(rank, 5, 4.0), "stage": _coeff(rank, 3, 5.0)}, pp_state)
    return tp_norm, tp_grads, pp_norm, pp_grads


@pytest.mark.slow
def test_grad_norm_counts_every_element_once_under_tp_and_pp():
    results = run_distributed(_norms_under_tp_and_pp, 2)
    sq = lambda t: float((t * t).sum())
    sp_sum = _coeff(0, 2, 3.0) + _coeff(1, 2, 3.0)
    expected_tp = math.sqrt(sq(_coeff(0, 4, 1.0)) + sq(_coeff(1, 4, 1.0)) + sq(_coeff(0, 3, 2.0)) + sq(sp_sum))
    tied_sum = _coeff(0, 5, 4.0) + _coeff(1, 5, 4.0)
    expected_pp = math.sqrt(sq(tied_sum) + sq(_coeff(0, 3, 5.0)) + sq(_coeff(1, 3, 5.0)))
    for rank, (tp_norm, tp_grads, pp_norm, pp_grads) in enumerate(results):
        assert tp_norm == pytest.approx(expected_tp, rel=1e-6)
        assert pp_norm == pytest.approx(expected_pp, rel=1e-6)
        assert torch.equal(tp_grads["norm"], sp_sum)                      # sequence-parallel grads summed over TP
        assert torch.equal(tp_grads["split"], _coeff(rank, 4, 1.0))       # TP-split grads stay per rank
        assert torch.equal(pp_grads["tied"], tied_sum)                    # tied embedding summed over stages
        assert torch.equal(pp_grads["stage"], _coeff(rank, 3, 5.0))
