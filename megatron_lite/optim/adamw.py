"""AdamW over fp32 main params, with the moments stored in fp32, bf16 or fp16, and the model's
bf16/fp16 copy of each parameter written in the same pass.

On CUDA, with the fused kernels built, the step is one kernel per tensor
(`torch.ops.mlite.adamw_step`, csrc/cuda/adam.cu): it reads the main param, its gradient (fp32
or bf16) and both moments once, and writes the main param, the moments and the model copy.
torch's fused AdamW needs a second pass to cast the main params into the model. Elsewhere (CPU,
or `--no-fused-kernels`) the same update runs as torch operations in fp32.

The update and the state are torch.optim.AdamW's (`step`, `exp_avg`, `exp_avg_sq` per
parameter, decoupled weight decay, bias correction), so a checkpoint written with either
optimizer loads into the other. `--exp-avg-dtype` / `--exp-avg-sq-dtype` bf16 or fp16 (with
`--use-precision-aware-optimizer`, as in Megatron-LM) halve the moments' memory; the
arithmetic stays fp32.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fused_adamw_available(device: torch.device) -> bool:
    """Whether the CUDA AdamW kernel can run on `device` (it registers with the kernel extension)."""
    if device.type != "cuda":
        return False
    try:
        from megatron_lite.ops.cuda_build import load_extension

        load_extension(device)
    except ImportError:
        return False
    return hasattr(torch.ops.mlite, "adamw_step")


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update with moments in `exp_avg_dtype` / `exp_avg_sq_dtype`.

    `grad_of(main_param)` gives the gradient to use, `p.grad` by default: an fp32 tensor, or a
    bf16 one (--main-grads-dtype bf16), which torch would not accept as an fp32 tensor's `.grad`.

    `model_view(main_param)` gives the flat bf16/fp16 tensor (the model parameter, or its
    slice under the distributed optimizer) that receives the updated value after each step, or
    None; it is asked at every step, so a model whose parameter storage was replaced is still
    written. `writes_model_params` tells the caller it need not copy them itself. `grad_scale`, when
    set to a one-element tensor before `step()`, divides every gradient as it is read (the
    caller's gradient clipping, without a pass of its own).
    """

    writes_model_params = True

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01, *,
                 exp_avg_dtype: torch.dtype = torch.float32, exp_avg_sq_dtype: torch.dtype = torch.float32,
                 model_view: Callable[[torch.Tensor], Optional[torch.Tensor]] = lambda p: None,
                 fused: bool = False):
        if lr < 0.0 or eps < 0.0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid AdamW hyperparameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.exp_avg_dtype, self.exp_avg_sq_dtype = exp_avg_dtype, exp_avg_sq_dtype
        self.model_view = model_view
        self.grad_of: Callable[[torch.Tensor], Optional[torch.Tensor]] = lambda p: p.grad
        self.fused = fused
        self.grad_scale: Optional[torch.Tensor] = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"AdamW here updates fp32 main params; got a {p.dtype} parameter")

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.exp_avg_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.exp_avg_sq_dtype)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("AdamW.step does not take a closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if self.grad_of(p) is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            for s in states:
                s["step"] += 1
            # one launch list per step count (they are all equal unless state was loaded partially)
            by_step: Dict[float, List[int]] = {}
            for i, s in enumerate(states):
                by_step.setdefault(float(s["step"]), []).append(i)
            for step, idx in by_step.items():
                self._update(group, [params[i] for i in idx], [states[i] for i in idx], step)

    def _update(self, group: dict, params: List[torch.Tensor], states: List[dict], step: float) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        grads = [self.grad_of(p) for p in params]
        models = [self.model_view(p) for p in params]
        if self.fused:
            with_model = [m is not None for m in models]
            for keep in (True, False):   # the kernel takes model copies for all tensors of a call or none
                sel = [i for i, w in enumerate(with_model) if w == keep]
                if sel:
                    torch.ops.mlite.adamw_step(
                        [params[i] for i in sel], [grads[i] for i in sel], [states[i]["exp_avg"] for i in sel],
                        [states[i]["exp_avg_sq"] for i in sel], [models[i] for i in sel] if keep else [],
                        lr, beta1, beta2, eps, wd, step, self.grad_scale)
            return
        bias_correction1 = 1.0 - beta1 ** step
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
        for p, g, s, model in zip(params, grads, states, models):
            g = g.float()
            if self.grad_scale is not None:
                g = g / self.grad_scale.to(g.device)
            m, v = s["exp_avg"].float(), s["exp_avg_sq"].float()
            p.mul_(1.0 - lr * wd)
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=-lr / bias_correction1)
            s["exp_avg"].copy_(m)
            s["exp_avg_sq"].copy_(v)
            if model is not None:
                model.copy_(p.view(-1))

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating state to the parameter's dtype (fp32); the moments go
        back to their configured dtypes."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    state["exp_avg"] = state["exp_avg"].to(self.exp_avg_dtype)
                    state["exp_avg_sq"] = state["exp_avg_sq"].to(self.exp_avg_sq_dtype)
                    state["step"] = state["step"].float().cpu()
