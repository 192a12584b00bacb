"""Data parallelism: bucketed gradient reduction over the DP group, and finalize_model_grads.

`DistributedDataParallel` wraps one model chunk. Each parameter's gradient accumulates into
`param.main_grad`, a view of a contiguous per-bucket buffer, so that microbatches add up there
and each bucket is reduced with one collective. The buffers are fp32 for bf16 training
(--accumulate-allreduce-grads-in-fp32, which --bf16 implies); with `grad_dtype=torch.bfloat16`
(--main-grads-dtype bf16, --grad-reduce-in-bf16) a bf16 parameter's gradient accumulates and is
reduced in bf16, at half the memory and traffic, and with `grad_dtype=torch.float16` (--fp16
without --accumulate-allreduce-grads-in-fp32, Megatron's default) an fp16 one in fp16.
Parameters are laid out in reverse order (as Megatron does) because backward produces the last
layers' gradients first: with `overlap_grad_reduce` the first bucket is complete, and its
all-reduce starts, while the backward of earlier layers is still running.

With the distributed optimizer (ZeRO-1) each bucket is reduce-scattered instead: DP rank r
receives the averaged gradient of the r-th contiguous 1/DP slice of the bucket, updates the
parameters in that slice, and `all_gather_params` then gathers the updated slices into
every replica. For that the parameters live in a per-bucket contiguous buffer too.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lite.config import ParallelConfig
from megatron_lite.parallel.state import ParallelState


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Ranks in `group`; 1 for None (this rank is in no such group) or without torch.distributed."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def world_group() -> Optional[dist.ProcessGroup]:
    """The group of every rank, or None in a single process without torch.distributed."""
    return dist.group.WORLD if dist.is_initialized() else None


def all_reduce(tensor: torch.Tensor, group: Optional[dist.ProcessGroup], op=dist.ReduceOp.SUM) -> None:
    """In-place all-reduce that is a no-op for a group of one (or a single process)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def all_reduce_coalesced(tensors: List[torch.Tensor], group: Optional[dist.ProcessGroup]) -> None:
    """Sum a list of tensors over `group` with one collective (flatten, reduce, copy back)."""
    if not tensors or group_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases only have the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class GradBucket:
    """A group of parameters whose gradients (and, with ZeRO-1, values) share one flat buffer.

    `ranges[param]` is the parameter's [start, end) in the buffer. The buffer is padded to a
    multiple of DP x 128 elements when the distributed optimizer shards it, so that every DP
    rank owns an equal, aligned slice (`shard_range`).
    """

    def __init__(self, params: List[torch.nn.Parameter], pad_to: int, keep_params_in_buffer: bool,
                 device: torch.device, grad_dtype: torch.dtype = torch.float32):
        self.params = params
        self.ranges: Dict[torch.nn.Parameter, Tuple[int, int]] = {}
        offset = 0
        for p in params:
            self.ranges[p] = (offset, offset + p.numel())
            offset += p.numel()
        self.numel = math.ceil(offset / pad_to) * pad_to
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_data: Optional[torch.Tensor] = None
        if keep_params_in_buffer:
            self.param_data = torch.zeros(self.numel, dtype=params[0].dtype, device=device)
        for p in params:
            start, end = self.ranges[p]
            p.main_grad = self.grad_data[start:end].view(p.shape)
            if self.param_data is not None:
                self.param_data[start:end].copy_(p.data.reshape(-1))
                p.data = self.param_data[start:end].view(p.shape)
        self.pending = set(params)
        self.handle = None
        self.param_handle = None   # the overlapped all-gather of the updated params, until waited for
        self.divide_after = False  # reduced with a sum that the average still has to divide

    def shard_range(self, dp_rank: int, dp_size: int) -> Tuple[int, int]:
        """[start, end) of the buffer that DP rank `dp_rank` owns under the distributed optimizer."""
        size = self.numel // dp_size
        return dp_rank * size, (dp_rank + 1) * size

    def reset(self) -> None:
        self.pending = set(self.params)
        self.handle = None


