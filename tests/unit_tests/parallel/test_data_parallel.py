"""Data parallelism: DP=2 (gloo) training equals one process with the same global batch, with and
without the distributed optimizer and overlapped reduction; ZeRO-1 shards and resumes exactly."""

import io

import pytest
import torch

from megatron_lite.config import ParallelConfig
from megatron_lite.parallel.data import DistributedDataParallel
from megatron_lite.parallel.state import initialize
from tests.unit_tests.dist_utils import run_distributed
from tests.unit_tests.optim.toy import ToyModel, build, make_batches, opt_config, params_of, train_steps

ITERS = 5
VARIANTS = [(False, False), (False, True), (True, False), (True, True)]  # (distributed optimizer, overlap)


def _parallel_cfg(dist_opt: bool, overlap: bool) -> ParallelConfig:
    return ParallelConfig(ddp_bucket_size=64, use_distributed_optimizer=dist_opt, overlap_grad_reduce=overlap)


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _overlap_starts_reductions_in_last_backward(state):
    model, optimizer, _ = build(state, opt_config(), _parallel_cfg(False, True))
    (x, y), = make_batches(1)
    optimizer.zero_grad()
    with model.no_sync():
        model(x[:2], y[:2]).backward()
    started_in_no_sync = [b.handle is not None for b in model.buckets]
    model(x[2:4], y[2:4]).backward()
    started_in_last = [b.handle is not None for b in model.buckets]
    model.finish_grad_sync()
    return started_in_no_sync, started_in_last


def _resume(state, cfg, parallel_cfg, dtype=torch.float32):
    """3 iterations, save, 2 more; versus a fresh run that loads the save and does the same 2."""
    batches = make_batches(ITERS)
    model, optimizer, scheduler = build(state, cfg, parallel_cfg, dtype)
    train_steps(model, optimizer, scheduler, state, batches[:3])
    saved = _round_trip({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict()})
    straight = train_steps(model, optimizer, scheduler, state, batches[3:])
    model2, optimizer2, scheduler2 = build(state, cfg, parallel_cfg, dtype)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    scheduler2.load_state_dict(saved["scheduler"])
    resumed = train_steps(model2, optimizer2, scheduler2, state, batches[3:])
    return {"straight": (straight, params_of(model), optimizer.state_dict()),
            "resumed": (resumed, params_of(model2), optimizer2.state_dict())}


def _dp2_body(rank, world_size):
    state = initialize()
    assert state.dp_size == 2
    batches = make_batches(ITERS)
    runs = {}
    for dist_opt, overlap in VARIANTS:
        model, optimizer, scheduler = build(state, opt_config(), _parallel_cfg(dist_opt, overlap))
        records = train_steps(model, optimizer, scheduler, state, batches)
        runs[(dist_opt, overlap)] = (records, params_of(model), optimizer.state_dict().get("shard_ranges"))
    model, optimizer, scheduler = build(state, opt_config(bf16=True), _parallel_cfg(True, True), torch.bfloat16)
    runs["bf16"] = (train_steps(model, optimizer, scheduler, state, batches), params_of(model), None)
    cfg = opt_config(bf16=True, use_precision_aware_optimizer=True, main_grads_dtype="bf16")
    model, optimizer, scheduler = build(state, cfg, _parallel_cfg(True, True), torch.bfloat16)
    assert all(b.grad_data.dtype == torch.bfloat16 for b in model.buckets)
    runs["bf16-grads"] = (train_steps(model, optimizer, scheduler, state, batches), params_of(model), None)
    return {"runs": runs, "overlap": _overlap_starts_reductions_in_last_backward(state),
            "resume": _resume(state, opt_config(), _parallel_cfg(True, True))}


@pytest.fixture(scope="module")
def dp2():
    return run_distributed(_dp2_body, 2)


def _single_process_run(dtype=torch.float32, **cfg):
    state = initialize()
    model, optimizer, scheduler = build(state, opt_config(**cfg), dtype=dtype)
    return train_steps(model, optimizer, scheduler, state, make_batches(ITERS)), params_of(model)


@pytest.mark.slow
@pytest.mark.parametrize("dist_opt,overlap", VARIANTS,
                         ids=[f"{'distopt' if d else 'ddp'}-{'overlap' if o else 'sync'}" for d, o in VARIANTS])
