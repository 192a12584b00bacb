"""LoRA: adapters on a frozen base, split under TP like their base layers, adapter-only checkpoints that
name their base and resume bit for bit, and PEFT's format on the way out.

Every LoRA run starts from one base checkpoint, trained here for three iterations and saved in one
process; the parallel runs load it resharded.
"""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from megatron_lite.arguments import ConfigError, parse_args
from megatron_lite.checkpoint.io.integrity import read_metadata
from megatron_lite.checkpoint.io.storage import load_file
from megatron_lite.inference import generate, load_for_inference
from megatron_lite.tools import convert
from megatron_lite.training import pretrain
from tests.unit_tests.checkpoint.test_resume import _assert_bitwise, _final_model, _run_until, _state
from tests.unit_tests.dist_utils import run_distributed
from tests.unit_tests.test_parallel_training import ARCH, COMMON, _global_params, _train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """One base checkpoint per architecture (COMMON's tiny model, 3 iterations, one process)."""
    out = {}
    for arch in ARCH:
        d = str(tmp_path_factory.mktemp(f"base-{arch}"))
        pretrain(parse_args(COMMON + ARCH[arch] + ["--train-iters", "3", "--save", d]))
        out[arch] = d
    return out


def _lora_flags(arch, base):
    return COMMON + ARCH[arch] + LORA + ["--pretrained-checkpoint", base]


# ---------------------------------------------------------------------------------- training

def test_only_the_adapters_train_and_have_optimizer_state(bases):
    run = pretrain(parse_args(_lora_flags("llama", bases["llama"])))
    base = load_file(bases["llama"], 3, "mp_rank_00_000/model_optim_rng.pt")["model"]
    names = dict(run.module.named_parameters())
    adapters = [k for k in names if ".adapter.lora_" in k]
    # four target modules per layer, A and B each
    assert len(adapters) == 4 * 2 * 4
    for k, p in names.items():
        if k in base:
            assert not p.requires_grad and torch.equal(p.detach(), base[k]), k
    assert all(names[k].requires_grad for k in adapters)
    assert any(names[k].abs().max() > 0 for k in adapters if "lora_B" in k)   # B started at zero and trained
    optimizer_params = run.optimizer.state_dict()["params"]
    assert sorted(optimizer_params) == sorted(adapters)


LAYOUTS = [
    # (id, world size, arch, flags)
    ("tp2-pp2", 4, "llama", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    ("tp2-sp-dp2-distopt", 4, "gpt2", ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                       "--use-distributed-optimizer"]),
]


@pytest.mark.parametrize("name,world,arch,flags", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_lora_run_equals_the_single_process_lora_run(name, world, arch, flags, bases):
    single = run_distributed(_train, 1, _lora_flags(arch, bases[arch]))[0]
    results = run_distributed(_train, world, _lora_flags(arch, bases[arch]) + flags)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    want, got = _global_params([single]), _global_params(results)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)


# ---------------------------------------------------------------------------------- checkpoints

def test_adapter_checkpoint_holds_the_adapters_and_names_its_base(bases, tmp_path, capsys):
    out = str(tmp_path / "lora")
    run = pretrain(parse_args(_lora_flags("llama", bases["llama"]) + ["--save", out]))
    iter_dir = os.path.join(out, "iter_0000005")
    meta = read_metadata(iter_dir)
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                            "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
    assert meta["base"]["dir"] == os.path.abspath(bases["llama"]) and meta["base"]["iteration"] == 3
    assert meta["base"]["checksum"].startswith("sha256:")
    shard = load_file(out, 5, "mp_rank_00_000/model_optim_rng.pt")
    assert sorted(shard["model"]) == sorted(k for k, _ in run.module.named_parameters() if ".adapter." in k)
    assert sorted(meta["tensors"]) == sorted(run.module.global_name(k) for k in shard["model"])
    assert sorted(shard["optimizer"]["params"]) == sorted(shard["model"])
    size = os.path.getsize(os.path.join(iter_dir, "mp_rank_00_000/model_optim_rng.pt"))
    base_size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(os.path.join(bases["llama"],
                                                                                             "iter_0000003"))
                    for n in ns)
    assert size < base_size / 2
    assert "% of the base checkpoint's" in capsys.readouterr().out


def test_lora_resume_is_bitwise_identical(bases, tmp_path):
    flags = _lora_flags("gpt2", bases["gpt2"]) + ["--train-iters", "8", "--hidden-dropout", "0.1",
                                                  "--lora-dropout", "0.1"]
    straight = _state(pretrain(parse_args(flags)))
    ck = str(tmp_path / "ck")
    first = pretrain(parse_args(flags + ["--save", ck, "--save-interval", "100", "--exit-interval", "4"]))
    second = pretrain(parse_args(flags + ["--save", ck]))
    assert second.checkpoints.loaded_iteration == 4 and "checksum unchanged" in second.checkpoints.load_report
    assert _state(first)["history"] + _state(second)["history"] == straight["history"]
    _assert_bitwise(_state(second)["model"], straight["model"], "model")
    _assert_bitwise(_state(second)["optimizer"], straight["optimizer"], "optimizer")


