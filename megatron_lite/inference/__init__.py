"""Generation: a Run from any checkpoint (load.py) and the KV-cache sampling loop (generate.py).

    from megatron_lite.inference import generate, load_for_inference
    run = load_for_inference(parse_args(["--load", DIR]))
    new_ids = generate(run, [run.tokenizer.tokenize("Once upon a time")], run.cfg.inference,
                       seed=run.cfg.train.seed, stop_token_id=run.tokenizer.eod)[0]

megatron_lite.tools.generate is the command line; training's --generate-interval calls print_training_sample.
"""

from megatron_lite.inference.generate import InferenceContext, generate, print_training_sample, sample
from megatron_lite.inference.load import IdsOnlyTokenizer, load_for_inference

__all__ = ["IdsOnlyTokenizer", "InferenceContext", "generate", "load_for_inference", "print_training_sample",
           "sample"]
