"""The four tokenizers; GPT-2 BPE and Hugging Face against a tokenizer trained here, offline."""

import re

import pytest

from megatron_lite.config import DataConfig
from megatron_lite.data import build_tokenizer
from megatron_lite.data.default_corpus import corpus_documents
from megatron_lite.data.tokenizers import GPT2BPETokenizer

SAMPLES = ["Hello world", "It's   spaced\tout\n\nnew paragraph", "numbers 12345 and ½ ² Ⅻ",
           "Größe, naïve café — 日本語のテキスト", "don't we'll they've I'm", "  leading and trailing  ",
           "symbols!?#$%^&*()[]{}<>", ""]


@pytest.fixture(scope="module")
def trained_bpe(tmp_path_factory):
    """A 600-token byte-level BPE trained on the default corpus, saved as vocab.json/merges.txt."""
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_documents()[:200], vocab_size=600, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    directory = tmp_path_factory.mktemp("bpe")
    bpe.save_model(str(directory))
    return bpe, directory


def test_byte_level_round_trip():
    tok = build_tokenizer(DataConfig())
    assert (tok.vocab_size, tok.eod) == (257, 256)
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.detokenize(ids + [tok.eod]) == text


def test_null_tokenizer_is_megatrons():
    tok = build_tokenizer(DataConfig(tokenizer_type="NullTokenizer"), vocab_size=1000)
    assert (tok.vocab_size, tok.eod) == (1001, 1000)
    assert tok.tokenize("3 1 4 1 5") == [3, 1, 4, 1, 5]
    assert tok.detokenize([3, 1, 4]) == "3 1 4"


def test_gpt2_bpe_matches_the_reference_implementation(trained_bpe):
    reference, directory = trained_bpe
    cfg = DataConfig(tokenizer_type="GPT2BPETokenizer", vocab_file=str(directory / "vocab.json"),
                     merge_file=str(directory / "merges.txt"))
    tok = build_tokenizer(cfg)
    assert tok.vocab_size == reference.get_vocab_size() == 600
    assert tok.eod == reference.token_to_id("<|endoftext|>")
    for text in SAMPLES + corpus_documents()[500:520]:
        ids = tok.tokenize(text)
        assert ids == reference.encode(text).ids, text
        assert tok.detokenize(ids) == text


def test_hugging_face_tokenizer_from_a_local_directory(trained_bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    reference, _ = trained_bpe
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=reference._tokenizer,
                                                eos_token="<|endoftext|>")
    fast.save_pretrained(str(tmp_path))
    tok = build_tokenizer(DataConfig(tokenizer_type="HuggingFaceTokenizer",
                                     tokenizer_model=str(tmp_path)))
    assert tok.vocab_size == 600 and tok.eod == reference.token_to_id("<|endoftext|>")
    for text in SAMPLES[:5]:
        assert tok.tokenize(text) == reference.encode(text).ids
        assert tok.detokenize(tok.tokenize(text)) == text


@pytest.mark.parametrize("cfg, vocab_size, message", [
    (DataConfig(tokenizer_type="NullTokenizer"), None, "NullTokenizer needs --vocab-size"),
    (DataConfig(tokenizer_type="HuggingFaceTokenizer"), None, "needs --tokenizer-model DIR"),
    (DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/nonexistent"), None,
     "is not a directory"),
    (DataConfig(tokenizer_type="GPT2BPETokenizer"), None, "needs --vocab-file"),
    (DataConfig(), 50000, "--vocab-size 50000 disagrees with ByteLevelTokenizer, which has 257"),
])
def test_misconfigured_tokenizers_name_the_flag(cfg, vocab_size, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_tokenizer(cfg, vocab_size)


def test_gpt2_vocabulary_without_end_of_text_is_rejected(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match=re.escape("has no <|endoftext|> token")):
        GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