def test_dp2_matches_single_process(dp2, dist_opt, overlap):
    ref_records, ref_params = _single_process_run()
    for rank_result in dp2:
        records, params, _ = rank_result["runs"][(dist_opt, overlap)]
        assert all(r["ok"] for r in records)
        torch.testing.assert_close(torch.stack([r["loss"] for r in records]),
                                   torch.stack([r["loss"] for r in ref_records]), rtol=1e-5, atol=0)
        assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in ref_records], rel=1e-5)
        for name, value in ref_params.items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dp2_bf16_distributed_optimizer_matches_single_process(dp2):
    ref_records, ref_params = _single_process_run(torch.bfloat16, bf16=True)
    for rank_result in dp2:
        records, params, _ = rank_result["runs"]["bf16"]
        torch.testing.assert_close(torch.stack([r["loss"] for r in records]),
                                   torch.stack([r["loss"] for r in ref_records]), rtol=1e-3, atol=0)
        for name, value in ref_params.items():
            torch.testing.assert_close(params[name], value)  # bf16 tolerance: one rounding step


@pytest.mark.slow
def test_dp2_bf16_main_grads_reduce_scatter_in_bf16_and_match_single_process(dp2):
    """--main-grads-dtype bf16: the buckets are bf16 and reduce-scattered as such; the run tracks
    one process with the same flags (bf16 rounding of the gradients: looser than fp32 grads)."""
    ref_records, ref_params = _single_process_run(torch.bfloat16, bf16=True, use_precision_aware_optimizer=True,
                                                  main_grads_dtype="bf16")
    fp32_grads, _ = _single_process_run(torch.bfloat16, bf16=True)
    for rank_result in dp2:
        records, params, _ = rank_result["runs"]["bf16-grads"]
        assert records[0]["loss"] == fp32_grads[0]["loss"]    # same weights before the first update
        torch.testing.assert_close(torch.stack([r["loss"] for r in records]),
                                   torch.stack([r["loss"] for r in ref_records]), rtol=2e-3, atol=0)
        for name, value in ref_params.items():
            torch.testing.assert_close(params[name], value, rtol=2e-2, atol=1e-3)


@pytest.mark.slow
def test_distributed_optimizer_shards_partition_every_parameter(dp2):
    numels = {name: p.numel() for name, p in ToyModel().named_parameters()}
    shards = [rank_result["runs"][(True, False)][2] for rank_result in dp2]
    for name, numel in numels.items():
        covered = sorted(tuple(s[name]) for s in shards if name in s)
        assert covered[0][0] == 0 and covered[-1][1] == numel, (name, covered)
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), (name, covered)


@pytest.mark.slow
def test_overlap_starts_each_bucket_during_the_last_microbatch_only(dp2):
    for rank_result in dp2:
        started_in_no_sync, started_in_last = rank_result["overlap"]
        assert len(started_in_last) == 3
        assert not any(started_in_no_sync) and all(started_in_last)


@pytest.mark.slow
def test_dp2_distributed_optimizer_resume_is_bitwise_identical(dp2):
    for rank_result in dp2:
        (straight, params_a, opt_a), (resumed, params_b, opt_b) = (rank_result["resume"]["straight"],
                                                                  rank_result["resume"]["resumed"])
        assert [(r["loss"].item(), r["grad_norm"], r["lr"]) for r in straight] == \
            [(r["loss"].item(), r["grad_norm"], r["lr"]) for r in resumed]
        for name in params_a:
            assert torch.equal(params_a[name], params_b[name]), name
        assert opt_a["shard_ranges"] == opt_b["shard_ranges"]
        for name, entry in opt_a["params"].items():
            for key, value in entry.items():
                assert torch.equal(value, opt_b["params"][name][key]), (name, key)


def test_main_grad_accumulates_microbatches_in_reverse_order_buckets():
    state = initialize()
    module = ToyModel()
    reference = ToyModel()
    model = DistributedDataParallel(module, ParallelConfig(ddp_bucket_size=64), state)
    assert [[n for n, p in module.named_parameters() if any(p is q for q in b.params)] for b in model.buckets] == \
        [["fc2.weight", "fc2.bias"], ["fc1.weight", "fc1.bias"], ["norm_weight"]]
    assert [b.params[0] is module.fc2.bias for b in model.buckets[:1]] == [True]   # reverse parameter order
    (x, y), = make_batches(1)
    model.zero_grad_buffer()
    with model.no_sync():
        model(x[:4], y[:4]).backward()
    model(x[4:], y[4:]).backward()
    model.finish_grad_sync()
    reference(x[:4], y[:4]).backward()
    reference(x[4:], y[4:]).backward()
    for (name, p), ref in zip(module.named_parameters(), reference.parameters()):
        assert p.grad is None and p.main_grad.dtype == torch.float32
        torch.testing.assert_close(p.main_grad, ref.grad, rtol=1e-6, atol=1e-7)
    assert list(model.state_dict()) == list(module.state_dict())
    assert model.fc1 is module.fc1   # attributes of the wrapped module pass through
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in module.named_parameters()]


