"""Megatron-LM flags of features megatron_lite does not have, and the few it accepts without effect.

The parser knows these flags so that a Megatron-LM launch script that uses one stops with one
line naming the feature (`parse_args` raises), instead of argparse's "unrecognized arguments".
Values are taken and dropped (any number of them), since the run stops anyway. Flags that
megatron_lite has but only for some values (`--context-parallel-size 1`, `--ckpt-format torch`)
are config fields, checked in validation.py.
"""

from __future__ import annotations

from typing import Dict, List

UNSUPPORTED_FEATURES: Dict[str, List[str]] = {
    "mixture-of-experts layers": [
        "--num-experts", "--expert-tensor-parallel-size", "--moe-ffn-hidden-size", "--moe-router-topk",
        "--moe-router-load-balancing-type", "--moe-router-dtype", "--moe-router-score-function",
        "--moe-router-pre-softmax", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
        "--moe-router-topk-scaling-factor", "--moe-token-dispatcher-type", "--moe-grouped-gemm",
        "--moe-aux-loss-coeff", "--moe-z-loss-coeff", "--moe-input-jitter-eps", "--moe-layer-freq",
        "--moe-shared-expert-intermediate-size", "--moe-shared-expert-gate", "--moe-shared-expert-overlap",
        "--moe-permute-fusion", "--moe-expert-capacity-factor", "--moe-pad-expert-input-to-capacity",
        "--moe-token-drop-policy", "--moe-layer-recompute", "--moe-extended-tp", "--moe-use-upcycling",
    ],
    "multi-latent attention": [
        "--multi-latent-attention", "--q-lora-rank", "--kv-lora-rank", "--qk-head-dim", "--qk-pos-emb-head-dim",
        "--v-head-dim", "--rotary-scaling-factor", "--mscale", "--mscale-all-dim",
    ],
    "DeepSeek sparse attention": [
        "--dsa-indexer-topk", "--dsa-indexer-n-heads", "--dsa-indexer-loss-coeff", "--dsa-indexer-head-dim",
    ],
    "linear (gated delta net) attention": [
        "--experimental-attention-variant", "--linear-attention-freq", "--linear-conv-kernel-dim",
        "--linear-key-head-dim", "--linear-value-head-dim", "--linear-num-key-heads", "--linear-num-value-heads",
        "--attention-output-gate", "--apply-wd-to-qk-layernorm",
    ],
    "the interleaved pipeline schedule": [
        "--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank",
        "--microbatch-group-size-per-virtual-pipeline-stage", "--overlap-p2p-communication-warmup-flush",
        "--overlap-param-gather-with-optimizer-step", "--account-for-embedding-in-pipeline-split",
        "--account-for-loss-in-pipeline-split",
    ],
    "uneven pipeline stages": ["--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"],
    "context parallelism": ["--cp-comm-type", "--hierarchical-context-parallel-sizes"],
    "FSDP": [
        "--use-torch-fsdp2", "--use-megatron-fsdp", "--data-parallel-sharding-strategy",
        "--megatron-fsdp-main-params-dtype", "--megatron-fsdp-main-grads-dtype", "--megatron-fsdp-grad-comm-dtype",
    ],
    "FP8 parameters and high-precision FP8 weight gradients": ["--fp8-param-gather", "--fp8-wgrad"],
    "tensor-parallel communication overlap": ["--tp-comm-overlap", "--tp-comm-overlap-cfg"],
    "deferred embedding weight gradients": ["--defer-embedding-wgrad-compute", "--wgrad-deferral-limit"],
    "CUDA graphs": ["--cuda-graph-impl", "--enable-cuda-graph", "--external-cuda-graph", "--decode-only-cuda-graphs"],
    "fault injection (the rerun state machine)": ["--error-injection-rate", "--error-injection-type"],
    "muP parametrization": ["--use-mup", "--mup-base-hidden-size"],
    "fill-in-the-middle datasets": ["--fim-data", "--fim-rate", "--fim-spm-rate"],
    "ModelOpt export and distillation": ["--export-te-mcore-model", "--export-kd-teacher-load", "--export-kd-cfg"],
    "real-time test mode": ["--test-mode"],
    "straggler detection": ["--straggler-minmax-count", "--log-straggler"],
    "the Transformer Engine RNG tracker": ["--te-rng-tracker", "--inference-rng-tracker"],
    "progress.txt logging": ["--log-progress"],
    "Megatron-LM's legacy (pre-Megatron-Core) model classes": ["--use-legacy-models"],
    "distributed checkpointing (torch_dist) options": [
        "--dist-ckpt-strictness", "--dist-ckpt-optim-fully-reshardable", "--ckpt-fully-parallel-load",
        "--ckpt-fully-parallel-save", "--no-ckpt-fully-parallel-save", "--ckpt-assume-constant-structure",
        "--async-strategy", "--async-ckpt-use-cpu-shm", "--verify-integrity", "--auto-detect-ckpt-format",
        "--save-retain-interval", "--use-mp-args-from-checkpoint-args",
    ],
    "Megatron-Core's inference engines (megatron_lite generates with megatron_lite.tools.generate)": [
        "--inference-max-seq-length", "--inference-max-requests", "--inference-max-batch-size",
        "--inference-logging-step-interval", "--inference-ckpt-non-strict", "--inference-repeat-n",
        "--inference-fuse-tp-communication", "--inference-dynamic-batching-buffer-size-gb",
        "--inference-dynamic-batching-max-tokens", "--inference-dynamic-batching-max-requests",
        "--inference-dynamic-batching-num-cuda-graphs", "--inference-dynamic-batching-prefix-caching",
        "--inference-dynamic-batching-prefix-caching-coordinator-policy",
        "--inference-dynamic-batching-prefix-caching-eviction-policy",
        "--inference-dynamic-batching-unified-memory-level", "--inference-dynamic-batching-sampling-backend",
        "--inference-dynamic-batching-cuda-graph-sizing-distribution",
        "--inference-dynamic-batching-async-sched-mode", "--prompts", "--prompt-file", "--prompt-file-num-truncate",
        "--top-n-logprobs", "--return-log-probs",
        "--output-path", "--output-every-n-results", "--incoming-requests-per-sec", "--incoming-requests-per-step",
        "--max-tokens-to-oom", "--termination-id", "--stop-words", "--flash-decode", "--enable-chunked-prefill",
        "--use-legacy-static-engine", "--use-coordinator", "--use-flashinfer-fused-rope", "--async-mode",
        "--start_step",
    ],
    "reinforcement learning (GRPO)": [
        "--perform-rl-step", "--langrl-env-config", "--refit-method", "--grpo-prompts-per-step", "--grpo-group-size",
        "--grpo-iterations", "--grpo-kl-beta", "--grpo-entropy-term-weight", "--grpo-clamp-eps-lower",
        "--grpo-clamp-eps-upper", "--rl-use-sequence-packing", "--rl-sequence-packing-algo", "--rl-partial-rollouts",
        "--rl-offload-optimizer-during-inference", "--rl-generation-lag", "--rl-inference-tensor-model-parallel-size",
        "--rl-inference-pipeline-model-parallel-size", "--rl-submission-granularity", "--rl-consumption-granularity",
        "--rl-training-cuda-graphs",
    ],
}

