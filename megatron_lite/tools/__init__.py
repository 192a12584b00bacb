"""The command-line tools, each a module with `main(argv=None) -> int`, run as `python -m megatron_lite.tools.NAME`
or by its console script: convert (checkpoint conversion between Hugging Face, megatron_lite and Megatron-LM at
any TP/PP; megatron-lite-convert), inspect_checkpoint (what a checkpoint holds and whether it is intact;
megatron-lite-inspect-checkpoint), compare_logs (two training logs lined up by iteration;
megatron-lite-compare-logs), generate (sampling from a checkpoint with a KV cache; megatron-lite-generate) and
preprocess_data (a JSON-lines corpus tokenized into Megatron .bin/.idx files; megatron-lite-preprocess-data).
The scripts under the repository's tools/ directory are thin wrappers that run these modules.
"""
