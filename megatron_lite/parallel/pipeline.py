"""Pipeline parallelism: p2p between stages and the forward-backward schedules.

`get_forward_backward_func(state)` is the one place a schedule is chosen: without
pipelining (gradient accumulation over microbatches) when PP = 1, 1F1B otherwise.

A schedule calls `forward_step(microbatch, model) -> (output, loss_func)`; on the last stage
`loss_func(output) -> (loss, reported)` where `loss` is this microbatch's mean loss and
`reported` is a dict of detached values to average for the log. The schedule divides the
loss by the number of microbatches and multiplies it by the loss scale before backward.
With --calculate-per-token-loss `loss_func` returns `(loss_sum, num_tokens, reported)`
instead: the summed loss goes to backward undivided (times the loss scale), and
`reported["num_tokens"]` carries the count, so that `finalize_model_grads` can divide the
gradients by the global number of tokens.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from megatron_lite.parallel.state import ParallelState


class P2P:
    """Sends and receives activations ([s, b, h]) and their gradients between adjacent stages.
    Paired send/recv are posted together (isend + irecv) so neighbours never deadlock."""

    def __init__(self, state: ParallelState, shape, dtype):
        self.state, self.shape, self.dtype = state, tuple(shape), dtype

    def _exchange(self, send: Optional[torch.Tensor], send_to: Optional[int],
                  recv_from: Optional[int]) -> Optional[torch.Tensor]:
        ops, buf = [], None
        if recv_from is not None:
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.state.device, requires_grad=False)
            ops.append(dist.P2POp(dist.irecv, buf, recv_from))
        if send is not None and send_to is not None:
            ops.append(dist.P2POp(dist.isend, send.contiguous(), send_to))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return buf

    def _prev(self):
        return None if self.state.is_first_stage else self.state.prev_rank

    def _next(self):
        return None if self.state.is_last_stage else self.state.next_rank

    def recv_forward(self):
        t = self._exchange(None, None, self._prev())
        return t.requires_grad_() if t is not None else None

    def send_forward(self, output):
        self._exchange(output, self._next(), None)

    def recv_backward(self):
        return self._exchange(None, None, self._next())

    def send_backward(self, input_grad):
        self._exchange(input_grad, self._prev(), None)

    def send_forward_recv_backward(self, output):
        return self._exchange(output, self._next(), self._next())

    def send_backward_recv_forward(self, input_grad):
        t = self._exchange(input_grad, self._prev(), self._prev())
        return t.requires_grad_() if t is not None else None


def _forward(forward_step, batch, model, input_tensor, num_microbatches, reported: List[dict],
             state: ParallelState, loss_scale: float):
    model.set_input_tensor(input_tensor)
    output, loss_func = forward_step(batch, model)
    if state.is_last_stage:
        result = loss_func(output)
        if len(result) == 3:
            loss, num_tokens, values = result
            values = dict(values, num_tokens=num_tokens.detach())
            output = loss * loss_scale
        else:
            loss, values = result
            output = loss * (loss_scale / num_microbatches)
        reported.append(values)
    return output


def _backward(input_tensor, output, output_grad):
    if input_tensor is not None:
        input_tensor.retain_grad()
    torch.autograd.backward(output, grad_tensors=output_grad)
    return input_tensor.grad if input_tensor is not None else None


def _sync_context(model, is_last: bool):
    """Gradient reduction may start only during the last microbatch's backward."""
    if is_last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def forward_backward_no_pipelining(forward_step: Callable, batches, model, state: ParallelState, *,
                                   num_microbatches: int, forward_only: bool = False,
                                   loss_scale: float = 1.0, **_) -> List[dict]:
    """Gradient accumulation: forward and backward each microbatch in turn."""
    reported: List[dict] = []
    for i in range(num_microbatches):
        with _sync_context(model, i == num_microbatches - 1 or forward_only):
            output = _forward(forward_step, next(batches), model, None, num_microbatches, reported, state,
                              loss_scale)
            if not forward_only:
                _backward(None, output, None)
    return reported


def forward_backward_1f1b(forward_step: Callable, batches, model, state: ParallelState, *,
                          num_microbatches: int, tensor_shape, dtype, forward_only: bool = False,
                          loss_scale: float = 1.0) -> List[dict]:
    """One-forward-one-backward: stage r runs PP - r - 1 warm-up forwards, then alternates,
    then drains the remaining backwards; at most PP microbatches are in flight per stage."""
    p2p = P2P(state, tensor_shape, dtype)
    reported: List[dict] = []
    warmup = num_microbatches if forward_only else min(state.pp_size - state.pp_rank - 1, num_microbatches)
    steady = num_microbatches - warmup
    inputs, outputs = [], []

    def fwd(input_tensor):
        return _forward(forward_step, next(batches), model, input_tensor, num_microbatches, reported, state,
                        loss_scale)

    for _ in range(warmup):
        input_tensor = p2p.recv_forward()
        output = fwd(input_tensor)
        p2p.send_forward(output if not state.is_last_stage else None)
        if not forward_only:
            inputs.append(input_tensor)
            outputs.append(output)
    if forward_only:
        return reported

    input_tensor = p2p.recv_forward() if steady > 0 else None
    for i in range(steady):
        last_steady = i == steady - 1
        output = fwd(input_tensor)
        output_grad = p2p.send_forward_recv_backward(output if not state.is_last_stage else None)
        inputs.append(input_tensor)
        outputs.append(output)
        in_t, out_t = inputs.pop(0), outputs.pop(0)
        with _sync_context(model, warmup == 0 and last_steady):
            input_grad = _backward(in_t, out_t, output_grad)
        if last_steady:
            input_tensor = None
            p2p.send_backward(input_grad)
        else:
            input_tensor = p2p.send_backward_recv_forward(input_grad)

    for i in range(warmup):
        in_t, out_t = inputs.pop(0), outputs.pop(0)
        output_grad = p2p.recv_backward()
        with _sync_context(model, i == warmup - 1):
            input_grad = _backward(in_t, out_t, output_grad)
        p2p.send_backward(input_grad)
    return reported


def get_forward_backward_func(state: ParallelState) -> Callable:
    """The schedule for this layout: 1F1B with pipelining, plain accumulation without."""
    return forward_backward_1f1b if state.pp_size > 1 else forward_backward_no_pipelining
