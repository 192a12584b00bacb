"""Megatron-LM's own launch scripts and GPT functional-test configs train here, or stop with the
one line that names what megatron_lite does not have.

The scripts and configs are copies (tests/unit_tests/megatron_scripts/, README there names the
commit). A script is run by bash with `torchrun` replaced by a function that records its
command line; a config's MODEL_ARGS become flags as Megatron-LM's test driver makes them
(`--flag: true` -> `--flag`). Then only sizes, data and the distributed backend change
(`shrink`): layers, widths, lengths, batch sizes and iteration counts get tiny values, TP and PP
are capped at 2, data paths and tokenizer files become `--mock-data --tokenizer-type NullTokenizer`,
nccl becomes gloo, and the run's directories move under tmp_path (--load is --save's directory,
as Megatron-LM's CI prepares it). Every command line runs in one spawn of 4 gloo ranks.
"""

import os
import pathlib
import subprocess

import pytest
import yaml

from megatron_lite.arguments import ConfigError, parse_args
from tests.unit_tests.dist_utils import run_distributed

HERE = pathlib.Path(__file__).parent / "megatron_scripts"
WORLD = 4

# flag -> tiny value (a callable gets the original)
SIZES = {
    "--num-layers": "4", "--hidden-size": "64", "--ffn-hidden-size": "128", "--num-attention-heads": "4",
    "--num-query-groups": "2", "--kv-channels": "16", "--seq-length": "32", "--max-position-embeddings": "64",
    "--micro-batch-size": lambda v: str(min(int(v), 2)), "--global-batch-size": "8", "--train-iters": "3",
    "--train-samples": "24", "--lr-decay-samples": "20", "--lr-warmup-samples": "8", "--lr-decay-iters": "20",
    "--eval-interval": "2", "--eval-iters": "1", "--save-interval": "3", "--vocab-size": "256",
    "--tensor-model-parallel-size": lambda v: str(min(int(v), 2)),
    "--pipeline-model-parallel-size": lambda v: str(min(int(v), 2)),
    "--distributed-backend": "gloo", "--exit-duration-in-mins": "30", "--distributed-timeout-minutes": "5",
    "--profile-step-start": "2", "--profile-step-end": "3",
}
SIZES_3 = {"--rampup-batch-size": ["4", "4", "8"]}   # START INCREMENT SAMPLES
DATA = {"--data-path", "--vocab-file", "--merge-file", "--tokenizer-model", "--tokenizer-type"}
DIRS = {"--save": "ckpt", "--load": "ckpt", "--tensorboard-dir": "tb", "--data-cache-path": "cache",
        "--wandb-save-dir": "wandb"}
# what megatron_lite does not have yet and the flags that ask for it: dropped for the run that
# shows the rest of a command line trains
TORCH_DIST = {"--ckpt-format": 1, "--dist-ckpt-strictness": 1, "--dist-ckpt-optim-fully-reshardable": 0,
              "--ckpt-fully-parallel-load": 0}
FP8 = {"--fp8-param-gather": 0}   # the script's --fp8-format hybrid and delayed-scaling flags stay


def shrink(argv, tmp):
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        values = []
        while i + 1 + len(values) < len(argv) and not argv[i + 1 + len(values)].startswith("--"):
            values.append(argv[i + 1 + len(values)])
        i += 1 + len(values)
        if flag in DATA:
            continue
        if flag in SIZES:
            new = SIZES[flag]
            values = [new(values[0]) if callable(new) else new]
        elif flag in SIZES_3:
            values = SIZES_3[flag]
        elif flag in DIRS:
            values = [str(tmp / DIRS[flag])]
        out += [flag, *values]
    if "--mock-data" not in out:
        out.append("--mock-data")
    out += ["--tokenizer-type", "NullTokenizer"] + ([] if "--vocab-size" in out else ["--vocab-size", "256"])
    return out


def without(argv, flags):
    out, i = [], 0
    while i < len(argv):
        if argv[i] in flags:
            i += 1 + flags[argv[i]]
        else:
            out.append(argv[i])
            i += 1
    return out


def script_argv(name, tmp):
    """The command line a Megatron-LM launch script hands torchrun, after the script's path."""
    record = tmp / "argv.txt"
    work = tmp / "script_cwd"
    work.mkdir(exist_ok=True)
    (work / "pretrain_gpt.py").touch()   # the llama script checks that it is there
    env = dict(os.environ, RECORD=str(record))
    subprocess.run(["bash", "-c", 'torchrun() { printf "%s\\n" "$@" > "$RECORD"; }; export -f torchrun; '
                    f'bash {HERE / name} ckpt tb MOCK MOCK data_text_document'],
                   cwd=work, env=env, check=True, capture_output=True)
    argv = record.read_text().splitlines()
    return argv[next(i for i, a in enumerate(argv) if a.endswith("pretrain_gpt.py")) + 1:]


def config_argv(name):
    """Megatron-LM's test driver: `--flag: true` is the bare flag, `false` leaves it out."""
    args = yaml.safe_load((HERE / f"{name}.yaml").read_text())["MODEL_ARGS"]
    argv = []
    for flag, value in args.items():
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, *str(value).split()]
    return argv


