"""One configuration tree for a run, built once from flags or YAML (see arguments.py).

Each dataclass is one component's view of the run; components receive only their own
section. Every field maps to the Megatron-LM flag of the same name (underscores become
dashes); fields whose flag differs carry it in their metadata (`flag=`, and `store_false`
for the negative flags such as `--disable-bias-linear`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional


def flag(default, help: str = "", *, name: Optional[str] = None, store_false: bool = False,
         choices=None, nargs=None, aliases=()):
    """A dataclass field that also describes its command-line flag."""
    meta = {"help": help, "flag": name, "store_false": store_false, "choices": choices,
            "nargs": nargs, "aliases": tuple(aliases)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


SELECTIVE_RECOMPUTE_MODULES = ("layernorm", "mlp_act")   # --recompute-modules choices


@dataclass
class ModelConfig:
    num_layers: int = flag(2, "number of transformer layers")
    hidden_size: int = flag(64, "transformer hidden size")
    ffn_hidden_size: Optional[int] = flag(None, "MLP hidden size (default 4*hidden, or Llama's 2/3 of that with --swiglu)")
    num_attention_heads: int = flag(4, "attention heads")
    group_query_attention: bool = flag(False, "use grouped-query attention")
    num_query_groups: Optional[int] = flag(None, "key/value groups with --group-query-attention")
    kv_channels: Optional[int] = flag(None, "per-head dimension (default hidden/heads)")
    seq_length: int = flag(128, "sequence length of a sample")
    max_position_embeddings: Optional[int] = flag(None, "learned position table size (default seq-length)")
    vocab_size: Optional[int] = flag(None, "vocabulary size (NullTokenizer, mock data); otherwise from the tokenizer")
    padded_vocab_size: Optional[int] = flag(None, "set from vocab_size at start-up; not a user flag")
    make_vocab_size_divisible_by: int = flag(128, "pad the vocabulary to a multiple of this times TP")
    normalization: str = flag("LayerNorm", "normalization layer", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = flag(1e-5, "epsilon of the norm layers")
    swiglu: bool = flag(False, "SwiGLU MLP (gated, SiLU)")
    position_embedding_type: str = flag("learned_absolute", "position encoding",
                                        choices=["learned_absolute", "rope", "none"])
    rotary_base: float = flag(10000, "RoPE base")
    rotary_percent: float = flag(1.0, "fraction of the head dimension that is rotated")
    use_rope_scaling: bool = flag(False, "Llama-3.1 RoPE frequency scaling")
    rope_scaling_factor: float = flag(8.0, "Llama-3.1 RoPE scaling factor")
    add_bias_linear: bool = flag(True, "no biases in linear layers", name="--disable-bias-linear", store_false=True)
    add_qkv_bias: bool = flag(False, "bias on the QKV projection only (Qwen2)")
    untie_embeddings_and_output_weights: bool = flag(False, "separate output layer weights")
    hidden_dropout: float = flag(0.1, "dropout after attention and MLP")
    attention_dropout: float = flag(0.1, "dropout on attention probabilities")
    init_method_std: float = flag(0.02, "std of the normal initialisation")
    recompute_activations: bool = flag(False, "recompute each layer in backward (activation checkpointing)")
    recompute_granularity: Optional[str] = flag(
        None, "full: as --recompute-activations; selective: recompute only --recompute-modules",
        choices=["full", "selective"])
    recompute_modules: List[str] = flag(
        [], "with --recompute-granularity selective: layernorm (both norms' outputs), mlp_act (the MLP "
        "activation's output); each is freed after its consumer's forward and recomputed in backward",
        nargs="*")
    transformer_impl: str = flag("local", "layer implementation", choices=["local", "transformer_engine"])
    fused_kernels: bool = flag(True, "force plain torch ops", name="--no-fused-kernels", store_false=True)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Key/value heads: num_query_groups with GQA, one per head otherwise."""
        if self.group_query_attention and self.num_query_groups:
            return self.num_query_groups
        return self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = flag(1, "tensor-parallel ranks")
    pipeline_model_parallel_size: int = flag(1, "pipeline stages")
    sequence_parallel: bool = flag(False, "shard norms/dropout along the sequence across TP ranks")
    use_distributed_optimizer: bool = flag(False, "shard optimizer state and fp32 main params over DP (ZeRO-1)")
    ddp_bucket_size: int = flag(40_000_000, "elements per gradient all-reduce bucket")
    overlap_grad_reduce: bool = flag(False, "all-reduce gradient buckets during the backward pass")
    gradient_accumulation_fusion: bool = flag(True, "compute bf16/fp16 linear weight gradients into the "
                                              "main_grad buffers on GPUs; this flag turns it off",
                                              name="--no-gradient-accumulation-fusion", store_false=True)
    distributed_backend: Optional[str] = flag(None, "nccl or gloo (default: nccl with CUDA, else gloo)",
                                              choices=["nccl", "gloo"])
    distributed_timeout_minutes: int = flag(10, "timeout of collectives")