def test_lora_run_killed_between_saves_resumes_bitwise(bases, tmp_path):
    cli = [sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *_lora_flags("llama", bases["llama"]),
           "--train-iters", "12", "--log-interval", "1"]
    straight = str(tmp_path / "straight")
    done = subprocess.run(cli + ["--save", straight], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ck = str(tmp_path / "ck")
    args = cli + ["--save", ck, "--save-interval", "3"]
    code, _ = _run_until(args, " iteration        5/", signal.SIGKILL)
    assert code == -signal.SIGKILL
    second = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "iteration 3, " in second.stdout
    final, want = _final_model(ck), _final_model(straight)
    _assert_bitwise(final["model"], want["model"], "adapters")
    _assert_bitwise(final["optimizer"], want["optimizer"], "optimizer")


def test_a_changed_base_checkpoint_is_an_error_that_says_so(tmp_path):
    base, out = str(tmp_path / "base"), str(tmp_path / "lora")
    pretrain(parse_args(COMMON + ["--train-iters", "3", "--save", base]))
    flags = COMMON + LORA + ["--pretrained-checkpoint", base, "--save", out, "--train-iters", "4"]
    pretrain(parse_args(flags))
    shutil.rmtree(base)
    pretrain(parse_args(COMMON + ["--train-iters", "3", "--save", base, "--seed", "8"]))   # the same name, other weights
    with pytest.raises(ConfigError, match=r"the base checkpoint .*iter_0000003 changed since the adapters in "
                                          r".*iter_0000004 were saved .*restore that base checkpoint"):
        pretrain(parse_args(flags + ["--train-iters", "5"]))


def test_lora_errors_name_the_fix(bases, tmp_path):
    with pytest.raises(ConfigError, match=r"--lora-rank trains adapters on a base model: pass its checkpoint with "
                                          r"--pretrained-checkpoint DIR"):
        pretrain(parse_args(COMMON + LORA))
    out = str(tmp_path / "lora")
    pretrain(parse_args(_lora_flags("gpt2", bases["gpt2"]) + ["--save", out, "--train-iters", "3"]))
    with pytest.raises(ConfigError, match=r"holds only LoRA adapters .*pass --lora-rank 4 --lora-alpha 8.0"):
        pretrain(parse_args(COMMON + ["--load", out, "--finetune"]))
    with pytest.raises(ConfigError, match=r"LoRA adapters with rank=4 \(flags say 8\)"):
        pretrain(parse_args(_lora_flags("gpt2", bases["gpt2"]) + ["--save", out, "--lora-rank", "8"]))
    with pytest.raises(ConfigError, match=r"adapter-only checkpoints are megatron_lite's"):
        pretrain(parse_args(COMMON + LORA + ["--ckpt-format", "torch"]))


# ---------------------------------------------------------------------------------- PEFT

def _convert(*argv):
    assert convert.main(list(argv)) == 0


HF_MODELS = {
    "llama": lambda t: t.LlamaForCausalLM(t.LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)),
    "gpt2": lambda t: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}


@pytest.mark.parametrize("family", sorted(HF_MODELS))
def test_peft_loads_the_exported_adapters_with_equal_logits_and_merging_gives_the_same_model(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf_dir, base, out = str(tmp_path / "hf"), str(tmp_path / "base"), str(tmp_path / "lora")
    HF_MODELS[family](transformers).save_pretrained(hf_dir)
    _convert("--loader", "hf", "--saver", "megatron_lite", "--load-dir", hf_dir, "--save-dir", base)
    run = pretrain(parse_args(["--use-checkpoint-args", "--pretrained-checkpoint", base, "--seq-length", "16",
                               "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
                               "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
                               "--lr", "3e-2", "--lora-rank", "4", "--lora-alpha", "16", "--save", out,
                               "--log-interval", "100", "--eval-interval", "0"]))
    ids = torch.randint(0, 101, (2, 16))
    run.module.eval()
    with torch.no_grad():
        ours = run.module(ids, torch.arange(16).expand(2, 16))[..., :101].transpose(0, 1)   # [b, s, v]

    _convert("--loader", "megatron_lite", "--saver", "peft", "--load-dir", out, "--save-dir", str(tmp_path / "peft"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(base, "hf"))
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(ids).logits
    assert (plain - ours).abs().max() > 1e-3   # the adapters trained: the logits are not the base model's

    _convert("--loader", "megatron_lite", "--saver", "hf", "--merge-lora", "--load-dir", out, "--save-dir",
             str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours, rtol=1e-5, atol=1e-5)

    # generation from the adapter checkpoint (loaded with its base) is PEFT's greedy output
    cfg = parse_args(["--load", out, "--max-new-tokens", "6", "--greedy"])
    prompt = ids[0, :5].tolist()
    with torch.no_grad():
        want = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
    assert generate(load_for_inference(cfg), [prompt], cfg.inference) == [want[0, 5:].tolist()]


def test_convert_refuses_adapters_without_a_lora_saver(bases, tmp_path):
    out = str(tmp_path / "lora")
    pretrain(parse_args(_lora_flags("gpt2", bases["gpt2"]) + ["--save", out, "--train-iters", "3"]))
    res = subprocess.run([sys.executable, "-m", "megatron_lite.tools.convert", "--loader", "megatron_lite",
                          "--saver", "hf", "--load-dir", out, "--save-dir", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 2
    assert "holds only LoRA adapters" in res.stderr and "--saver peft, or pass --merge-lora" in res.stderr