# script -> (flags dropped for the run that shows the rest trains, or None; the line it stops with)
SCRIPTS = {
    # Megatron-LM refuses this script itself: its --rampup-batch-size with --train-iters
    "train_gpt3_175b_distributed.sh": ({"--rampup-batch-size": 3},
                                       "expected no batch-size rampup for iteration-based training"),
    "train_llama3_8b_h100_fp8.sh": ({**FP8, **TORCH_DIST}, "--fp8-param-gather (FP8 parameters and "
                                    "high-precision FP8 weight gradients)"),
    "train_mixtral_8x7b_distributed.sh": (None, "(mixture-of-experts layers)"),
}
# config -> the line it stops with (None: it trains, saving in its --ckpt-format torch_dist); with
# Megatron-Core's torch_dist tuning options it stops at the line that names them (parsing refuses
# every unsupported flag of a line at once), and trains or stops as above once they are dropped
TORCH_DIST_LINE = "(distributed checkpointing (torch_dist) options)"
CONFIGS = {
    "gpt3_mcore_te_tp2_pp2": None,
    "gpt3_mcore_te_tp1_pp1_uniform_full_recompute": None,
    "gpt3_mcore_tp1_pp1_dist_optimizer_overlap_grad_reduce_param_gather": None,
    "gpt3_mcore_te_tp2_pp2_cross_entropy_loss_fusion": None,
    "gpt3_mcore_te_tp2_pp2_ddp_average_in_collective": None,
    "gpt3_mcore_te_tp1_pp2_rope_embeddings_interleaved_no_fusion": None,
    "gpt3_mcore_tp1_pp2_fp16": None,
    "gpt3_mcore_te_tp1_pp4_swiglu": None,
    "gpt3_mcore_te_tp2_pp1_cp2_nondeterministic": "--context-parallel-size 2: context parallelism is not supported",
    "gpt3_mcore_te_tp1_pp4_vp1_decoupled_lr": "(the interleaved pipeline schedule)",
    "gpt3_mcore_te_tp4_pp1_qk_layernorm_test_mode": "--test-mode (real-time test mode)",
    "gpt3_mcore_te_tp2_pp2_mla": "(multi-latent attention)",
}


def _run_all(rank, world_size, command_lines):
    from megatron_lite.training import pretrain

    out = {}
    for name, argv in command_lines.items():
        try:
            run = pretrain(parse_args(argv))
        except ConfigError as e:
            out[name] = ("refused", str(e))
            continue
        out[name] = ("trained", [(h["iteration"], h["lm loss"]) for h in run.history], run.progress.iteration)
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    lines, expected = {}, {}
    for name, (drop, refusal) in SCRIPTS.items():
        tmp = tmp_path_factory.mktemp(name.split(".")[0])
        argv = shrink(script_argv(name, tmp), tmp)
        lines[name], expected[name] = argv, refusal
        if drop is not None and refusal is not None:
            lines[name + " (trained)"], expected[name + " (trained)"] = without(argv, drop), None
    for name, refusal in CONFIGS.items():
        tmp = tmp_path_factory.mktemp(name)
        argv = shrink(config_argv(name), tmp)
        with_torch_dist = any(f in argv for f in TORCH_DIST if f != "--ckpt-format")
        lines[name] = argv
        expected[name] = TORCH_DIST_LINE if with_torch_dist else refusal
        lines[name + " (megatron_lite checkpoints)"] = without(argv, TORCH_DIST)
        expected[name + " (megatron_lite checkpoints)"] = refusal
    return run_distributed(_run_all, WORLD, lines)[0], expected, lines


@pytest.mark.slow
def test_megatron_command_lines_train_or_name_what_is_missing(outcomes):
    results, expected, lines = outcomes
    for name, refusal in expected.items():
        result = results[name]
        if refusal is None:
            assert result[0] == "trained", f"{name}: {result[1]}\n{' '.join(lines[name])}"
            iterations, final = result[1], result[2]
            assert final == 3 and [it for it, _ in iterations] == [1, 2, 3], name
            assert all(0.0 < loss < 20.0 for _, loss in iterations), (name, iterations)
        else:
            assert result[0] == "refused", f"{name} trained but should stop with {refusal!r}"
            assert refusal in result[1] and "\n" not in result[1], (name, result[1])


@pytest.mark.slow
def test_the_scripts_flags_reach_the_config(outcomes):
    """The shrunk llama3 line keeps the script's meaning: its literal-quoted split, its
    decoupled learning rate and its per-token loss."""
    _, _, lines = outcomes
    llama = lines["train_llama3_8b_h100_fp8.sh (trained)"]
    assert llama[llama.index("--split") + 1] == "'99,1,0'"   # bash passes the quotes through
    cfg = parse_args(llama)
    assert (cfg.optimizer.decoupled_lr, cfg.optimizer.decoupled_min_lr) == (5.0e-4, 4.5e-5)
    assert cfg.train.calculate_per_token_loss and cfg.model.apply_layernorm_1p and cfg.train.manual_gc