def test_shared_embedding_gets_its_own_bucket():
    module = ToyModel()
    module.fc1.weight.shared_embedding = True
    model = DistributedDataParallel(module, ParallelConfig(ddp_bucket_size=1000), initialize())
    assert [len(b.params) for b in model.buckets] == [3, 1, 1]
    assert model.buckets[1].params == [module.fc1.weight]


def test_overlapped_reduction_rejects_a_second_microbatch_outside_no_sync():
    model, optimizer, _ = build(initialize(), opt_config(), _parallel_cfg(False, True))
    (x, y), = make_batches(1)
    optimizer.zero_grad()
    model(x[:2], y[:2]).backward()
    with pytest.raises(RuntimeError, match="under model.no_sync"):
        model(x[2:4], y[2:4]).backward()


class _TwoLinears(torch.nn.Module):
    def __init__(self, state, dtype):
        from megatron_lite.parallel.tensor import ColumnParallelLinear, RowParallelLinear
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.fc1 = ColumnParallelLinear(256, 512, state, bias=True, dtype=dtype)
        self.fc2 = RowParallelLinear(512, 128, state, bias=False, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))).float().square().mean()


def _main_grads_after_two_iterations(fused: bool, grad_dtype=torch.float32):
    state = initialize()
    model = DistributedDataParallel(_TwoLinears(state, torch.bfloat16).cuda(),
                                    ParallelConfig(gradient_accumulation_fusion=fused), state, grad_dtype=grad_dtype)
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(64, 2, 256, generator=gen).to("cuda", torch.bfloat16) for _ in range(4)]
    grads, nodes = [], set()
    for it in range(2):   # the second iteration must overwrite, not add to, the first one's main_grad
        model.zero_grad_buffer()
        with model.no_sync():
            loss = model(batches[2 * it])
            nodes |= _graph_node_names(loss)
            loss.backward()
        model(batches[2 * it + 1]).backward()
        model.finish_grad_sync()
        grads.append({n: p.main_grad.clone() for n, p in model.module.named_parameters()})
        assert all(p.grad is None for p in model.module.parameters())
    return grads, nodes


def _graph_node_names(t):
    names, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    return names


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_wgrad_computed_into_main_grad_equals_the_hook_path(grad_dtype):
    from megatron_lite.parallel.tensor import _MM_OUT_DTYPE
    assert _MM_OUT_DTYPE, "this torch has no torch.mm(..., out_dtype=torch.float32)"
    fused, fused_nodes = _main_grads_after_two_iterations(True, grad_dtype)
    hooked, hooked_nodes = _main_grads_after_two_iterations(False, grad_dtype)
    assert "_LinearIntoMainGradBackward" in fused_nodes and "_LinearIntoMainGradBackward" not in hooked_nodes
    for it in range(2):
        for name, g in hooked[it].items():
            assert fused[it][name].dtype == grad_dtype
            # the hook path rounds each microbatch's weight gradient to bf16 first; bf16 main
            # grads round the sum as well
            torch.testing.assert_close(fused[it][name], g, rtol=1e-2 if grad_dtype == torch.float32 else 2e-2,
                                       atol=1e-5)
    if grad_dtype == torch.float32:   # fp32 accumulation rounds differently from the hook path
        assert not torch.equal(fused[1]["fc1.weight"], hooked[1]["fc1.weight"])


def test_a_dropped_run_frees_its_model_and_gradient_buffers():
    """The gradient hooks live in C++, out of the garbage collector's sight: if they held the DDP
    wrapper, every run built in a process (tests, benchmarks, the Trainer API) would leak its
    model and fp32 gradient buffers."""
    import gc
    import itertools
    import weakref

    from megatron_lite.arguments import parse_args
    from megatron_lite.initialize import build_run, setup_parallel
    from megatron_lite.training import build_data, train_step

    cfg = parse_args(["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                      "--micro-batch-size", "2", "--mock-data", "--tokenizer-type", "NullTokenizer",
                      "--vocab-size", "63", "--train-iters", "2"])
    run = build_run(cfg, setup_parallel(cfg))
    train_step(run, itertools.islice(build_data(run)[0], 1))   # the hooks have fired
    refs = [weakref.ref(run.model), weakref.ref(run.module)] + [weakref.ref(b.grad_data) for b in run.model.buckets]
    del run
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