# flag -> the feature it belongs to
UNSUPPORTED: Dict[str, str] = {f: feature for feature, flags in UNSUPPORTED_FEATURES.items() for f in flags}

# Flags accepted without effect, each with the reason it needs none (Megatron-LM ignores
# --use-mcore-models itself).
WITHOUT_EFFECT: Dict[str, str] = {
    "--use-mcore-models": "megatron_lite has one model, with Megatron-Core's layout",
    "--disable-gloo-process-groups": "megatron_lite's only gloo side group is the one --local-ckpt-interval "
                                     "replicates its snapshots over, which needs it",
    "--replication": "--local-ckpt-interval's snapshots are always replicated (to --replication-jump ranks on)",
    "--non-persistent-local-ckpt-algo": "every rank writes and commits its own snapshot, whichever is asked",
    "--fp8-interval": "deprecated in Megatron-LM (Transformer Engine ignores it since 1.8): scales update every step",
}


def refusal(flags: List[str]) -> str:
    """One line for every unsupported flag given, grouped by feature, naming the fix."""
    by_feature: Dict[str, List[str]] = {}
    for f in flags:
        by_feature.setdefault(UNSUPPORTED[f], []).append(f)
    parts = [f"{' '.join(fs)} ({feature})" for feature, fs in by_feature.items()]
    return "not supported by megatron_lite: " + "; ".join(parts) + "; remove " + (
        "this flag" if len(flags) == 1 else "these flags")
