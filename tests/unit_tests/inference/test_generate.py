"""Generation with a KV cache: greedy decoding equals Hugging Face `generate` token for token on the
converted model, the cache gives the full sequence's logits, TP=2 and PP=2 generate what one process
does, Megatron-LM's checkpoint formats generate what megatron_lite's does, megatron_lite.tools.generate
(and its wrapper tools/generate.py) prints the ids, --generate-interval leaves training bit for bit
as it was, and sampling keeps to its top-k / top-p tokens.

The models are tiny random Hugging Face ones (weights drawn with std 0.4, so that greedy decoding
does not just repeat one token): a Llama with GQA (RoPE, RMSNorm, SwiGLU, untied) and a GPT-2
(learned positions, LayerNorm, biases, tied). Their vocabulary of 250 is padded to 280 at TP=1 and
320 at TP=2, so padding rows are present at both.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_lite.arguments import ConfigError, parse_args, validate
from megatron_lite.inference import InferenceContext, generate, load_for_inference, sample
from megatron_lite.config import InferenceConfig
from megatron_lite.tools import generate as generate_cli
from megatron_lite.trainer import Trainer
from tests.unit_tests.checkpoint.test_convert_ckpt import run_convert
from tests.unit_tests.dist_utils import free_port, run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
VOCAB, NEW_TOKENS = 250, 12
PROMPTS = [[5, 17, 42, 7], [9, 3]]
SAMPLING = ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "5"]


def hf_model(name: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    model = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, max_position_embeddings=64)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    }[name]()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4 + (1.0 if "ln" in pname or "norm" in pname else 0.0))
    model.generation_config.eos_token_id = None   # generate exactly NEW_TOKENS, as megatron_lite does here
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> {"dir": converted checkpoint, "hf": [Hugging Face greedy ids of each prompt]}."""
    root = tmp_path_factory.mktemp("generate")
    out = {}
    for name in ("llama", "gpt2"):
        model = hf_model(name)
        model.save_pretrained(root / f"{name}_hf")
        run_convert("--loader", "hf", "--saver", "megatron_lite", "--load-dir", root / f"{name}_hf",
                    "--save-dir", root / name, "--make-vocab-size-divisible-by", "40")
        with torch.no_grad():
            hf = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):].tolist()
                  for p in PROMPTS]
        out[name] = {"dir": str(root / name), "hf": hf}
    return out


def load(directory: str, *flags: str):
    cfg = parse_args(["--load", directory, "--max-new-tokens", str(NEW_TOKENS), *flags])
    return load_for_inference(cfg), cfg


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_equals_hugging_face_generate(models, name):
    run, cfg = load(models[name]["dir"], "--greedy")
    assert run.cfg.model.padded_vocab_size > run.cfg.model.vocab_size == VOCAB
    # a batch of prompts of different lengths gives each prompt's own continuation
    assert generate(run, PROMPTS, cfg.inference) == models[name]["hf"]
    assert len(set(models[name]["hf"][0])) > 3   # not one token repeated


@pytest.mark.parametrize("name,flags", [("llama", []), ("gpt2", []), ("llama", ["--attention-backend", "unfused"])],
                         ids=["llama", "gpt2", "llama-unfused"])
def test_kv_cache_logits_equal_the_full_sequence_forward(models, name, flags):
    """The prompt, then a chunk of 3 tokens, then one token at a time through the cache: each step's
    logits equal those of the same positions in one forward of the whole sequence without a cache."""
    run, _ = load(models[name]["dir"], *flags)
    module = run.module
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12)[None]
    with torch.no_grad():
        full = module(ids, positions)                            # [s, 1, v]
        context = InferenceContext(1, 12)
        for start, end in [(0, 5), (5, 8)] + [(i, i + 1) for i in range(8, 12)]:
            cached = module(ids[:, start:end], positions[:, start:end], inference_context=context)
            context.sequence_len_offset = end
            torch.testing.assert_close(cached, full[start:end], rtol=1e-5, atol=1e-5)
    assert context.key_value_memory_dict[1][0].shape == (12, 1, 2 if name == "llama" else 4, 8)


