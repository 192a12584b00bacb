"""megatron_lite.tools.convert: Hugging Face <-> megatron_lite at any TP/PP, checked on logits and bits.

Tiny random Hugging Face models (built from a config with transformers, every parameter drawn at
random so biases and norms count too) are converted to each (TP, PP) layout; megatron_lite's
logits on the converted checkpoint must match Hugging Face's, and conversions must round-trip
bitwise. The models cover Llama 3 (GQA, Llama-3.1 RoPE scaling, a tokenizer), Mistral
(head_dim != hidden / heads, sharded safetensors), Qwen2 (q/k/v bias, tied embeddings,
groups == heads, pytorch_model.bin), GPT-2 (Conv1D, learned positions, tied) and a Llama with
one query group (MQA, TP 1 only); the vocabulary (250) is padded to 280 at TP 1 and 320 at TP 2.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from megatron_lite.checkpoint.hf.io import HFCheckpointReader
from megatron_lite.checkpoint.io.integrity import read_metadata
from megatron_lite.checkpoint.io.layout import model_shard_path
from megatron_lite.config import RunConfig
from megatron_lite.model.gpt import GPTModel
from megatron_lite.ops import build_ops
from megatron_lite.parallel.state import initialize
from megatron_lite.tools import convert
from tests.unit_tests.dist_utils import run_distributed

VOCAB, DIVISIBLE_BY = 250, 40
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
MODELS = ["llama", "mistral", "qwen2", "gpt2", "llama_mqa"]


def convert_tool():
    return convert


def run_convert(*argv: str) -> None:
    assert convert_tool().main([str(a) for a in argv]) == 0


def layouts_of(name):
    return [(1, 1), (1, 2)] if name == "llama_mqa" else LAYOUTS


# --------------------------------------------------------------------------- Hugging Face side

def hf_model(name: str):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, rope_parameters=llama3_rope, **common)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(num_key_value_heads=2, head_dim=16, sliding_window=64,
                                                            **common)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=4, tie_word_embeddings=True, **common)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "llama_mqa": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, **common)),
        "llama_bias": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, attention_bias=True,
                                                           mlp_bias=True, tie_word_embeddings=True, **common)),
    }[name]()
    g = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "ln" in pname or "norm" in pname else 0.0))
    return model.eval()


def save_hf(model, name: str, directory: str) -> None:
    """Each model in another of Hugging Face's file layouts."""
    if name == "qwen2":
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    else:
        model.save_pretrained(directory, max_shard_size="20KB" if name == "mistral" else "5GB")
    if name == "llama":
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1").save_pretrained(directory)


def hf_state(directory: str) -> dict:
    reader = HFCheckpointReader(directory)
    return {n: reader.get(n) for n in reader.names}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> {"hf": dir, "ids", "logits", (tp, pp): converted dir}."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for name in MODELS:
        model = hf_model(name)
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            logits = model(ids).logits
        entry = {"hf": root / name, "ids": ids, "logits": logits}
        save_hf(model, name, str(entry["hf"]))
        for tp, pp in layouts_of(name):
            entry[tp, pp] = root / f"{name}_tp{tp}_pp{pp}"
            run_convert("--loader", "hf", "--saver", "megatron_lite", "--load-dir", entry["hf"],
                        "--save-dir", entry[tp, pp], "--target-tensor-parallel-size", tp,
                        "--target-pipeline-parallel-size", pp, "--make-vocab-size-divisible-by", DIVISIBLE_BY)
        out[name] = entry
    return out


# --------------------------------------------------------------------------- megatron_lite forward

def stage_logits(ckpt_dir: str, ids: torch.Tensor, state, ops):
    """Full-vocabulary logits [b, s, v] on the last stage's TP rank 0 (None elsewhere); the other
    stages pass their activations on by point-to-point sends."""
    meta = read_metadata(os.path.join(ckpt_dir, "release"))
    cfg = RunConfig.from_dict(meta["config"]).model
    model = GPTModel(cfg, state, ops, init_weights=False)
    shard = torch.load(os.path.join(ckpt_dir, "release", model_shard_path(state.tp_rank, state.pp_rank)),
                       weights_only=True)
    model.load_state_dict(shard["model"], strict=True)
    model.eval()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    if not state.is_first_stage:
        hidden = torch.empty(ids.shape[1], ids.shape[0], cfg.hidden_size)
        dist.recv(hidden, src=state.prev_rank)
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(ids, positions)
    if not state.is_last_stage:
        dist.send(out.contiguous(), dst=state.next_rank)
        return None
    if state.tp_size > 1:
        parts = [torch.empty_like(out) for _ in range(state.tp_size)]
        dist.all_gather(parts, out.contiguous(), group=state.tp_group)
        out = torch.cat(parts, dim=-1)
    return out.transpose(0, 1)[..., :cfg.vocab_size] if state.tp_rank == 0 else None


