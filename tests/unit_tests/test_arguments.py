"""Flags and YAML become the config tree; every impossible combination stops with its named error."""

import subprocess
import sys

import pytest

from megatron_lite.arguments import ConfigError, parse_args, validate

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "8", "--train-iters", "3"]


def test_megatron_flags_fill_the_config_tree():
    cfg = parse_args(BASE + ["--tensor-model-parallel-size", "2", "--disable-bias-linear", "--swiglu",
                             "--normalization", "RMSNorm", "--no-load-optim", "--finetune", "--load", "x",
                             "--data-path", "0.3", "a", "0.7", "b", "--lr-decay-style", "cosine", "--bf16"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.model.add_bias_linear is False and cfg.model.swiglu is True
    assert cfg.model.normalization == "RMSNorm"
    assert cfg.checkpoint.load_optim is False and cfg.checkpoint.finetune is True
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]
    assert cfg.optimizer.lr_decay_style == "cosine" and cfg.optimizer.bf16 is True
    validate(cfg, world_size=4)
    assert cfg.train.global_batch_size == 2 * 2  # mbs x DP


def test_yaml_config_with_flag_names_and_command_line_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num-layers: 6\nparallel:\n  tensor_model_parallel_size: 2\ndisable-bias-linear: true\n"
                    "lr: 0.5\n")
    cfg = parse_args(["--config", str(path), "--lr", "0.25", "--train-iters", "1"])
    assert cfg.model.num_layers == 6
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.model.add_bias_linear is False
    assert cfg.optimizer.lr == 0.25


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num-layerz: 6\n")
    with pytest.raises(ConfigError, match="unknown key 'num-layerz'"):
        parse_args(["--config", str(path)])


def test_unknown_flag_names_the_nearest_flag():
    with pytest.raises(ConfigError) as e:
        parse_args(["--num-layerz", "3"])
    assert str(e.value) == "--num-layerz: unknown flag; did you mean --num-layers?"


BAD = [
    (["--tensor-model-parallel-size", "3"], 8, "world size 8 is not divisible by TP x PP = 3 x 1"),
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
     "world size 6 is not divisible by TP x PP = 2 x 2"),
    (["--num-attention-heads", "6", "--tensor-model-parallel-size", "4"], 4,
     "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"], 4,
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    (["--micro-batch-size", "2", "--global-batch-size", "6"], 2,
     "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 are exclusive"),
]


@pytest.mark.parametrize("flags,world,message", BAD, ids=[b[2].split(" ")[0].strip("-") + str(i) for i, b in enumerate(BAD)])
def test_bad_combination_names_the_problem(flags, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(parse_args(BASE + flags), world_size=world)


def test_bad_combination_stops_pretrain_before_any_process_group():
    """One line naming the problem, exit status 2, no process group (no torchrun needed)."""
    out = subprocess.run([sys.executable, "pretrain_gpt.py", *BASE, "--num-attention-heads", "6",
                          "--tensor-model-parallel-size", "4"], capture_output=True, text=True,
                         env={"WORLD_SIZE": "4", "PATH": ""}, cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "pretrain_gpt.py: error: --num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4; "
        "pick a TP size that divides the heads"]