def _parallel_generations(rank, world_size, dirs, prompts):
    """Greedy and sampled ids of each model at TP=2, then at PP=2 (the same two processes)."""
    out = {}
    for layout in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
        for name, directory in dirs.items():
            for mode, flags in (("greedy", ["--greedy"]), ("sampled", SAMPLING)):
                run, cfg = load(directory, layout, "2", *flags)
                out[layout, name, mode] = generate(run, prompts, cfg.inference, seed=cfg.train.seed)
    return out


def test_tp2_and_pp2_generation_equal_single_process(models):
    dirs = {name: m["dir"] for name, m in models.items()}
    results = run_distributed(_parallel_generations, 2, dirs, PROMPTS)
    for name, directory in dirs.items():
        for mode, flags in (("greedy", ["--greedy"]), ("sampled", SAMPLING)):
            run, cfg = load(directory, *flags)
            single = generate(run, PROMPTS, cfg.inference, seed=cfg.train.seed)
            for layout in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
                for rank_result in results:
                    assert rank_result[layout, name, mode] == single, (layout, name, mode)
        assert results[0][("--tensor-model-parallel-size", name, "greedy")] == models[name]["hf"]


def test_generate_tool_under_torchrun_prints_the_generated_ids_on_one_line(models):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
           "-m", "megatron_lite.tools.generate", "--tensor-model-parallel-size", "2",
           "--load", models["llama"]["dir"], "--prompt-ids", *map(str, PROMPTS[0]), "--greedy",
           "--max-new-tokens", str(NEW_TOKENS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [" ".join(map(str, models["llama"]["hf"][0]))]


def test_generate_wrapper_script_prints_the_generated_ids_on_one_line(models):
    """tools/generate.py, the path Megatron-LM's users run, runs megatron_lite.tools.generate."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "generate.py"), "--load", models["llama"]["dir"],
           "--prompt-ids", *map(str, PROMPTS[0]), "--greedy", "--max-new-tokens", str(NEW_TOKENS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [" ".join(map(str, models["llama"]["hf"][0]))]


TRAIN = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
         "--eval-interval", "0", "--log-interval", "100", "--lr-warmup-iters", "1", "--train-iters", "4"]
SAMPLES = ["--generate-interval", "2", "--generate-prompt", "1 2 3", "--max-new-tokens", "4", "--top-k", "5"]


def _losses_and_params(run):
    return [h["lm loss"] for h in run.history], {n: p.detach().clone() for n, p in run.module.named_parameters()}


def _assert_bitwise_equal(a, b):
    assert a[0] == b[0]
    assert sorted(a[1]) == sorted(b[1])
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


def test_generate_interval_leaves_training_bitwise_identical(capsys):
    """Dropout is on (the defaults), so a sample that moved any generator would change the losses."""
    plain = _losses_and_params(Trainer(TRAIN).train())
    capsys.readouterr()
    sampled = _losses_and_params(Trainer(TRAIN + SAMPLES).train())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(" sample at")]
    _assert_bitwise_equal(plain, sampled)
    assert [line.split(" |")[0] for line in lines] == [" sample at iteration 2", " sample at iteration 4"]
    generated = [line.split("generated: ")[1].strip("'").split() for line in lines]
    assert all(1 <= len(ids) <= 4 and all(0 <= int(i) < 64 for i in ids) for ids in generated)


def test_megatron_lm_checkpoints_generate_what_megatron_lite_ones_do(tmp_path):
    """The same training saved as megatron_lite, Megatron-LM legacy (torch) and torch_dist: each loads
    with its config and tokenizer and samples the same ids (a sampled draw depends on every logit)."""
    drawn = {}
    for fmt in ("megatron_lite", "torch", "torch_dist"):
        Trainer(TRAIN + ["--train-iters", "2", "--save", str(tmp_path / fmt), "--ckpt-format", fmt]).train()
        run, cfg = load(str(tmp_path / fmt), "--max-new-tokens", "12")
        assert run.tokenizer.description == "NullTokenizer(63)"
        drawn[fmt] = generate(run, [[1, 2, 3]], cfg.inference, stop_token_id=run.tokenizer.eod)
    assert drawn["torch"] == drawn["torch_dist"] == drawn["megatron_lite"]
    assert len(set(drawn["megatron_lite"][0])) > 3


def _tp2_sp_training(rank, world_size):
    from megatron_lite.training import pretrain
    flags = TRAIN + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    return [_losses_and_params(pretrain(parse_args(f))) for f in (flags, flags + SAMPLES)]


def test_generate_interval_under_tp2_sequence_parallel_leaves_training_bitwise_identical():
    for plain, sampled in run_distributed(_tp2_sp_training, 2):
        _assert_bitwise_equal(plain, sampled)


# --------------------------------------------------------------------------- sampling

def _draws(logits, n=400, **sampling):
    g = torch.Generator().manual_seed(0)
    return {int(sample(logits, InferenceConfig(**sampling), g)[0]) for _ in range(n)}


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05, 1e-9]]).log()
    assert _draws(logits) == {0, 1, 2, 3}
    assert _draws(logits, top_k=2) == {0, 1}
    # nucleus: 0.5 alone is below 0.7, so the next most likely (0.3) stays, and no more
    assert _draws(logits, top_p=0.7) == {0, 1}
    assert _draws(logits, top_k=1, temperature=3.0) == {0} == _draws(logits, top_p=0.1)
    assert _draws(logits, greedy=True, n=1) == {0}


def test_top_k_1_equals_greedy_and_the_padded_vocabulary_is_never_sampled(models):
    run, cfg = load(models["llama"]["dir"], "--top-k", "1", "--temperature", "0.7")
    assert generate(run, PROMPTS, cfg.inference) == models["llama"]["hf"]
    # a nearly uniform draw over 64 tokens: every id is a real one, never one of the 30 padding rows
    run, cfg = load(models["llama"]["dir"], "--temperature", "1000", "--max-new-tokens", "50")
    drawn = generate(run, [PROMPTS[0]], cfg.inference)[0]
    assert len(drawn) == 50 and max(drawn) < VOCAB and len(set(drawn)) > 30


# --------------------------------------------------------------------------- mistakes

BAD_FLAGS = [
    (["--greedy", "--temperature", "0.5"], "--greedy takes the most likely token, --temperature shape sampling"),
    (["--greedy", "--top-k", "5", "--top-p", "0.5"], "--greedy takes the most likely token, --top-k and --top-p"),
    (["--temperature", "0"], "--temperature 0.0 must be positive; use --greedy"),
    (["--top-k", "-1"], "--top-k -1 must be >= 0"),
    (["--top-p", "1.5"], "--top-p 1.5 must be between 0 and 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
    (["--generate-interval", "5"], "--generate-interval N and --generate-prompt TEXT go together"),
    (["--generate-prompt", "hi"], "--generate-interval N and --generate-prompt TEXT go together"),
    (["--generate-interval", "0", "--generate-prompt", "hi"], "--generate-interval must be positive"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_combinations_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError) as e:
        validate(parse_args(flags + ["--train-iters", "1"]), 1)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_prompts_the_model_cannot_take_are_one_line_errors(models):
    run, cfg = load(models["gpt2"]["dir"], "--max-new-tokens", "61")
    with pytest.raises(ConfigError, match="need 65 positions but the model has 64 learned ones") as e:
        generate(run, [list(range(1, 5))], cfg.inference)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="prompt token ids 250 300 are outside the model's vocabulary of 250"):
        generate(run, [[1, 250, 300]], cfg.inference)


def generate_tool():
    return generate_cli


@pytest.mark.parametrize("args,message", [
    ([], "give the prompt as --prompt TEXT or as --prompt-ids ID [ID ...], one of the two"),
    (["--prompt", "hi", "--prompt-ids", "1"], "give the prompt as --prompt TEXT or as --prompt-ids"),
    (["--prompt", "hi"], "the checkpoint's model has 250 tokens but its tokenizer (ByteLevelTokenizer) has 257; "
                         "give the prompt as --prompt-ids"),
    (["--prompt-ids", "1", "--greedy", "--top-k", "3"], "--greedy takes the most likely token"),
], ids=["no-prompt", "two-prompts", "text-without-tokenizer", "greedy-and-top-k"])
def test_generate_tool_stops_with_one_line(models, capsys, args, message):
    """The error is stderr's last line (after the loading report where it comes after loading)."""
    assert generate_tool().main(["--load", models["llama"]["dir"], *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("generate.py: error: " + message) and "Traceback" not in err
