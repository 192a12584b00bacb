"""One configuration tree for a run, built once from flags or YAML (see arguments.py).

Each dataclass is one component's view of the run; components receive only their own
section. Every field maps to the Megatron-LM flag of the same name (underscores become
dashes), with Megatron-LM's default; fields whose flag differs carry it in their metadata
(`flag=`, and `store_false` for the negative flags such as `--disable-bias-linear`). Fields
marked `internal` are set at start-up and have no flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional


def flag(default, help: str = "", *, name: Optional[str] = None, store_false: bool = False,
         choices=None, nargs=None, aliases=(), internal: bool = False):
    """A dataclass field that also describes its command-line flag."""
    meta = {"help": help, "flag": name, "store_false": store_false, "choices": choices,
            "nargs": nargs, "aliases": tuple(aliases), "internal": internal}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# --recompute-modules choices: Megatron-Core's names for the parts a dense GPT layer has, and
# mlp_act (the MLP activation's output only), which is megatron_lite's
SELECTIVE_RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "mlp_act")
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")
LORA_TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
TOKENIZER_TYPES = ("ByteLevelTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer",
                   "TikTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")


@dataclass
class ModelConfig:
    num_layers: int = flag(2, "number of transformer layers")
    hidden_size: int = flag(64, "transformer hidden size")
    ffn_hidden_size: Optional[int] = flag(
        None, "MLP hidden size (default 4 * hidden, or int((4 * hidden * 2 / 3) / 64) * 64 with --swiglu)")
    num_attention_heads: int = flag(4, "attention heads")
    group_query_attention: bool = flag(False, "use grouped-query attention")
    num_query_groups: Optional[int] = flag(None, "key/value groups with --group-query-attention")
    kv_channels: Optional[int] = flag(None, "per-head dimension (default hidden/heads)")
    seq_length: int = flag(128, "sequence length of a sample")
    max_position_embeddings: Optional[int] = flag(None, "learned position table size (default seq-length)")
    vocab_size: Optional[int] = flag(None, "vocabulary size (NullTokenizer, mock data); otherwise from the tokenizer")
    padded_vocab_size: Optional[int] = flag(None, internal=True)
    make_vocab_size_divisible_by: int = flag(128, "pad the vocabulary to a multiple of this times TP")
    normalization: str = flag("LayerNorm", "normalization layer", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = flag(1e-5, "epsilon of the norm layers")
    apply_layernorm_1p: bool = flag(False, "norm weights are stored zero-centred and applied as 1 + weight")
    swiglu: bool = flag(False, "SwiGLU MLP (gated, SiLU)")
    squared_relu: bool = flag(False, "squared ReLU activation instead of GeLU")
    bias_gelu_fusion: bool = flag(True, "exact (erf) GeLU instead of the fused tanh-approximated bias-GeLU",
                                  name="--no-bias-gelu-fusion", store_false=True)
    position_embedding_type: str = flag("learned_absolute", "position encoding",
                                        choices=["learned_absolute", "rope", "none"])
    add_position_embedding: bool = flag(True, "deprecated: use --position-embedding-type",
                                        name="--no-position-embedding", store_false=True)
    use_rotary_position_embeddings: bool = flag(False, "deprecated: --position-embedding-type rope")
    rotary_base: float = flag(10000, "RoPE base")
    rotary_percent: float = flag(1.0, "fraction of the head dimension that is rotated")
    rotary_interleaved: bool = flag(False, "rotate interleaved pairs (2i, 2i+1) instead of the two halves")
    apply_rope_fusion: bool = flag(True, "rotary embedding in plain torch instead of the fused kernel",
                                   name="--no-rope-fusion", store_false=True)
    use_rope_scaling: bool = flag(False, "Llama-3.1 RoPE frequency scaling")
    rope_scaling_factor: float = flag(8.0, "Llama-3.1 RoPE scaling factor")
    add_bias_linear: bool = flag(True, "no biases in linear layers", name="--disable-bias-linear", store_false=True)
    add_qkv_bias: bool = flag(False, "bias on the QKV projection only (Qwen2)")
    qk_layernorm: bool = flag(False, "normalize queries and keys per head (--normalization) before attention")
    untie_embeddings_and_output_weights: bool = flag(False, "separate output layer weights")
    hidden_dropout: float = flag(0.1, "dropout after attention and MLP")
    attention_dropout: float = flag(0.1, "dropout on attention probabilities")
    init_method_std: float = flag(0.02, "std of the normal initialisation")
    attention_backend: str = flag(
        "auto", "attention implementation: flash / fused (cuDNN, else memory-efficient) / auto (torch SDPA "
        "backends), unfused / local (explicit scores and softmax)", choices=list(ATTENTION_BACKENDS))
    use_flash_attn: bool = flag(False, "deprecated: --attention-backend flash")
    attention_softmax_in_fp32: bool = flag(False, "unfused attention: masking and softmax in fp32")
    apply_query_key_layer_scaling: bool = flag(
        False, "unfused attention: scale the scores by 1/layer_number and back inside an fp32 softmax "
        "(implies --attention-softmax-in-fp32)")
    masked_softmax_fusion: bool = flag(True, "unfused attention: torch softmax instead of the fused scale-mask-"
                                       "softmax kernel", name="--no-masked-softmax-fusion", store_false=True)
    no_persist_layer_norm: bool = flag(False, "LayerNorm: apex's general fused kernel, not its persistent one")
    cross_entropy_loss_fusion: bool = flag(False, "the fused vocab-parallel cross-entropy kernel")
    cross_entropy_fusion_impl: str = flag("native", "implementation of --cross-entropy-loss-fusion",
                                          choices=["native", "te"])
    recompute_activations: bool = flag(False, "selective recomputation of the core attention (Megatron: "
                                       "--recompute-granularity selective)")
    recompute_granularity: Optional[str] = flag(
        None, "full: recompute whole layers (with --recompute-method); selective: recompute only "
        "--recompute-modules", choices=["full", "selective"])
    recompute_method: Optional[str] = flag(
        None, "full recompute: uniform (chunks of --recompute-num-layers layers) or block (the first "
        "--recompute-num-layers layers of each stage)", choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = flag(None, "layers per recompute chunk (uniform) or per stage (block)")
    recompute_modules: List[str] = flag(
        [], "with --recompute-granularity selective (default core_attn): core_attn (attention scores, "
        "softmax and context), layernorm (both norms' outputs), mlp (the whole MLP), mlp_act (the MLP "
        "activation's output)", nargs="*")
    transformer_impl: str = flag("local", "layer implementation", choices=["local", "transformer_engine"])
    fused_kernels: bool = flag(True, "force plain torch ops", name="--no-fused-kernels", store_false=True)
    fp8: Optional[str] = flag(
        None, "FP8 GEMMs in every decoder layer's linear layers: e4m3 everywhere, or hybrid (e4m3 forward, "
        "e5m2 gradients)", name="--fp8-format", choices=["e4m3", "hybrid"])
    fp8_recipe: str = flag("delayed", "FP8 scaling: tensorwise (each tensor's own amax) or delayed (amax "
                           "history of earlier steps); mxfp8 and blockwise are Transformer Engine's",
                           choices=["tensorwise", "delayed", "mxfp8", "blockwise"])
    fp8_margin: int = flag(0, "delayed FP8 scaling: scales are divided by 2^margin")
    fp8_amax_history_len: int = flag(1, "delayed FP8 scaling: steps of amax history per tensor")
    fp8_amax_compute_algo: str = flag("most_recent", "delayed FP8 scaling: the amax a scale is computed from",
                                      choices=["most_recent", "max"])
    first_last_layers_bf16: bool = flag(False, "with --fp8-format: keep the first and last decoder layers in "
                                        "high precision (--num-layers-at-start-in-bf16, --num-layers-at-end-in-bf16)")
    num_layers_at_start_in_bf16: int = flag(1, "with --first-last-layers-bf16: leading layers without FP8")
    num_layers_at_end_in_bf16: int = flag(1, "with --first-last-layers-bf16: trailing layers without FP8")
    lora_rank: int = flag(0, "LoRA: rank of the low-rank adapters on --lora-target-modules, everything else frozen; "
                          "checkpoints then hold only the adapters and name their base checkpoint (0: no LoRA)")
    lora_alpha: float = flag(8.0, "LoRA: the adapters' output is scaled by alpha / rank (PEFT's lora_alpha)")
    lora_dropout: float = flag(0.0, "LoRA: dropout on the adapters' input")
    lora_target_modules: List[str] = flag(list(LORA_TARGET_MODULES), "LoRA: the linear layers that get adapters",
                                          nargs="+", choices=list(LORA_TARGET_MODULES))

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
        return self.ffn_hidden_size or default_ffn_hidden_size(self.hidden_size, self.swiglu)

    @property
    def recompute_full(self) -> bool:
        return self.recompute_granularity == "full"


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's MLP size when --ffn-hidden-size is not given: 4h, or with SwiGLU two thirds of
    that (two fc1 halves keep the parameter count near the 4h MLP's) rounded down to a multiple of
    64: int((4 * h * 2 / 3) / 64) * 64."""
    if swiglu:
        return int((4 * hidden_size * 2 / 3) / 64) * 64
    return 4 * hidden_size


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = flag(1, "tensor-parallel ranks")
    pipeline_model_parallel_size: int = flag(1, "pipeline stages")
    context_parallel_size: int = flag(1, "context-parallel ranks (only 1: megatron_lite has no context parallelism)")
    expert_model_parallel_size: int = flag(1, "expert-parallel ranks (only 1: megatron_lite has no MoE layers)")
    sequence_parallel: bool = flag(False, "shard norms/dropout along the sequence across TP ranks")
    use_tp_pp_dp_mapping: bool = flag(False, "order ranks TP fastest, then PP, then DP (default: TP, DP, PP)")
    use_distributed_optimizer: bool = flag(False, "shard optimizer state and fp32 main params over DP (ZeRO-1)")
    num_distributed_optimizer_instances: int = flag(1, "distributed-optimizer copies over DP (only 1)")
    ddp_bucket_size: int = flag(40_000_000, "elements per gradient all-reduce bucket")
    overlap_grad_reduce: bool = flag(False, "all-reduce gradient buckets during the backward pass")
    overlap_param_gather: bool = flag(False, "distributed optimizer: all-gather each bucket's updated params "
                                      "during the next forward pass")
    ddp_average_in_collective: bool = flag(False, "average gradients in the DP collective instead of "
                                           "scaling them by 1/DP before it")
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
    decoupled_lr: Optional[float] = flag(None, "peak learning rate of the input embedding and output layer")
    decoupled_min_lr: Optional[float] = flag(None, "learning-rate floor of the input embedding and output layer")
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
    accumulate_allreduce_grads_in_fp32: bool = flag(
        False, "accumulate and all-reduce gradients in fp32 (implied by --bf16; with --fp16 the gradient "
        "buffers are fp16 without it)")
    grad_reduce_in_bf16: bool = flag(False, "with --bf16: accumulate and reduce gradients in bf16")
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
    rampup_batch_size: Optional[List[int]] = flag(
        None, "START INCREMENT SAMPLES: grow the global batch size from START by INCREMENT over SAMPLES samples",
        nargs=3)
    step_batch_size_schedule: Optional[str] = flag(
        None, "'THRESHOLD:BS THRESHOLD:BS ...': the global batch size from each threshold of consumed tokens on "
        "(suffixes K, M, B, T)")
    train_iters: Optional[int] = flag(None, "iterations to train")
    train_samples: Optional[int] = flag(None, "samples to train (instead of --train-iters)")
    calculate_per_token_loss: bool = flag(False, "average the loss over all tokens of the global batch instead "
                                          "of per microbatch")
    seed: int = flag(1234, "random seed")
    log_interval: int = flag(1, "iterations between log lines")
    eval_interval: int = flag(1000, "iterations between validation runs")
    eval_iters: int = flag(10, "validation iterations per evaluation")
    eval_global_batch_size: Optional[int] = flag(None, "global batch size of validation (default: the training one)")
    exit_interval: Optional[int] = flag(None, "save and stop when the iteration is a multiple of this")
    exit_duration_in_mins: Optional[float] = flag(None, "save and stop after this many minutes")
    exit_signal_handler: bool = flag(False, "on SIGTERM/SIGINT finish the iteration, save and exit 0")
    deterministic_mode: bool = flag(False, "deterministic torch/cuBLAS/NCCL algorithms")
    check_for_nan_in_loss_and_grad: bool = flag(
        True, "train on past a non-finite loss or grad norm instead of stopping (checkpoints are still not "
        "saved from then on)", name="--no-check-for-nan-in-loss-and-grad", store_false=True)
    manual_gc: bool = flag(False, "disable Python's automatic garbage collector; collect every "
                           "--manual-gc-interval iterations instead")
    manual_gc_interval: int = flag(0, "iterations between collections with --manual-gc (0: only at start-up "
                                   "and around evaluations)")
    manual_gc_eval: bool = flag(True, "with --manual-gc, do not collect around evaluations",
                                name="--no-manual-gc-eval", store_false=True)
    empty_unused_memory_level: int = flag(0, "release cached GPU memory: 1 after each forward-backward, 2 also "
                                          "after each optimizer step", choices=[0, 1, 2])
    check_weight_hash_across_dp_replicas_interval: Optional[int] = flag(
        None, "every N iterations, check that every data-parallel replica holds the same weights")
    rerun_mode: str = flag("disabled", "result validation by re-running iterations (only disabled)",
                           choices=["disabled", "validate_results", "report_stats"])


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = flag(None, "write TensorBoard scalars here")
    tensorboard_log_interval: int = flag(1, "iterations between TensorBoard scalars")
    tensorboard_queue_size: int = flag(1000, "TensorBoard events queued before a flush")
    log_timers_to_tensorboard: bool = flag(False, "timers to TensorBoard")
    log_memory_to_tensorboard: bool = flag(False, "GPU memory statistics to TensorBoard")
    log_validation_ppl_to_tensorboard: bool = flag(False, "validation perplexity to TensorBoard")
    log_loss_scale_to_tensorboard: bool = flag(True, "no loss scale in TensorBoard",
                                               name="--no-log-loss-scale-to-tensorboard", store_false=True)
    log_params_norm: bool = flag(False, "the norm of all parameters in the log line")
    log_num_zeros_in_grad: bool = flag(False, "the number of zero gradient entries in the log line")
    log_throughput: bool = flag(False, "model TFLOP/s per GPU in the log line")
    timing_log_level: int = flag(0, "timers in the log: 0 iteration time only, 1 forward-backward, optimizer "
                                 "and the other parts of a step, 2 also finer ones", choices=[0, 1, 2])
    timing_log_option: str = flag("minmax", "timers over ranks: max, minmax or all", choices=["max", "minmax", "all"])
    wandb_project: Optional[str] = flag(None, "Weights & Biases project (off without it)")
    wandb_exp_name: Optional[str] = flag(None, "Weights & Biases run name")
    wandb_save_dir: Optional[str] = flag(None, "Weights & Biases local directory (default <save>/wandb)")
    wandb_entity: Optional[str] = flag(None, "Weights & Biases entity (team or user)")
    profile: bool = flag(False, "profile iterations --profile-step-start to --profile-step-end (torch.profiler "
                         "trace into --tensorboard-dir, and a CUDA profiler range for nsys)")
    profile_step_start: int = flag(10, "first profiled iteration")
    profile_step_end: int = flag(12, "iteration at which profiling stops")
    profile_ranks: List[int] = flag([0], "global ranks that profile", nargs="+")
    generate_interval: Optional[int] = flag(None, "every N iterations, generate from --generate-prompt and print the "
                                            "sample on rank 0 (--greedy, --temperature, ... as "
                                            "megatron_lite.tools.generate); training is unchanged by it")
    generate_prompt: Optional[str] = flag(None, "the prompt of the --generate-interval samples")


