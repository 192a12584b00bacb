"""`validate`: the combinations of flags that cannot work, checked once before any process group
exists, and the derived defaults, filled as Megatron-LM's `validate_args` fills them.

It may run twice (again after --use-checkpoint-args filled fields from a checkpoint), so it
only fills what is still unset and its warnings are printed once.
"""

from __future__ import annotations

import os
import re
from typing import List

from megatron_lite.checkpoint.io.layout import is_iteration_number
from megatron_lite.config import SELECTIVE_RECOMPUTE_MODULES, RunConfig, default_ffn_hidden_size

_printed_warnings = set()


def warn_once(message: str) -> None:
    """Megatron's `warn_rank_0`: a WARNING line on rank 0, once per process."""
    if message in _printed_warnings or int(os.environ.get("RANK", "0")) != 0:
        return
    _printed_warnings.add(message)
    print(f"WARNING: {message}", flush=True)


def _error(message: str):
    from megatron_lite.arguments import ConfigError
    return ConfigError(message)


def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: round up to a multiple of make_vocab_size_divisible_by * TP."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def parse_split(split: str) -> List[float]:
    """--split's numbers, found as Megatron-LM finds them (re.findall(r"[.0-9]+")), so that
    '99,1,0', "'99,1,0'" and '99/1/0' are the same split."""
    shares = [float(x) for x in re.findall(r"[.0-9]+", split)]
    if not 1 <= len(shares) <= 3 or sum(shares) <= 0:
        raise _error(f"--split {split!r} must be up to three non-negative numbers with a positive sum, "
                     f"e.g. 969,30,1")
    return shares + [0.0] * (3 - len(shares))


def _check_parallel(cfg: RunConfig, world_size: int) -> int:
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise _error("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    for name, value, feature in (("--context-parallel-size", p.context_parallel_size, "context parallelism"),
                                 ("--expert-model-parallel-size", p.expert_model_parallel_size,
                                  "expert parallelism (mixture-of-experts layers)"),
                                 ("--num-distributed-optimizer-instances", p.num_distributed_optimizer_instances,
                                  "more than one distributed-optimizer instance")):
        if value != 1:
            raise _error(f"{name} {value}: {feature} is not supported by megatron_lite; use {name} 1 (the default)")
    if world_size % (tp * pp):
        raise _error(f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}; "
                     f"launch a multiple of {tp * pp} processes or change the parallel sizes")
    if m.num_attention_heads % tp:
        raise _error(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                     f"--tensor-model-parallel-size {tp}; pick a TP size that divides the heads")
    if m.group_query_attention:
        if not m.num_query_groups:
            raise _error("--group-query-attention needs --num-query-groups")
        if m.num_attention_heads % m.num_query_groups:
            raise _error(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                         f"--num-query-groups {m.num_query_groups}")
    if m.query_groups % tp:
        raise _error(f"--num-query-groups {m.query_groups} is not divisible by "
                     f"--tensor-model-parallel-size {tp}; pick a TP size that divides the query groups")
    if m.num_layers % pp:
        raise _error(f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size "
                     f"{pp}; pick a PP size that divides the layers")
    if tp == 1 and p.sequence_parallel:
        warn_once("Disabling sequence parallelism because tensor model parallelism is disabled")
        p.sequence_parallel = False
    if p.overlap_param_gather:
        if not p.use_distributed_optimizer:
            raise _error("--overlap-param-gather only supported with distributed optimizer; add "
                         "--use-distributed-optimizer")
        if not p.overlap_grad_reduce:
            raise _error("Must use --overlap-param-gather with --overlap-grad-reduce")
    return world_size // (tp * pp)