def _logits_body(rank, world_size, tp, pp, cases):
    state = initialize(tp, pp)
    ops = build_ops(fused_kernels=False)
    return {name: stage_logits(ckpt, ids, state, ops) for name, (ckpt, ids) in cases.items()}


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_logits_of_converted_checkpoint_match_hugging_face(converted, tp, pp):
    cases = {name: (str(e[tp, pp]), e["ids"]) for name, e in converted.items() if (tp, pp) in e}
    if tp * pp == 1:
        results = [_logits_body(0, 1, 1, 1, cases)]
    else:
        results = run_distributed(_logits_body, tp * pp, tp, pp, cases)
    last = results[(pp - 1) * tp]            # rank of (tp_rank 0, last stage)
    assert set(last) == set(cases)
    for name, logits in last.items():
        want = converted[name]["logits"]
        assert logits.shape == want.shape, name
        diff = (logits - want).abs().max().item()
        assert diff < 1e-5, f"{name}: max abs logit difference {diff:.2e} at TP={tp} PP={pp}"


def test_llama_with_a_bias_on_every_projection_matches_hugging_face(tmp_path):
    model = hf_model("llama_bias")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    save_hf(model, "llama_bias", str(tmp_path / "hf"))
    run_convert("--loader", "hf", "--saver", "megatron_lite", "--load-dir", tmp_path / "hf", "--save-dir",
                tmp_path / "ml")
    logits = _logits_body(0, 1, 1, 1, {"llama_bias": (str(tmp_path / "ml"), ids)})["llama_bias"]
    with torch.no_grad():
        want = model(ids).logits
    assert (logits - want).abs().max().item() < 1e-5


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", MODELS)
def test_hf_to_megatron_to_hf_is_bitwise_identical(converted, tmp_path, name):
    from transformers import AutoModelForCausalLM
    e = converted[name]
    source = e[1, 2] if name == "llama_mqa" else e[2, 2]
    back = tmp_path / "hf"
    shard_args = ("--max-shard-size", "20KB") if name == "llama" else ()
    run_convert("--loader", "megatron_lite", "--saver", "hf", "--load-dir", source, "--save-dir", back, *shard_args)
    original, result = hf_state(str(e["hf"])), hf_state(str(back))
    if name == "qwen2":        # tied: the .bin file also stores lm_head.weight, which Hugging Face ignores
        assert torch.equal(original.pop("lm_head.weight"), original["model.embed_tokens.weight"])
    assert sorted(result) == sorted(original)
    for k in original:
        assert result[k].dtype == original[k].dtype and torch.equal(result[k], original[k]), k
    assert os.path.isfile(back / "generation_config.json")
    if name == "llama":
        assert os.path.isfile(back / "model.safetensors.index.json")
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(back))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(back).eval()(e["ids"]).logits
    assert torch.equal(logits, e["logits"])