@dataclass
class DataConfig:
    data_path: List[str] = flag([], "[weight] prefix pairs, or one prefix", nargs="*")
    train_data_path: List[str] = flag([], "training data prefixes", nargs="*")
    valid_data_path: List[str] = flag([], "validation data prefixes", nargs="*")
    test_data_path: List[str] = flag([], "test data prefixes", nargs="*")
    split: str = flag("969,30,1", "train,valid,test proportions of --data-path")
    mock_data: bool = flag(False, "random tokens instead of a dataset")
    data_cache_path: Optional[str] = flag(None, "directory for the cached index files")
    mmap_bin_files: bool = flag(True, "read .bin files with reads instead of memory-mapping them",
                                name="--no-mmap-bin-files", store_false=True)
    create_attention_mask_in_dataloader: bool = flag(
        True, "make no attention mask in the data loader (with --reset-attention-mask, documents then see "
        "each other)", name="--no-create-attention-mask-in-dataloader", store_false=True)
    tokenizer_type: str = flag("ByteLevelTokenizer", "tokenizer", choices=list(TOKENIZER_TYPES))
    tokenizer_model: Optional[str] = flag(None, "Hugging Face tokenizer directory, SentencePiece .model or "
                                          "TikTokenizer .json")
    tiktoken_pattern: Optional[str] = flag(None, "TikTokenizer pre-split pattern", choices=["v1", "v2"])
    tiktoken_num_special_tokens: int = flag(1000, "TikTokenizer: ids reserved for special tokens")
    tokenizer_special_tokens: Optional[List[str]] = flag(None, "TikTokenizer special tokens (default <unk> <s> </s>)",
                                                         nargs="+")
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
    ckpt_format: str = flag("megatron_lite", "format of saved checkpoints: megatron_lite (checksummed, resharded "
                            "on load), torch (Megatron-LM legacy), torch_dist (Megatron-Core distributed)",
                            choices=["megatron_lite", "torch", "torch_dist", "torch_dcp", "fsdp_dtensor"])
    save_interval: Optional[int] = flag(None, "iterations between checkpoints")
    save_weights_only_interval: Optional[int] = flag(None, "iterations between weights-only checkpoints")
    ckpt_step: Optional[str] = flag(None, "load this iteration instead of the latest, or `best`: the one with the "
                                    "lowest validation loss (best_checkpointed_iteration.txt); `auto`: the latest "
                                    "intact, as without the flag")
    finetune: bool = flag(False, "load weights only; reset iteration, optimizer and scheduler")
    reset_sample_stat: bool = flag(False, "further-train: reset iteration and consumed samples, keep optimizer")
    pretrained_checkpoint: Optional[str] = flag(None, "load weights only from this directory")
    load_weights_from: Optional[str] = flag(None, "take the model weights from this checkpoint directory (weights-only "
                                            "or full, any format) and the training state from --load's")
    load_weights_from_step: Optional[str] = flag(None, "the iteration of --load-weights-from to take: a number, "
                                                 "`best`, or `auto` (the default: the latest intact)")
    load_optim: bool = flag(True, "do not load optimizer state", name="--no-load-optim", store_false=True)
    load_rng: bool = flag(True, "do not load RNG states", name="--no-load-rng", store_false=True)
    load_lr_scheduler: bool = flag(True, "start a fresh LR schedule", name="--no-load-lr-scheduler", store_false=True)
    save_optim: bool = flag(True, "do not save optimizer state", name="--no-save-optim", store_false=True)
    save_rng: bool = flag(True, "do not save RNG states", name="--no-save-rng", store_false=True)
    use_checkpoint_args: bool = flag(False, "take the model config from the checkpoint where the flags leave "
                                     "it unset")
    use_tokenizer_model_from_checkpoint_args: bool = flag(
        True, "with --use-checkpoint-args, keep this run's tokenizer flags",
        name="--no-use-tokenizer-model-from-checkpoint-args", store_false=True)
    keep_last_n_checkpoints: Optional[int] = flag(None, "delete older iterations after a newer one is complete")
    exit_on_missing_checkpoint: bool = flag(False, "stop if --load has no checkpoint")
    async_save: bool = flag(False, "write checkpoints in the background")
    use_persistent_ckpt_worker: bool = flag(False, "--async-save: keep the writer and its host buffers from one "
                                            "save to the next (default: released after each commit)")
    local_ckpt_interval: Optional[int] = flag(
        None, "iterations between in-memory snapshots of every rank's state (node-local, replicated to another "
        "rank; a crash loses at most this many iterations); persistent saves keep --save-interval",
        aliases=["--non-persistent-save-interval"])
    local_ckpt_dir: Optional[str] = flag(None, "where the in-memory snapshots live (default /dev/shm)",
                                         aliases=["--non-persistent-local-ckpt-dir"])
    non_persistent_ckpt_type: Optional[str] = flag(None, "local: --non-persistent-save-interval takes in-memory "
                                                   "snapshots (the only type here)",
                                                   choices=["global", "local", "in_memory"])
    replication_jump: Optional[int] = flag(None, "a snapshot's replica goes this many ranks further on (default: "
                                           "the ranks of a node, so to the next node)")
    replication_factor: int = flag(2, "copies of each snapshot (2: the rank's own and one replica)")