def _check_model(cfg: RunConfig) -> None:
    m = cfg.model
    if m.use_rotary_position_embeddings:
        m.position_embedding_type = "rope"
    if not m.add_position_embedding and m.position_embedding_type != "rope":
        raise _error("--no-position-embedding is deprecated, use --position-embedding-type (none or rope)")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise _error(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                     f"{m.num_attention_heads}; set --kv-channels or change the sizes")
    if m.position_embedding_type == "rope" and (m.head_dim * m.rotary_percent) % 2:
        raise _error("the rotated part of the head dimension must be even; change --rotary-percent")
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.position_embedding_type == "learned_absolute" and m.seq_length > m.max_position_embeddings:
        raise _error(f"--seq-length {m.seq_length} exceeds --max-position-embeddings {m.max_position_embeddings}")
    if m.swiglu and m.squared_relu:
        raise _error("--swiglu and --squared-relu are two activations; pick one")
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = default_ffn_hidden_size(m.hidden_size, m.swiglu)
        if m.ffn_hidden_size == 0:
            raise _error(f"--swiglu at --hidden-size {m.hidden_size} gives an MLP of int((4 * {m.hidden_size} * 2 / 3) "
                         f"/ 64) * 64 = 0 features; set --ffn-hidden-size")
    tp = cfg.parallel.tensor_model_parallel_size
    if m.ffn_hidden_size % tp:
        raise _error(f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by TP {tp}")
    if not m.add_bias_linear:
        m.bias_gelu_fusion = False   # Megatron: no bias, no bias-GeLU fusion (so the exact GeLU)
    if m.apply_query_key_layer_scaling:
        m.attention_softmax_in_fp32 = True
    if m.use_flash_attn:
        if m.attention_backend not in ("auto", "flash"):
            raise _error(f"--use-flash-attn contradicts --attention-backend {m.attention_backend}; drop one")
        m.attention_backend = "flash"
    if m.cross_entropy_loss_fusion and m.cross_entropy_fusion_impl == "te":
        raise _error("Transformer Engine cross entropy loss fusion is disabled due to stability issues. "
                     "Use --cross-entropy-fusion-impl native, or omit --cross-entropy-loss-fusion.")
    _check_recompute(cfg)
    _check_lora(cfg)
    _check_fp8(cfg)


def _check_fp8(cfg: RunConfig) -> None:
    """--fp8-format: the recipes megatron_lite has, and GEMM sizes torch._scaled_mm takes."""
    m = cfg.model
    if not m.fp8:
        return
    if m.fp8_recipe in ("mxfp8", "blockwise"):
        raise _error(f"--fp8-recipe {m.fp8_recipe} is Transformer Engine's (block-scaled FP8, mxfp8 on Blackwell "
                     f"GPUs); megatron_lite has --fp8-recipe tensorwise and delayed")
    if m.fp8_amax_history_len < 1:
        raise _error(f"--fp8-amax-history-len {m.fp8_amax_history_len}: give at least 1 step of history")
    if m.fp8_margin < 0:
        raise _error(f"--fp8-margin {m.fp8_margin}: give a margin of 0 or more (scales are divided by 2^margin)")
    if m.first_last_layers_bf16:
        start, end = m.num_layers_at_start_in_bf16, m.num_layers_at_end_in_bf16
        if start < 0 or end < 0 or start + end >= m.num_layers:
            raise _error(f"--num-layers-at-start-in-bf16 {start} and --num-layers-at-end-in-bf16 {end} leave no FP8 "
                         f"layer of --num-layers {m.num_layers}; keep fewer layers in high precision")
    tp, t = cfg.parallel.tensor_model_parallel_size, cfg.train
    fc1 = (2 if m.swiglu else 1) * m.ffn_hidden_size
    sizes = {"--hidden-size": m.hidden_size, "--ffn-hidden-size / TP": m.ffn_hidden_size // tp,
             "fc1 outputs / TP": fc1 // tp,
             "QKV outputs / TP": (m.num_attention_heads + 2 * m.query_groups) * m.head_dim // tp,
             "attention heads x --kv-channels / TP": m.num_attention_heads * m.head_dim // tp,
             "--seq-length x --micro-batch-size": m.seq_length * t.micro_batch_size}
    if cfg.parallel.sequence_parallel:
        sizes["--seq-length x --micro-batch-size / TP (sequence parallelism)"] = m.seq_length * t.micro_batch_size // tp
    for what, size in sizes.items():
        if size % 16:
            raise _error(f"--fp8-format: FP8 GEMMs need sizes that are multiples of 16, but {what} is {size}; "
                         f"change the model or batch shape")


def _check_lora(cfg: RunConfig) -> None:
    m = cfg.model
    if m.lora_rank < 0:
        raise _error(f"--lora-rank {m.lora_rank}: give a positive rank (0 turns LoRA off)")
    if not m.lora_rank:
        return
    if not 0.0 <= m.lora_dropout < 1.0:
        raise _error(f"--lora-dropout {m.lora_dropout}: give a probability in [0, 1)")
    if not m.lora_target_modules:
        raise _error("--lora-target-modules: name at least one of linear_qkv, linear_proj, linear_fc1, linear_fc2")
    if cfg.checkpoint.ckpt_format != "megatron_lite":
        raise _error(f"--lora-rank: adapter-only checkpoints are megatron_lite's; save with --ckpt-format "
                     f"megatron_lite (not {cfg.checkpoint.ckpt_format}) and export them with "
                     f"`python -m megatron_lite.tools.convert --saver peft`")


def _check_recompute(cfg: RunConfig) -> None:
    m = cfg.model
    if m.recompute_activations:   # Megatron: --recompute-activations is selective recomputation
        if m.recompute_granularity == "full":
            raise _error("--recompute-activations is --recompute-granularity selective; it does not combine "
                         "with --recompute-granularity full (drop one of them)")
        m.recompute_granularity = "selective"
    if m.recompute_modules and m.recompute_granularity != "selective":
        raise _error("--recompute-modules needs --recompute-granularity selective")
    if m.recompute_granularity == "full":
        per_stage = m.num_layers // cfg.parallel.pipeline_model_parallel_size
        if m.recompute_method is None:
            raise _error('Using recompute_granularity: full so recompute_method must be "block" or "uniform"; '
                         'add --recompute-method uniform --recompute-num-layers 1 to recompute every layer')
        if m.recompute_num_layers is None or not 1 <= m.recompute_num_layers <= per_stage:
            raise _error(f"--recompute-granularity full needs --recompute-num-layers between 1 and the "
                         f"{per_stage} layers of a pipeline stage")
    elif m.recompute_method is not None or m.recompute_num_layers is not None:
        raise _error("--recompute-method and --recompute-num-layers apply to --recompute-granularity full")
    if m.recompute_granularity == "selective":
        if not m.recompute_modules:
            m.recompute_modules = ["core_attn"]
        unknown = sorted(set(m.recompute_modules) - set(SELECTIVE_RECOMPUTE_MODULES))
        if unknown:
            raise _error(f"--recompute-modules takes {' '.join(SELECTIVE_RECOMPUTE_MODULES)}, not "
                         f"{' '.join(unknown)}")


def _check_batch(cfg: RunConfig, dp: int) -> None:
    t = cfg.train
    if t.micro_batch_size < 1:
        raise _error("--micro-batch-size must be positive")
    if t.rampup_batch_size is not None and t.step_batch_size_schedule is not None:
        raise _error("--rampup-batch-size and --step-batch-size-schedule are two batch-size schedules; pick one")
    if t.step_batch_size_schedule is not None and "train.global_batch_size" in cfg.explicit:
        raise _error("Cannot specify both --step-batch-size-schedule and --global-batch-size")
    if t.step_batch_size_schedule is not None:
        from megatron_lite.microbatches import parse_step_schedule
        try:
            t.global_batch_size = parse_step_schedule(t.step_batch_size_schedule, cfg.model.seq_length)[-1][1]
        except ValueError as e:
            raise _error(str(e)) from e
    if t.calculate_per_token_loss and cfg.parallel.ddp_average_in_collective:
        raise _error("Cannot average in collective when calculating per-token loss: drop --ddp-average-in-collective "
                     "or --calculate-per-token-loss")
    if t.rampup_batch_size is not None and t.train_iters is not None:
        raise _error("expected no batch-size rampup for iteration-based training: --rampup-batch-size needs "
                     "--train-samples instead of --train-iters")
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise _error(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                     f"{t.micro_batch_size} x data-parallel size {dp}; change one of them")
    if t.eval_global_batch_size is not None and t.eval_global_batch_size % (t.micro_batch_size * dp):
        raise _error(f"--eval-global-batch-size {t.eval_global_batch_size} is not divisible by --micro-batch-size "
                     f"{t.micro_batch_size} x data-parallel size {dp}; change one of them")
    if t.train_iters is not None and t.train_samples is not None:
        raise _error("give --train-iters or --train-samples, not both")
    if t.train_iters is None and t.train_samples is None:
        raise _error("give --train-iters N (or --train-samples N)")
    if t.manual_gc_interval < 0:
        raise _error("--manual-gc-interval must be >= 0")
    if t.check_weight_hash_across_dp_replicas_interval is not None and \
            t.check_weight_hash_across_dp_replicas_interval <= 0:
        raise _error("--check-weight-hash-across-dp-replicas-interval must be positive")
    if t.rerun_mode != "disabled":
        raise _error(f"--rerun-mode {t.rerun_mode}: the rerun state machine (re-running an iteration to validate "
                     f"its result) is not supported by megatron_lite; use --rerun-mode disabled")


def _check_optimizer(cfg: RunConfig) -> None:
    o = cfg.optimizer
    if o.bf16 and o.fp16:
        raise _error("--bf16 and --fp16 are exclusive; pick one")
    if (o.exp_avg_dtype, o.exp_avg_sq_dtype) != ("fp32", "fp32"):
        if not o.use_precision_aware_optimizer:
            raise _error("--exp-avg-dtype / --exp-avg-sq-dtype other than fp32 need --use-precision-aware-optimizer")
        if o.optimizer != "adam":
            raise _error(f"--exp-avg-dtype / --exp-avg-sq-dtype apply to --optimizer adam, not {o.optimizer}")
    if o.main_grads_dtype != "fp32":
        if not o.use_precision_aware_optimizer:
            raise _error("--main-grads-dtype bf16 needs --use-precision-aware-optimizer")
        if not o.bf16:
            raise _error("--main-grads-dtype bf16 applies to --bf16 training (the gradients are the bf16 "
                         "weights' own dtype); add --bf16 or drop the flag")
        if o.optimizer != "adam":
            raise _error(f"--main-grads-dtype bf16 applies to --optimizer adam, not {o.optimizer}")
    if o.grad_reduce_in_bf16 and not o.bf16:
        raise _error("--grad-reduce-in-bf16 applies to --bf16 training; add --bf16 or drop the flag")
    if o.bf16:
        if o.accumulate_allreduce_grads_in_fp32 and (o.main_grads_dtype != "fp32" or o.grad_reduce_in_bf16):
            raise _error("--accumulate-allreduce-grads-in-fp32 contradicts --main-grads-dtype bf16 / "
                         "--grad-reduce-in-bf16; drop one")
        if not o.grad_reduce_in_bf16 and o.main_grads_dtype == "fp32":
            o.accumulate_allreduce_grads_in_fp32 = True   # Megatron: bf16 accumulates in fp32
    if o.decoupled_min_lr is not None and o.decoupled_lr is None:
        raise _error("--decoupled-min-lr needs --decoupled-lr")


def _check_data(cfg: RunConfig) -> None:
    d = cfg.data
    parse_split(d.split)
    needs_model = {"HuggingFaceTokenizer": "a local directory written by save_pretrained()",
                   "TikTokenizer": "a tiktoken vocabulary .json", "GPTSentencePieceTokenizer": "a SentencePiece .model",
                   "Llama2Tokenizer": "a SentencePiece .model"}
    if d.tokenizer_type in needs_model and not d.tokenizer_model:
        raise _error(f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model ({needs_model[d.tokenizer_type]})")
    if d.tokenizer_type == "GPT2BPETokenizer" and not (d.vocab_file and d.merge_file):
        raise _error("--tokenizer-type GPT2BPETokenizer needs --vocab-file (vocab.json) and --merge-file (merges.txt)")
    if d.tokenizer_type == "NullTokenizer" and cfg.model.vocab_size is None:
        raise _error("--tokenizer-type NullTokenizer needs --vocab-size (the number of ids before the eod token)")
    if d.tiktoken_pattern is not None and d.tokenizer_type != "TikTokenizer":
        warn_once(f"--tiktoken-pattern applies to --tokenizer-type TikTokenizer; it has no effect with "
                  f"{d.tokenizer_type}")
    if d.tokenizer_type == "TikTokenizer":
        _check_tiktoken_special_tokens(d, cfg.model.vocab_size)


def _check_tiktoken_special_tokens(d, vocab_size) -> None:
    """Megatron's TikTokenizer rules: unique special tokens that include <unk> <s> </s>, no more of
    them than --tiktoken-num-special-tokens, which must be below the vocabulary size (default 2**17)."""
    from megatron_lite.data.tokenizers import TIKTOKEN_DEFAULT_VOCAB_SIZE, TIKTOKEN_REQUIRED_SPECIAL_TOKENS
    special = d.tokenizer_special_tokens or list(TIKTOKEN_REQUIRED_SPECIAL_TOKENS)
    vocab_size = vocab_size or TIKTOKEN_DEFAULT_VOCAB_SIZE
    if len(set(special)) != len(special):
        raise _error(f"--tokenizer-special-tokens {' '.join(special)} repeats a token; list each once")
    missing = [t for t in TIKTOKEN_REQUIRED_SPECIAL_TOKENS if t not in special]
    if missing:
        raise _error(f"--tokenizer-special-tokens must include <unk> <s> </s> for TikTokenizer; "
                     f"add {' '.join(missing)}")
    if not len(special) <= d.tiktoken_num_special_tokens < vocab_size:
        raise _error(f"--tiktoken-num-special-tokens {d.tiktoken_num_special_tokens} must be at least the "
                     f"{len(special)} special tokens and below the vocabulary size {vocab_size} (--vocab-size)")


def _check_checkpoint(cfg: RunConfig) -> None:
    c = cfg.checkpoint
    for name, step in (("--ckpt-step", c.ckpt_step), ("--load-weights-from-step", c.load_weights_from_step)):
        if step is not None and not (is_iteration_number(str(step)) or step in ("best", "auto")):
            raise _error(f"{name} {step}: give an iteration number, `best` or `auto` (the latest intact)")
    if c.ckpt_format not in ("megatron_lite", "torch", "torch_dist"):
        raise _error(f"--ckpt-format {c.ckpt_format}: megatron_lite writes megatron_lite, torch (Megatron-LM legacy) "
                     f"and torch_dist checkpoints; pick one of those")
    if c.ckpt_format != "megatron_lite" and c.async_save:
        raise _error(f"--async-save writes megatron_lite checkpoints only; drop it or use --ckpt-format megatron_lite "
                     f"(not {c.ckpt_format})")
    if c.ckpt_format != "megatron_lite" and c.save_weights_only_interval:
        raise _error(f"--save-weights-only-interval writes megatron_lite checkpoints only; drop it or use "
                     f"--ckpt-format megatron_lite (not {c.ckpt_format})")
    if c.finetune and c.reset_sample_stat:
        raise _error("--finetune and --reset-sample-stat are different modes; pick one")
    if c.finetune and not c.load and not c.pretrained_checkpoint:
        raise _error("--finetune needs --load DIR (the checkpoint to start from)")
    _check_load_weights_from(cfg)
    if c.save_interval is not None and c.save_interval <= 0:
        raise _error("--save-interval must be positive")
    if (c.save_interval or c.save_weights_only_interval) and not c.save:
        raise _error("--save-interval needs --save DIR")
    _check_local_checkpoints(cfg)


def _check_local_checkpoints(cfg: RunConfig) -> None:
    c = cfg.checkpoint
    if c.non_persistent_ckpt_type in ("global", "in_memory"):
        raise _error(f"--non-persistent-ckpt-type {c.non_persistent_ckpt_type}: megatron_lite's non-persistent "
                     f"checkpoints are node-local snapshots; use --non-persistent-ckpt-type local (or "
                     f"--local-ckpt-interval N)")
    if c.non_persistent_ckpt_type == "local" and not c.local_ckpt_interval:
        raise _error("--non-persistent-ckpt-type local needs --non-persistent-save-interval N "
                     "(or --local-ckpt-interval N)")
    if c.local_ckpt_interval is not None and c.local_ckpt_interval <= 0:
        raise _error(f"--local-ckpt-interval {c.local_ckpt_interval}: give a positive number of iterations")
    if not c.local_ckpt_interval:
        if c.replication_jump:
            warn_once("--replication-jump has no effect without --local-ckpt-interval")
        return
    if not c.save:
        raise _error("--local-ckpt-interval needs --save DIR: the snapshots belong to the run that saves there")
    if cfg.model.lora_rank:
        raise _error("--local-ckpt-interval does not snapshot LoRA runs yet; drop it (adapter checkpoints are "
                     "small: use a short --save-interval)")
    if c.replication_factor != 2:
        raise _error(f"--replication-factor {c.replication_factor}: megatron_lite keeps each snapshot twice "
                     f"(the rank's own and one replica); pass 2 or drop it")
    if c.replication_jump is not None and c.replication_jump <= 0:
        raise _error(f"--replication-jump {c.replication_jump}: give a positive number of ranks")


def _check_load_weights_from(cfg: RunConfig) -> None:
    """--load-weights-from replaces the weights of a resume (or further-train) from --load; the other
    ways to take weights from a directory are the modes that start without --load's training state."""
    c = cfg.checkpoint
    if c.load_weights_from_step is not None and not c.load_weights_from:
        raise _error("--load-weights-from-step needs --load-weights-from DIR (the directory it picks an iteration of)")
    if not c.load_weights_from:
        return
    if not c.load:
        raise _error("--load-weights-from needs --load DIR (the checkpoint whose optimizer, LR schedule, iteration "
                     "and RNG go with the weights); for the weights alone use --pretrained-checkpoint")
    if c.finetune:
        raise _error("--load-weights-from keeps --load's training state, which --finetune resets; to finetune those "
                     "weights pass their directory as --load (or --pretrained-checkpoint) instead")
    if c.pretrained_checkpoint:
        raise _error("--load-weights-from and --pretrained-checkpoint both name where the weights come from; pick one "
                     "(--load-weights-from: with --load's training state; --pretrained-checkpoint: fresh)")
    if cfg.model.lora_rank:
        raise _error("--load-weights-from with --lora-rank: a LoRA run's frozen base comes from --pretrained-checkpoint "
                     "or --load; drop --load-weights-from")
    if c.save and c.ckpt_format != "megatron_lite":
        raise _error(f"--load-weights-from: only megatron_lite checkpoints record which weights they were trained "
                     f"from, so that a restart does not take them again; save with --ckpt-format megatron_lite "
                     f"(not {c.ckpt_format})")


def _check_logging(cfg: RunConfig) -> None:
    g = cfg.logging
    if g.profile and g.profile_step_end <= g.profile_step_start:
        raise _error(f"--profile-step-end {g.profile_step_end} must be after --profile-step-start "
                     f"{g.profile_step_start}")
    if g.tensorboard_log_interval < 1:
        raise _error("--tensorboard-log-interval must be positive")
    if g.wandb_project and not g.wandb_exp_name:
        raise _error("--wandb-project needs --wandb-exp-name NAME (the W&B run name)")


def _check_inference(cfg: RunConfig) -> None:
    i, g = cfg.inference, cfg.logging
    if i.max_new_tokens < 1:
        raise _error(f"--max-new-tokens {i.max_new_tokens} must be at least 1")
    if i.temperature <= 0:
        raise _error(f"--temperature {i.temperature} must be positive; use --greedy for the most likely token")
    if i.top_k < 0:
        raise _error(f"--top-k {i.top_k} must be >= 0 (0: no top-k filtering)")
    if not 0.0 <= i.top_p <= 1.0:
        raise _error(f"--top-p {i.top_p} must be between 0 and 1 (0 or 1: no nucleus filtering)")
    sampling = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_k", "top_p")
                if f"inference.{name}" in cfg.explicit]
    if i.greedy and sampling:
        raise _error(f"--greedy takes the most likely token, {' and '.join(sampling)} shape sampling; drop one")
    if g.generate_interval is not None and g.generate_interval <= 0:
        raise _error("--generate-interval must be positive")
    if (g.generate_interval is None) != (g.generate_prompt is None):
        raise _error("--generate-interval N and --generate-prompt TEXT go together: give both or neither")


def validate(cfg: RunConfig, world_size: int) -> RunConfig:
    """Check combinations once, before any process group is made; fill derived defaults."""
    dp = _check_parallel(cfg, world_size)
    _check_model(cfg)
    _check_batch(cfg, dp)
    _check_optimizer(cfg)
    _check_data(cfg)
    _check_checkpoint(cfg)
    _check_logging(cfg)
    _check_inference(cfg)
    return cfg