class DistributedDataParallel(torch.nn.Module):
    """Wraps one model chunk; averages its gradients over the data-parallel group.

    Call `zero_grad_buffer()` before an iteration's first microbatch, run the microbatches
    (all but the last under `no_sync()`, or with `is_last_microbatch = False`), then
    `finish_grad_sync()` (through `finalize_model_grads`). Without `overlap_grad_reduce`
    every bucket is reduced in `finish_grad_sync`; with it, a bucket's collective starts
    as soon as the last microbatch's backward has produced all of its gradients.
    """

    def __init__(self, module: torch.nn.Module, parallel_cfg: ParallelConfig, state: ParallelState, *,
                 grad_dtype: torch.dtype = torch.float32):
        super().__init__()
        if grad_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"gradient buffers are float32, bfloat16 or float16, not {grad_dtype}")
        self.grad_dtype = grad_dtype
        self.module = module
        self.state = state
        self.overlap_grad_reduce = parallel_cfg.overlap_grad_reduce
        self.use_distributed_optimizer = parallel_cfg.use_distributed_optimizer
        self.overlap_param_gather = parallel_cfg.overlap_param_gather and parallel_cfg.use_distributed_optimizer
        self.average_in_collective = parallel_cfg.ddp_average_in_collective
        self.is_last_microbatch = True
        if parallel_cfg.ddp_bucket_size <= 0:
            raise ValueError(f"--ddp-bucket-size must be positive, got {parallel_cfg.ddp_bucket_size}")
        self.buckets = self._make_buckets(parallel_cfg.ddp_bucket_size)
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        for p in self._bucket_of:
            p.main_grad_is_stale = True        # main_grad holds nothing of this iteration yet
            p.grad_added_to_main_grad = False  # set by a linear that computed its wgrad into main_grad
            p.fuse_wgrad = parallel_cfg.gradient_accumulation_fusion
        # The parameters keep their hooks in C++, where the garbage collector does not see them:
        # a hook holding this wrapper would keep it, the model and every gradient buffer alive
        # forever (a reference cycle through C++). The hook holds a weak reference instead.
        on_grad_ready = weakref.WeakMethod(self._on_grad_ready)

        def hook(param: torch.Tensor) -> None:
            method = on_grad_ready()
            if method is not None:
                method(param)

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self._bucket_of]
        if self.overlap_param_gather:
            self._register_param_gather_hooks()

    def _register_param_gather_hooks(self) -> None:
        """--overlap-param-gather: wait for a bucket's all-gather just before its first use.

        Each submodule gets a forward pre-hook that waits for the buckets of its own parameters.
        Some parameters are used without their module being called (a norm applied through a
        method, the output weight of a tied model): the first forward waits for every bucket at
        its start and records which submodules were called; from then on the top module's
        pre-hook waits only for the buckets holding a parameter of a module that was not. A
        state dict waits for all of them before it reads the weights."""
        self._own_buckets: Dict[torch.nn.Module, List[GradBucket]] = {}
        for module in self.module.modules():
            buckets = []
            for p in module.parameters(recurse=False):
                bucket = self._bucket_of.get(p)
                if bucket is not None and all(bucket is not b for b in buckets):
                    buckets.append(bucket)
            self._own_buckets[module] = buckets
        self._called: Optional[set] = None         # submodules called during the first forward
        self._eager_buckets: Optional[List[GradBucket]] = None

        def weak(method):
            ref = weakref.WeakMethod(method)

            def hook(*args):
                bound = ref()
                if bound is not None:
                    bound(*args)
            return hook

        self.module.register_forward_pre_hook(weak(self._before_forward))
        for module in self.module.modules():
            module.register_forward_pre_hook(weak(self._before_submodule))
        self.module.register_forward_hook(weak(self._after_forward))
        self.module.register_state_dict_pre_hook(weak(self._before_state_dict))

    def _before_forward(self, module, args) -> None:
        if self._eager_buckets is None:
            self.finish_param_sync()
            self._called = set()
        for bucket in self._eager_buckets or ():
            _wait_for_params(bucket)

    def _before_submodule(self, module, args) -> None:
        if self._called is not None:
            self._called.add(module)
        for bucket in self._own_buckets.get(module, ()):
            _wait_for_params(bucket)

    def _before_state_dict(self, module, prefix, keep_vars) -> None:
        self.finish_param_sync()

    def _after_forward(self, module, args, output) -> None:
        if self._called is None:
            return
        eager = []
        for owner, buckets in self._own_buckets.items():
            if owner not in self._called:
                eager += [b for b in buckets if all(b is not e for e in eager)]
        self._eager_buckets, self._called = eager, None

    def _make_buckets(self, bucket_size: int) -> List[GradBucket]:
        """Fill buckets with parameters in reverse order, closing one when it reaches `bucket_size`.

        A parameter starts a new bucket when its dtype differs from the bucket's (one buffer
        dtype per bucket) and a shared embedding gets a bucket of its own, so that the first
        and the last pipeline stage shard it identically over DP (their other buckets differ).
        """
        pad_to = math.lcm(self.state.dp_size, 128) if self.use_distributed_optimizer else 1
        params = [p for p in self.module.parameters() if p.requires_grad]
        groups: List[List[torch.nn.Parameter]] = []
        current: List[torch.nn.Parameter] = []
        current_numel = 0
        for p in reversed(params):
            alone = getattr(p, "shared_embedding", False)
            if current and (alone or p.dtype != current[0].dtype):
                groups.append(current)
                current, current_numel = [], 0
            current.append(p)
            current_numel += p.numel()
            if alone or current_numel >= bucket_size:
                groups.append(current)
                current, current_numel = [], 0
        if current:
            groups.append(current)
        device = params[0].device if params else self.state.device
        # a bf16/fp16 buffer holds the gradients of parameters of that dtype only; others stay fp32
        return [GradBucket(g, pad_to, self.use_distributed_optimizer, device,
                           self.grad_dtype if g[0].dtype == self.grad_dtype else torch.float32) for g in groups]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks (set_input_tensor, config, ...) come from the wrapped module."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        """Move the fresh gradient into main_grad and, when enabled, start the bucket's reduction."""
        bucket = self._bucket_of[param]
        if bucket.handle is not None:
            raise RuntimeError("a gradient arrived after its bucket's all-reduce had started (overlap_grad_reduce): "
                               "run every microbatch but the last under model.no_sync()")
        if param.grad_added_to_main_grad:   # the linear's wgrad GEMM wrote main_grad itself
            param.grad_added_to_main_grad = False
        elif param.main_grad_is_stale:      # first gradient of the iteration: overwrite, no zeroing pass
            param.main_grad.copy_(param.grad)
            param.main_grad_is_stale = False
        else:
            param.main_grad.add_(param.grad)
        param.grad = None
        if self.overlap_grad_reduce and self.is_last_microbatch:
            bucket.pending.discard(param)
            if not bucket.pending and bucket.handle is None:
                self._start_reduce(bucket, async_op=True)

    def _start_reduce(self, bucket: GradBucket, async_op: bool) -> None:
        """Average the bucket over DP: scale by 1/DP, then all-reduce (or reduce-scatter for ZeRO-1).

        With --ddp-average-in-collective the collective averages (ReduceOp.AVG) instead of the
        scaling before it; where the backend has no AVG (gloo) it sums and `finish_grad_sync`
        divides by DP after the wait."""
        dp_size, group = self.state.dp_size, self.state.dp_group
        bucket.pending = set()
        if group_size(group) == 1:
            bucket.handle = _DONE
            return
        op = dist.ReduceOp.SUM
        if not self.average_in_collective:
            bucket.grad_data.mul_(1.0 / dp_size)
        elif dist.get_backend(group) == "nccl":
            op = dist.ReduceOp.AVG
        else:
            bucket.divide_after = True
        if self.use_distributed_optimizer:
            start, end = bucket.shard_range(self.state.dp_rank, dp_size)
            work = _reduce_scatter(bucket.grad_data[start:end], bucket.grad_data, op=op, group=group,
                                   async_op=async_op)
        else:
            work = dist.all_reduce(bucket.grad_data, op=op, group=group, async_op=async_op)
        bucket.handle = work if async_op else _DONE

    def finish_grad_sync(self) -> None:
        """Make every main_grad the DP average (ZeRO-1: on this rank's shard); wait for overlapped work.

        Buckets not yet started (no overlap, or parameters that got no gradient) are reduced
        here in bucket order, which is the same on every DP rank.
        """
        for param in self._bucket_of:
            if param.main_grad_is_stale:    # no gradient this iteration: zero, not last iteration's
                param.main_grad.zero_()
                param.main_grad_is_stale = False
        for bucket in self.buckets:
            if bucket.handle is None:
                self._start_reduce(bucket, async_op=False)
        for bucket in self.buckets:
            bucket.handle.wait()
            if bucket.divide_after:
                bucket.divide_after = False
                if self.use_distributed_optimizer:
                    start, end = bucket.shard_range(self.state.dp_rank, self.state.dp_size)
                    bucket.grad_data[start:end].div_(self.state.dp_size)
                else:
                    bucket.grad_data.div_(self.state.dp_size)
            bucket.reset()
        self.finish_param_sync()

    def zero_grad_buffer(self) -> None:
        """Start an iteration: every main_grad counts as zero and partly reduced buckets are forgotten.

        The buffers are not cleared here: each parameter's first gradient of the iteration is
        copied into its main_grad instead of added (one pass over the buffer less per step), and
        `finish_grad_sync` zeroes the main_grad of any parameter that got no gradient. Bucket
        padding is never written, so it stays zero."""
        for p in self._bucket_of:
            p.main_grad_is_stale = True
            p.grad_added_to_main_grad = False
        for bucket in self.buckets:
            bucket.reset()
        for p in self._bucket_of:
            p.grad = None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without starting any reduction (every microbatch but the last)."""
        self.is_last_microbatch = False
        try:
            yield
        finally:
            self.is_last_microbatch = True

    def all_gather_params(self) -> None:
        """ZeRO-1: gather every DP rank's updated slice of each parameter bucket into all replicas.

        With --overlap-param-gather each bucket's all-gather is only issued here; the forward
        pre-hook of the first submodule that uses one of its parameters waits for it, so the
        gathers run behind the next iteration's forward (the numbers are the same)."""
        group = self.state.dp_group
        if not self.use_distributed_optimizer or group_size(group) == 1:
            return
        for bucket in self.buckets:
            start, end = bucket.shard_range(self.state.dp_rank, self.state.dp_size)
            work = _all_gather(bucket.param_data, bucket.param_data[start:end], group=group,
                               async_op=self.overlap_param_gather)
            if self.overlap_param_gather:
                bucket.param_handle = work

    def finish_param_sync(self) -> None:
        """Wait for every all-gather of updated params still in flight (--overlap-param-gather)."""
        for bucket in self.buckets:
            _wait_for_params(bucket)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if assign and self.use_distributed_optimizer:
            raise ValueError("load_state_dict(assign=True) would detach the parameters from the "
                             "distributed optimizer's buffers; load with assign=False")
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.module.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)