@dataclass
class InferenceConfig:
    """Sampling for megatron_lite.tools.generate and the --generate-interval samples; the sampling RNG is
    seeded with --seed and is its own, so sampling never moves training's random stream."""
    max_new_tokens: int = flag(30, "tokens to generate after the prompt", aliases=["--num-tokens-to-generate"])
    greedy: bool = flag(False, "take the most likely token at every step (argmax) instead of sampling")
    temperature: float = flag(1.0, "sampling: divide the logits by this (> 0)")
    top_k: int = flag(0, "sampling: only among the k most likely tokens (0: all)", aliases=["--top_k"])
    top_p: float = flag(0.0, "sampling: only among the most likely tokens whose probabilities add up to p "
                        "(nucleus; 0 or 1: all)", aliases=["--top_p"])


@dataclass
class RunConfig:
    """The whole tree. `arguments.parse_args` builds it; `validate` checks it once.

    `explicit` holds "section.field" for every value the command line or the YAML file set
    (--use-checkpoint-args fills only the others)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    explicit: set = field(default_factory=set, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Rebuild from `to_dict()` output; keys this version does not know are dropped, and a
        field a section of an older version held moves to the section that holds it now."""
        home = {f.name: name for name, sub_cls in SECTIONS.items() for f in dataclasses.fields(sub_cls)}
        values = {name: {} for name in SECTIONS}
        for section in d.values():
            for key, value in (section.items() if isinstance(section, dict) else ()):
                if key in home:
                    values[home[key]][key] = value
        for name in SECTIONS:   # a field's own section wins over an older version's
            values[name].update({k: v for k, v in d.get(name, {}).items() if home.get(k) == name})
        return cls(**{name: SECTIONS[name](**values[name]) for name in SECTIONS})


SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "optimizer": OptimizerConfig,
            "train": TrainConfig, "logging": LoggingConfig, "data": DataConfig, "checkpoint": CheckpointConfig,
            "inference": InferenceConfig}
