"""Training data the way Megatron-LM users have it.

Megatron's `.bin`/`.idx` indexed datasets (indexed_dataset.py), written by
tools/preprocess_data.py (preprocess.py); GPT document/sample/shuffle indices
(gpt_dataset.py, built by the C++ helper in csrc/helpers.cpp via helpers.py) and weighted
blends (blended_dataset.py), assembled per split from the DataConfig (builder.py);
samplers driven by consumed_samples (samplers.py). With no data flags a small corpus
shipped in the package is used (default_corpus.py).

The training loop needs two calls:

    tokenizer = build_tokenizer(data_cfg, vocab_size)
    train_iter, valid_iter, test_iter = iterators = build_data_iterators(data_cfg, tokenizer, ...)

and `summary_lines(iterators.datasets)` describes each split's documents, tokens and samples.
"""

from megatron_lite.data.builder import summary_lines
from megatron_lite.data.iterators import build_data_iterators
from megatron_lite.data.tokenizers import build_tokenizer

__all__ = ["build_tokenizer", "build_data_iterators", "summary_lines"]