@dataclass
class OptimizerConfig:
    optimizer: str = flag("adam", "optimizer (adam is AdamW, as in Megatron)", choices=["adam", "sgd"])
    lr: float = flag(1e-4, "peak learning rate")
    min_lr: float = flag(0.0, "floor of the decayed learning rate")
    lr_decay_style: str = flag("linear", "decay after warmup",
                               choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    lr_decay_iters: Optional[int] = flag(None, "iterations to decay over (default train-iters)")
    lr_decay_samples: Optional[int] = flag(None, "samples to decay over (default train-samples)")
    lr_warmup_fraction: Optional[float] = flag(None, "warmup as a fraction of the decay span")
    lr_warmup_iters: int = flag(0, "warmup iterations")
    lr_warmup_samples: int = flag(0, "warmup samples")
    lr_warmup_init: float = flag(0.0, "learning rate at the start of warmup")
    lr_wsd_decay_style: str = flag("exponential", "WSD annealing shape",
                                   choices=["exponential", "linear", "cosine"])
    lr_wsd_decay_iters: Optional[int] = flag(None, "WSD annealing iterations")
    lr_wsd_decay_samples: Optional[int] = flag(None, "WSD annealing samples")
    weight_decay: float = flag(0.01, "weight decay (constant style)")
    start_weight_decay: Optional[float] = flag(None, "weight decay at the start (increment styles)")
    end_weight_decay: Optional[float] = flag(None, "weight decay at the end (increment styles)")
    weight_decay_incr_style: str = flag("constant", "weight decay schedule", choices=["constant", "linear", "cosine"])
    adam_beta1: float = flag(0.9, "Adam beta1")
    adam_beta2: float = flag(0.999, "Adam beta2")
    adam_eps: float = flag(1e-8, "Adam epsilon")
    sgd_momentum: float = flag(0.9, "SGD momentum")
    use_precision_aware_optimizer: bool = flag(False, "store Adam's moments in --exp-avg-dtype / --exp-avg-sq-dtype")
    exp_avg_dtype: str = flag("fp32", "dtype of Adam's first moment (with --use-precision-aware-optimizer)",
                              choices=["fp32", "bf16", "fp16"])
    exp_avg_sq_dtype: str = flag("fp32", "dtype of Adam's second moment (with --use-precision-aware-optimizer)",
                                 choices=["fp32", "bf16", "fp16"])
    main_grads_dtype: str = flag("fp32", "dtype of the gradient buffers that backward accumulates into, are "
                                 "reduced over DP and update the fp32 main params (bf16: with --bf16 and "
                                 "--use-precision-aware-optimizer)", choices=["fp32", "bf16"])
    clip_grad: float = flag(1.0, "clip the global gradient norm to this (0 disables)")
    bf16: bool = flag(False, "bf16 weights and compute, fp32 main params")
    fp16: bool = flag(False, "fp16 weights and compute with loss scaling, fp32 main params")
    loss_scale: Optional[float] = flag(None, "static loss scale (fp16); default dynamic")
    initial_loss_scale: float = flag(2.0 ** 32, "initial dynamic loss scale")
    min_loss_scale: float = flag(1.0, "floor of the dynamic loss scale")
    loss_scale_window: int = flag(1000, "clean steps before the scale grows")
    hysteresis: int = flag(2, "overflows tolerated before the scale shrinks")
    override_opt_param_scheduler: bool = flag(False, "take the scheduler from the flags, not the checkpoint",
                                              name="--override-opt_param-scheduler",
                                              aliases=["--override-opt-param-scheduler"])
    use_checkpoint_opt_param_scheduler: bool = flag(False, "take the scheduler from the checkpoint",
                                                    name="--use-checkpoint-opt_param-scheduler",
                                                    aliases=["--use-checkpoint-opt-param-scheduler"])


@dataclass
class TrainConfig:
    micro_batch_size: int = flag(2, "samples per microbatch per DP rank")
    global_batch_size: Optional[int] = flag(None, "samples per iteration over all DP ranks (default mbs*DP)")
    train_iters: Optional[int] = flag(None, "iterations to train")
    train_samples: Optional[int] = flag(None, "samples to train (instead of --train-iters)")
    seed: int = flag(1234, "random seed")
    log_interval: int = flag(1, "iterations between log lines")
    eval_interval: int = flag(1000, "iterations between validation runs")
    eval_iters: int = flag(10, "validation iterations per evaluation")
    exit_interval: Optional[int] = flag(None, "save and stop when the iteration is a multiple of this")
    exit_duration_in_mins: Optional[float] = flag(None, "save and stop after this many minutes")
    exit_signal_handler: bool = flag(False, "on SIGTERM/SIGINT finish the iteration, save and exit 0")
    tensorboard_dir: Optional[str] = flag(None, "write TensorBoard scalars here")
    deterministic_mode: bool = flag(False, "deterministic torch/cuBLAS/NCCL algorithms")
    timing_log_level: int = flag(0, "extra timers (0 = iteration time only)")


@dataclass
class DataConfig:
    data_path: List[str] = flag([], "[weight] prefix pairs, or one prefix", nargs="*")
    train_data_path: List[str] = flag([], "training data prefixes", nargs="*")
    valid_data_path: List[str] = flag([], "validation data prefixes", nargs="*")
    test_data_path: List[str] = flag([], "test data prefixes", nargs="*")
    split: str = flag("969,30,1", "train,valid,test proportions of --data-path")
    mock_data: bool = flag(False, "random tokens instead of a dataset")
    data_cache_path: Optional[str] = flag(None, "directory for the cached index files")
    tokenizer_type: str = flag("ByteLevelTokenizer", "tokenizer",
                               choices=["ByteLevelTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer"])
    tokenizer_model: Optional[str] = flag(None, "local Hugging Face tokenizer directory")
    vocab_file: Optional[str] = flag(None, "GPT-2 BPE vocab.json")
    merge_file: Optional[str] = flag(None, "GPT-2 BPE merges.txt")
    dataloader_type: str = flag("single", "sampler", choices=["single", "cyclic"])
    num_workers: int = flag(0, "data loader worker processes")
    reset_position_ids: bool = flag(False, "restart position ids after each end-of-document")
    reset_attention_mask: bool = flag(False, "mask attention across documents")
    eod_mask_loss: bool = flag(False, "no loss on end-of-document tokens")


@dataclass
class CheckpointConfig:
    save: Optional[str] = flag(None, "checkpoint directory to write")
    load: Optional[str] = flag(None, "checkpoint directory to read")
    save_interval: Optional[int] = flag(None, "iterations between checkpoints")
    save_weights_only_interval: Optional[int] = flag(None, "iterations between weights-only checkpoints")
    ckpt_step: Optional[int] = flag(None, "load this iteration instead of the latest")
    finetune: bool = flag(False, "load weights only; reset iteration, optimizer and scheduler")
    reset_sample_stat: bool = flag(False, "further-train: reset iteration and consumed samples, keep optimizer")
    pretrained_checkpoint: Optional[str] = flag(None, "load weights only from this directory")
    load_optim: bool = flag(True, "do not load optimizer state", name="--no-load-optim", store_false=True)
    load_rng: bool = flag(True, "do not load RNG states", name="--no-load-rng", store_false=True)
    load_lr_scheduler: bool = flag(True, "start a fresh LR schedule", name="--no-load-lr-scheduler", store_false=True)
    save_optim: bool = flag(True, "do not save optimizer state", name="--no-save-optim", store_false=True)
    save_rng: bool = flag(True, "do not save RNG states", name="--no-save-rng", store_false=True)
    use_checkpoint_args: bool = flag(False, "take the model config from the checkpoint")
    keep_last_n_checkpoints: Optional[int] = flag(None, "delete older iterations after a newer one is complete")
    exit_on_missing_checkpoint: bool = flag(False, "stop if --load has no checkpoint")
    async_save: bool = flag(False, "write checkpoints in the background")


@dataclass
class RunConfig:
    """The whole tree. `arguments.parse_args` builds it; `validate` checks it once."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Rebuild from `to_dict()` output; keys this version does not know are dropped."""
        kwargs = {}
        for name, sub_cls in SECTIONS.items():
            known = {f.name for f in dataclasses.fields(sub_cls)}
            kwargs[name] = sub_cls(**{k: v for k, v in d.get(name, {}).items() if k in known})
        return cls(**kwargs)


SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "optimizer": OptimizerConfig,
            "train": TrainConfig, "data": DataConfig, "checkpoint": CheckpointConfig}