@pytest.mark.parametrize("name", MODELS)
def test_megatron_checkpoint_without_hf_folder_converts_by_its_config_alone(converted, tmp_path, name):
    """A checkpoint trained in megatron_lite has no original config.json: the family is chosen
    from its config (Qwen2 for a q/k/v bias alone, GPT-2 for learned positions, else Llama)."""
    from transformers import AutoModelForCausalLM
    e = converted[name]
    source = tmp_path / "trained"
    shutil.copytree(e[1, 1], source, ignore=shutil.ignore_patterns("hf"))
    run_convert("--loader", "megatron_lite", "--saver", "hf", "--load-dir", source, "--save-dir", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == {"qwen2": "qwen2", "gpt2": "gpt2"}.get(name, "llama")
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(e["ids"]).logits
    torch.testing.assert_close(logits, e["logits"], rtol=0, atol=1e-5)


def rank_models(ckpt_dir, tp, pp, iteration_dir="release"):
    return {(t, p): torch.load(os.path.join(ckpt_dir, iteration_dir, model_shard_path(t, p)),
                               weights_only=True)["model"] for t in range(tp) for p in range(pp)}


def assert_same_models(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for rank in a:
        assert list(a[rank]) == list(b[rank]), rank
        for k in a[rank]:
            assert torch.equal(a[rank][k], b[rank][k]), (rank, k)


@pytest.mark.parametrize("name", MODELS)
def test_megatron_reshard_2x2_to_1x1_and_back_is_bitwise_identical(converted, tmp_path, name):
    e = converted[name]
    start = (1, 2) if name == "llama_mqa" else (2, 2)
    one, back = tmp_path / "tp1pp1", tmp_path / "back"
    run_convert("--loader", "megatron_lite", "--saver", "megatron_lite", "--load-dir", e[start], "--save-dir", one,
                "--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 1)
    assert_same_models(rank_models(one, 1, 1), rank_models(e[1, 1], 1, 1))      # 320 vocabulary rows cut to 280
    run_convert("--loader", "megatron_lite", "--saver", "megatron_lite", "--load-dir", one, "--save-dir", back,
                "--target-tensor-parallel-size", start[0], "--target-pipeline-parallel-size", start[1])
    assert_same_models(rank_models(back, *start), rank_models(e[start], *start))   # and extended again
    meta = read_metadata(os.path.join(back, "release"))
    assert meta["parallel"] == {"tp": start[0], "pp": start[1], "dp": 1}
    assert meta["tensors"] == read_metadata(os.path.join(e[start], "release"))["tensors"]


def test_converted_directory_holds_the_hf_files_and_a_weights_only_release(converted):
    e = converted["llama"]
    out = e[2, 2]
    assert sorted(os.listdir(out)) == ["hf", "release"]
    assert sorted(os.listdir(e["hf"])) == sorted(os.listdir(out / "hf"))
    meta = read_metadata(os.path.join(out, "release"))
    assert meta["kind"] == "weights" and meta["mode"] == "converted" and meta["iteration"] == "release"
    config = RunConfig.from_dict(meta["config"])
    assert config.model.padded_vocab_size == 320 and config.model.vocab_size == VOCAB
    assert config.model.use_rope_scaling and config.model.rotary_base == 500000.0
    assert config.data.tokenizer_type == "HuggingFaceTokenizer"
    assert config.data.tokenizer_model == str(out / "hf")
    qkv = meta["tensors"]["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert [(p["tp_rank"], p["pp_rank"], p["key"]) for p in qkv["pieces"]] == [
        (0, 1, "decoder.layers.0.self_attention.linear_qkv.weight"),
        (1, 1, "decoder.layers.0.self_attention.linear_qkv.weight")]


# --------------------------------------------------------------------------- what is refused

def edited_copy(source, target, **changes):
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("name,changes,message", [
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters.rope_type='yarn'"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 2.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "rope_parameters.low_freq_factor=2.0"),
    ("llama", {"attention_bias": True}, "attention_bias=True and mlp_bias=False"),
    ("llama", {"model_type": "falcon"}, "model_type='falcon'"),
    ("mistral", {"sliding_window": 16}, "sliding_window=16"),
    ("gpt2", {"activation_function": "relu"}, "activation_function='relu'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8}, "sliding_window=8"),
])
def test_unsupported_config_field_stops_naming_it_and_writes_nothing(converted, tmp_path, capsys, name, changes,
                                                                     message):
    source = edited_copy(converted[name]["hf"], tmp_path / "hf", **changes)
    out = tmp_path / "out"
    rc = convert_tool().main(["--loader", "hf", "--saver", "megatron_lite", "--load-dir", str(source),
                              "--save-dir", str(out)])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_sliding_window_is_accepted_at_a_sequence_length_within_it(converted, tmp_path):
    source = edited_copy(converted["mistral"]["hf"], tmp_path / "hf", sliding_window=16)
    run_convert("--loader", "hf", "--saver", "megatron_lite", "--load-dir", source, "--save-dir", tmp_path / "out",
                "--seq-length", 16)
    assert RunConfig.from_dict(read_metadata(os.path.join(tmp_path, "out", "release"))["config"]).model.seq_length == 16


def test_a_tensor_the_model_has_no_place_for_stops_the_conversion(converted, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    source = edited_copy(converted["llama_mqa"]["hf"], tmp_path / "hf")
    weights = load_file(source / "model.safetensors")
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    rc = convert_tool().main(["--loader", "hf", "--saver", "megatron_lite", "--load-dir", str(source),
                              "--save-dir", str(tmp_path / "out")])
    assert rc == 2
    assert "['model.layers.0.self_attn.q_norm.weight']" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_params_dtype_casts_every_tensor(converted, tmp_path):
    out = tmp_path / "bf16"
    run_convert("--loader", "hf", "--saver", "megatron_lite", "--load-dir", converted["gpt2"]["hf"],
                "--save-dir", out, "--params-dtype", "bf16", "--make-vocab-size-divisible-by", DIVISIBLE_BY)
    bf16, fp32 = rank_models(out, 1, 1)[0, 0], rank_models(converted["gpt2"][1, 1], 1, 1)[0, 0]
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, fp32[k].to(torch.bfloat16)) for k, t in bf16.items())
    meta = read_metadata(os.path.join(out, "release"))
    assert RunConfig.from_dict(meta["config"]).optimizer.bf16
    assert {e["dtype"] for e in meta["tensors"].values()} == {"bfloat16"}


# --------------------------------------------------------------------------- finetuning a conversion

FINETUNE_FLAGS = {
    "pretrained-checkpoint": ["--pretrained-checkpoint", "{out}"],
    "finetune-load": ["--finetune", "--load", "{out}"],
}


@pytest.mark.parametrize("load_flags", list(FINETUNE_FLAGS.values()), ids=list(FINETUNE_FLAGS))
def test_converted_checkpoint_finetunes_and_its_first_loss_is_the_hf_loss(tmp_path, load_flags):
    """The checkpoint loader (checkpoint/manager.py) loads the converted weights-only
    checkpoint; 3 iterations run and the first loss is the Hugging Face model's on that batch.
    The vocabulary (250) gets no padding here (divisible by 125): padded rows would add their
    logits to the softmax, which Hugging Face's loss does not have."""
    import itertools

    from megatron_lite.arguments import parse_args
    from megatron_lite.training import pretrain

    model = hf_model("llama")
    save_hf(model, "llama", str(tmp_path / "hf"))
    out = tmp_path / "converted"
    run_convert("--loader", "hf", "--saver", "megatron_lite", "--load-dir", tmp_path / "hf", "--save-dir", out,
                "--make-vocab-size-divisible-by", 125)
    seq = torch.randint(0, VOCAB, (2, 65), generator=torch.Generator().manual_seed(3))
    tokens, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(model(tokens).logits.reshape(-1, VOCAB), labels.reshape(-1))
    batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(tokens, dtype=torch.float),
             "position_ids": torch.arange(64).expand(2, 64).contiguous()}
    cfg = parse_args([f.format(out=out) for f in load_flags] + ["--use-checkpoint-args", "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", str(out / "hf"), "--micro-batch-size", "2",
                      "--global-batch-size", "2", "--train-iters", "3", "--lr", "1e-3", "--hidden-dropout", "0",
                      "--attention-dropout", "0"])
    run = pretrain(cfg, data_iterators=lambda run: (itertools.repeat(batch), None))
    losses = [r["lm loss"] for r in run.history]
    assert len(losses) == 3 and run.progress.iteration == 3
    assert abs(losses[0] - hf_loss.item()) < 1e-5, (losses[0], hf_loss.item())
    assert losses[2] < losses[0]


def test_true_vocab_size_keeps_the_real_rows_and_pads_as_megatron(converted, tmp_path):
    """250 rows, 230 real tokens: padded to 240 (divisible by 40) by cutting the source at 240,
    as Megatron's converter does; back in Hugging Face form only the 230 real rows remain."""
    e = converted["gpt2"]
    out, back = tmp_path / "ml", tmp_path / "hf"
    run_convert("--loader", "hf", "--saver", "megatron_lite", "--load-dir", e["hf"], "--save-dir", out,
                "--true-vocab-size", 230, "--make-vocab-size-divisible-by", DIVISIBLE_BY)
    wte = hf_state(str(e["hf"]))["transformer.wte.weight"]
    assert torch.equal(rank_models(out, 1, 1)[0, 0]["embedding.word_embeddings.weight"], wte[:240])
    run_convert("--loader", "megatron_lite", "--saver", "hf", "--load-dir", out, "--save-dir", back)
    assert torch.equal(hf_state(str(back))["transformer.wte.weight"], wte[:230])
    assert json.loads((back / "config.json").read_text())["vocab_size"] == 230