def _wait_for_params(bucket: GradBucket) -> None:
    if bucket.param_handle is not None:
        bucket.param_handle.wait()
        bucket.param_handle = None


class _Done:
    """Stands in for the work handle of a reduction that has already completed."""

    def wait(self) -> None:
        pass


_DONE = _Done()


def finalize_model_grads(model_chunks: List[DistributedDataParallel], state: ParallelState,
                         num_tokens: Optional[torch.Tensor] = None) -> None:
    """Finish every gradient reduction an iteration needs before the optimizer step.

    1. DP: `finish_grad_sync` on each chunk (average over data-parallel replicas).
    2. TP: sum the grads of parameters marked `sequence_parallel` over the TP group; each
       TP rank saw only its part of the sequence, so each holds a partial gradient.
    3. PP: sum the grads of parameters marked `shared_embedding` (the tied word-embedding /
       output weight on the first and last stage) over the embedding group.
    4. --calculate-per-token-loss: `num_tokens` is this rank's count of unmasked tokens (the
       last stage's; any value elsewhere). It is broadcast from the last stage over PP and
       summed over DP, and the gradients, which are DP-averaged sums of per-token losses, are
       multiplied by DP / total: the gradient of the mean over every token of the global batch.
    """
    for chunk in model_chunks:
        chunk.finish_grad_sync()
    params = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad]
    all_reduce_coalesced([p.main_grad for p in params if getattr(p, "sequence_parallel", False)],
                         state.tp_group)
    all_reduce_coalesced([p.main_grad for p in params if getattr(p, "shared_embedding", False)],
                         state.embedding_group)
    if num_tokens is not None:
        total = num_tokens.detach().to(torch.float32, copy=True)
        if group_size(state.pp_group) > 1:
            dist.broadcast(total, src=state.pp_ranks[-1], group=state.pp_group)
        all_reduce(total, state.dp_group)
        factor = state.dp_size / total.clamp(min=1.0)
        for chunk in model_chunks:
            for bucket in chunk.buckets:
                bucket.grad_data.mul_(factor)
