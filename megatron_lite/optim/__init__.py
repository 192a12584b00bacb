"""Optimizer side of training: fp32 main params and ZeRO-1 sharding, loss scaling, gradient
clipping across TP/PP/DP, and the learning-rate schedule."""

from megatron_lite.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler, build_grad_scaler
from megatron_lite.optim.optimizer import MegatronOptimizer, build_optimizer
from megatron_lite.optim.scheduler import OptimizerParamScheduler, build_scheduler

__all__ = ["ConstantGradScaler", "DynamicGradScaler", "build_grad_scaler", "MegatronOptimizer",
           "build_optimizer", "OptimizerParamScheduler", "build_scheduler"]
