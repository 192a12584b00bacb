"""What the training loop measures and where it reports it, with Megatron-LM's names.

    Timers              --timing-log-level / --timing-log-option: the "(min, max) time across ranks" block
    MetricsWriter       TensorBoard (--tensorboard-dir) and Weights & Biases (--wandb-project), last rank
    StepProfiler        --profile: torch.profiler trace and a CUDA profiler range for the chosen iterations
    num_floating_point_operations, params_l2_norm, num_zeros_in_grad, memory_stats
    check_weight_hash_across_dp_replicas
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_lite.optim.clip_grads import counts_in_grad_norm, global_grad_norm_tensor
from megatron_lite.parallel.data import all_reduce, world_group

# the timers each --timing-log-level adds to the log, in Megatron's order
TIMERS_BY_LEVEL = {1: ["forward-backward", "all-grads-sync", "optimizer"], 2: ["batch-generator"]}


def num_floating_point_operations(model, batch_size: int) -> float:
    """Model FLOPs of one global batch of a dense GPT (forward and backward), Megatron-LM's formula:

        B * s * L * 6 * (h * (q + 2 k) + q * h  +  e * h * f)     QKV and output projections, MLP
      + B * s * 6 * h * V                                         logits
      + B * s^2 * L * 6 * q                                       QK^T and attention x V

    with B the batch size, s the sequence length, L layers, h the hidden size, q = heads x head
    dim, k = query groups x head dim, f the MLP size, e = 3 with SwiGLU (two fc1 halves) else 2,
    V the padded vocabulary. Each matmul costs 2 FLOPs per multiply-add and runs three times
    (forward, data gradient, weight gradient): the 6. The attention scores count half the s x s
    square (the causal mask) twice (two matmuls). Norms, biases and recomputation are not counted.
    """
    h, s, L = model.hidden_size, model.seq_length, model.num_layers
    q = model.head_dim * model.num_attention_heads
    k = model.head_dim * model.query_groups
    expansion = 3 if model.swiglu else 2
    vocab = model.padded_vocab_size or model.vocab_size or 0
    per_token = 6 * L * (h * (q + 2 * k) + q * h + expansion * h * model.ffn_size) + 6 * h * vocab
    return float(batch_size * s * per_token + batch_size * s * s * L * 6 * q)


def _trainable_and_frozen(run):
    """(main params this rank's optimizer updates and counts, frozen model params it counts)."""
    state = run.state
    trainable = [m for m in run.optimizer.main_params if counts_in_grad_norm(m.model_param, state)]
    frozen = [p.detach() for p in run.module.parameters()
              if not p.requires_grad and counts_in_grad_norm(p, state)]
    return trainable, frozen


def _optimizer_group(run):
    """Where the optimizer's pieces add up to the whole model: every rank with the distributed
    optimizer (each DP rank holds a shard), the model-parallel group otherwise."""
    return world_group() if run.optimizer.use_distributed_optimizer else run.state.mp_group


def params_l2_norm(run) -> torch.Tensor:
    """L2 norm of all the model's parameters (--log-params-norm), each element counted once over
    TP, PP and DP (as the gradient norm is): the fp32 main params the optimizer updates, and the
    frozen ones as the model holds them. A 0-dim fp32 tensor on the device, not waited for."""
    trainable, frozen = _trainable_and_frozen(run)
    device = run.state.device
    total = global_grad_norm_tensor([m.main_param for m in trainable], _optimizer_group(run), device) ** 2
    if frozen:
        total = total + global_grad_norm_tensor(frozen, run.state.mp_group, device) ** 2
    return total.sqrt()


def num_zeros_in_grad(run) -> torch.Tensor:
    """Gradient elements that are exactly zero (--log-num-zeros-in-grad), over the gradients the
    gradient norm counts, after the optimizer step read them. A 0-dim tensor on the device."""
    trainable, _ = _trainable_and_frozen(run)
    count = torch.zeros((), dtype=torch.float64, device=run.state.device)
    for m in trainable:
        count += (m.main_grad() == 0).sum().to(count)
    all_reduce(count, _optimizer_group(run))
    return count


def memory_stats(device: torch.device) -> Dict[str, float]:
    """Megatron's --log-memory-to-tensorboard scalars from torch.cuda.memory_stats; empty on a CPU."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {"mem-reserved-bytes": stats.get("reserved_bytes.all.current", 0),
            "mem-allocated-bytes": stats.get("allocated_bytes.all.current", 0),
            "mem-max-allocated-bytes": stats.get("allocated_bytes.all.peak", 0),
            "mem-allocated-count": stats.get("allocation.all.current", 0)}


class Timer:
    """Wall time between start() and stop(), summed until read. On a GPU both wait for the device
    (torch.cuda.synchronize), so a timer measures the work queued between them, as Megatron's do."""

    def __init__(self, cuda: bool):
        self._cuda = cuda
        self._elapsed = 0.0
        self._start: Optional[float] = None

    def start(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        self._elapsed += time.perf_counter() - self._start
        self._start = None

    def elapsed(self, reset: bool = True) -> float:
        value = self._elapsed
        if reset:
            self._elapsed = 0.0
        return value


class _NoTimer:
    """A timer above --timing-log-level: costs nothing and reports nothing."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Timers:
    """The named timers of a run; a timer whose level is above --timing-log-level is a no-op.

    `report` gathers every rank's times (one all-gather over all ranks, which every rank must
    call) and formats them per --timing-log-option, in milliseconds per iteration:

        (min, max) time across ranks (ms):
            forward-backward ...............................: (12.34, 13.01)
    """

    def __init__(self, log_level: int, log_option: str, device: torch.device):
        self.log_level = log_level
        self.log_option = log_option
        self.device = device
        self._timers: Dict[str, Timer] = {}

    def __call__(self, name: str, log_level: int):
        if log_level > self.log_level:
            return _NoTimer()
        if name not in self._timers:
            self._timers[name] = Timer(self.device.type == "cuda")
        return self._timers[name]

    @property
    def names(self) -> List[str]:
        """The timers this level logs, in Megatron's order."""
        return [n for level in sorted(TIMERS_BY_LEVEL) if level <= self.log_level for n in TIMERS_BY_LEVEL[level]]

    def gather(self, reset: bool = True) -> Dict[str, List[float]]:
        """{timer name: seconds on each rank} for the timers this level logs."""
        names = self.names
        if not names:
            return {}
        mine = torch.tensor([self._timers[n].elapsed(reset) if n in self._timers else 0.0 for n in names],
                            dtype=torch.float64)
        group = world_group()
        if group is None:
            table = mine.unsqueeze(0)
        else:
            local = mine.to(self.device)
            table = torch.empty((dist.get_world_size(), len(names)), dtype=local.dtype, device=self.device)
            dist.all_gather_into_tensor(table, local)
            table = table.cpu()
        return {n: table[:, i].tolist() for i, n in enumerate(names)}

    def format(self, times: Dict[str, List[float]], normalizer: float) -> Optional[str]:
        """Megatron's timers block for `times` (from `gather`), divided by `normalizer`
        iterations; None when no timer ran."""
        scale = 1000.0 / normalizer
        if self.log_option == "all":
            lines = ["times across ranks (ms):"]
            for name, per_rank in times.items():
                if any(t > 0 for t in per_rank):
                    lines.append(f"  {name}:")
                    lines += [f"     rank {r:2d}: {t * scale:.2f}" for r, t in enumerate(per_rank) if t > 0]
            return "\n".join(lines) if len(lines) > 1 else None
        max_only = self.log_option == "max"
        lines = ["max time across ranks (ms):" if max_only else "(min, max) time across ranks (ms):"]
        for name, per_rank in times.items():
            ran = [t * scale for t in per_rank if t > 0]
            if ran:
                label = (name + " ").ljust(48, ".")
                lines.append(f"    {label}: {max(ran):.2f}" if max_only else f"    {label}: ({min(ran):.2f}, {max(ran):.2f})")
        return "\n".join(lines) if len(lines) > 1 else None


def _wandb_mode() -> str:
    """WANDB_MODE when set; otherwise online when an API key is configured (WANDB_API_KEY or a
    `wandb login` entry in ~/.netrc), else offline: a run on a machine without W&B credentials
    still records everything locally (`wandb sync` uploads it later) instead of failing."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc, encoding="utf-8") as f:
            return "online" if "api.wandb.ai" in f.read() else "offline"
    except OSError:
        return "offline"


class MetricsWriter:
    """TensorBoard and W&B writers of a run, on the last rank only (Megatron's choice: the rank
    that holds the loss). `scalar(tag, value, iteration)` writes to both; `samples` adds
    TensorBoard's "<tag> vs samples" series; `wandb=False` or `tensorboard=False` leaves one out.
    W&B receives the --tensorboard-log-interval scalars whether or not --tensorboard-dir is set."""

    def __init__(self, logging_cfg, run_cfg_dict: dict, save_dir: Optional[str], rank: int, world_size: int,
                 print_fn=print):
        self.tensorboard = None
        self.wandb = None
        if rank != world_size - 1:
            return
        c = logging_cfg
        if c.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print_fn("WARNING: --tensorboard-dir needs the tensorboard package (pip install tensorboard); "
                         "no TensorBoard logs will be written")
            else:
                self.tensorboard = SummaryWriter(log_dir=c.tensorboard_dir, max_queue=c.tensorboard_queue_size)
        if c.wandb_project:
            try:
                import wandb
            except ImportError:
                print_fn("WARNING: --wandb-project needs the wandb package (pip install wandb); "
                         "no W&B logs will be written")
            else:
                wandb_dir = c.wandb_save_dir or os.path.join(save_dir or ".", "wandb")
                os.makedirs(wandb_dir, exist_ok=True)
                self.wandb = wandb.init(project=c.wandb_project, name=c.wandb_exp_name, dir=wandb_dir,
                                        entity=c.wandb_entity, config=run_cfg_dict, mode=_wandb_mode())

    @property
    def enabled(self) -> bool:
        return self.tensorboard is not None or self.wandb is not None

    def scalar(self, tag: str, value, iteration: int, samples: Optional[int] = None, wandb: bool = True,
               tensorboard: bool = True) -> None:
        if tensorboard and self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, iteration)
            if samples is not None:
                self.tensorboard.add_scalar(f"{tag} vs samples", value, samples)
        if wandb and self.wandb is not None:
            self.wandb.log({tag: value}, step=iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class StepProfiler:
    """--profile: iterations profile_step_start + 1 to profile_step_end on the ranks of
    --profile-ranks (all ranks when empty). A torch.profiler trace goes to
    <--tensorboard-dir, else --save, else .>/torch_profile/rank-<rank>.json.gz, and on GPUs the
    same iterations are a cudaProfilerStart/Stop range (nsys --capture-range=cudaProfilerApi)."""

    def __init__(self, logging_cfg, rank: int, save_dir: Optional[str], device: torch.device):
        c = logging_cfg
        self.enabled = c.profile and (not c.profile_ranks or rank in c.profile_ranks)
        self.start_at, self.end_at = c.profile_step_start, c.profile_step_end
        self.path = os.path.join(c.tensorboard_dir or save_dir or ".", "torch_profile", f"rank-{rank}.json.gz")
        self.cuda = device.type == "cuda"
        self._profiler = None

    def before_step(self, iteration: int) -> None:
        """`iteration`: iterations completed before the step that is about to run."""
        if not self.enabled or self._profiler is not None or iteration != self.start_at:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.cudart().cudaProfilerStart()
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.start()

    def after_step(self, iteration: int) -> None:
        """`iteration`: iterations completed, the step just queued included."""
        if self._profiler is not None and iteration >= self.end_at:
            self.stop()

    def stop(self) -> None:
        if self._profiler is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
        self._profiler.stop()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._profiler.export_chrome_trace(self.path)
        self._profiler = None


def _tensor_digest(t: torch.Tensor) -> torch.Tensor:
    """SHA-256 of a tensor's bytes as 32 int64 values (one per byte), comparable across ranks."""
    raw = t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
    return torch.tensor(list(hashlib.sha256(raw).digest()), dtype=torch.int64)


def check_weight_hash_across_dp_replicas(module, dp_group, dp_rank: int, iteration: int,
                                         device: torch.device) -> None:
    """Hash every parameter on this rank, gather the hashes over the data-parallel group and raise
    a RuntimeError naming the parameters and DP ranks whose weights differ from DP rank 0's
    (--check-weight-hash-across-dp-replicas-interval). Every rank of the group must call it."""
    names = [name for name, _ in module.named_parameters()]
    if not names or dp_group is None or dist.get_world_size(dp_group) == 1:
        return
    mine = torch.stack([_tensor_digest(p) for _, p in module.named_parameters()]).to(device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(dp_group))]
    dist.all_gather(gathered, mine, group=dp_group)
    gathered = [g.cpu() for g in gathered]
    differing = {}
    for rank, other in enumerate(gathered[1:], start=1):
        for i in torch.nonzero((other != gathered[0]).any(dim=1)).flatten().tolist():
            differing.setdefault(names[i], []).append(rank)
    if differing:
        shown = "; ".join(f"{n} on DP ranks {r}" for n, r in list(differing.items())[:5])
        more = f" and {len(differing) - 5} more" if len(differing) > 5 else ""
        raise RuntimeError(f"weights differ across data-parallel replicas after iteration {iteration} "
                           f"(DP rank {dp_rank} checking against DP rank 0): {shown}{more}; the replicas "
                           f"diverged (a non-deterministic or rank-dependent update, or a corrupted load)")
