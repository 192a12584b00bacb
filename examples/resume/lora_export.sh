#!/usr/bin/env bash
# Export lora.sh's newest adapters (LORA_CKPT) for Hugging Face users:
#   $LORA_EXPORT/peft     adapter_model.safetensors + adapter_config.json, which
#                         peft.PeftModel.from_pretrained loads onto the base model's HF export
#   $LORA_EXPORT/base_hf  that base model (pretrain.sh's newest checkpoint) in HF's format
#   $LORA_EXPORT/merged   the base with the adapters merged in (W + alpha/r * B A): a plain HF model
# and print a greedy sample of the LoRA model from its adapter checkpoint (megatron_lite.tools.generate
# loads the base it names).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PYTHON=${PYTHON:-python}
LORA_EXPORT=${LORA_EXPORT:-$RUNS_DIR/lora_export}
CONVERT=("$PYTHON" -m megatron_lite.tools.convert)

"${CONVERT[@]}" --loader megatron_lite --saver peft --load-dir "$LORA_CKPT" --save-dir "$LORA_EXPORT/peft"
"${CONVERT[@]}" --loader megatron_lite --saver hf --load-dir "$PRETRAIN_CKPT" --save-dir "$LORA_EXPORT/base_hf"
"${CONVERT[@]}" --loader megatron_lite --saver hf --merge-lora --load-dir "$LORA_CKPT" \
  --save-dir "$LORA_EXPORT/merged"
"$PYTHON" -m megatron_lite.tools.generate --load "$LORA_CKPT" --prompt "${PROMPT:-The checkpoint}" \
  --greedy --max-new-tokens "${MAX_NEW_TOKENS:-24}"
