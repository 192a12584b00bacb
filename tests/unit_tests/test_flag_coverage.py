"""No flag is accepted and then ignored.

The parser is walked: every flag it accepts is a config field, and the value of every field is
read by the code that implements it (an attribute access `.name`, or `getattr(x, "name")`,
somewhere in megatron_lite outside arguments.py and validation.py). The only other accepted
flags are the fields whose one accepted value is the default (validation refuses any other),
Megatron-LM's deprecated spellings and gates that validation turns into the flags they stand for
(checked here for each), and the flags Megatron-LM scripts pass that have no effect here
(`WITHOUT_EFFECT`, documented in unsupported.py).
"""

import ast
import dataclasses
import pathlib

import pytest

import megatron_lite
from megatron_lite.arguments import SPECS, ConfigError, build_parser, parse_args, validate
from megatron_lite.config import SECTIONS
from megatron_lite.unsupported import UNSUPPORTED, WITHOUT_EFFECT

PACKAGE = pathlib.Path(megatron_lite.__file__).parent
NOT_READERS = {"arguments.py", "validation.py"}

# fields validation refuses unless they keep their default: the flag with a value it refuses
ONLY_THE_DEFAULT = {
    "replication_factor": (["--save", "/tmp/unused", "--local-ckpt-interval", "1", "--replication-factor", "3"],
                           "--replication-factor 3: megatron_lite keeps each snapshot twice"),
    "context_parallel_size": (["--context-parallel-size", "2"], "context parallelism is not supported"),
    "expert_model_parallel_size": (["--expert-model-parallel-size", "2"], "expert parallelism"),
    "num_distributed_optimizer_instances": (["--num-distributed-optimizer-instances", "2"],
                                            "more than one distributed-optimizer instance"),
    "rerun_mode": (["--rerun-mode", "validate_results"], "--rerun-mode validate_results: the rerun state machine"),
    "cross_entropy_fusion_impl": (["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te"],
                                  "Transformer Engine cross entropy loss fusion is disabled"),
}

# deprecated spellings and gates validation turns into the fields they stand for
ALIASES = {
    "non_persistent_ckpt_type": (["--non-persistent-ckpt-type", "local", "--non-persistent-save-interval", "2",
                                  "--save", "/tmp/unused"], lambda cfg: cfg.checkpoint.local_ckpt_interval == 2),
    "use_rotary_position_embeddings": (["--use-rotary-position-embeddings"],
                                       lambda cfg: cfg.model.position_embedding_type == "rope"),
    "add_position_embedding": (["--no-position-embedding", "--position-embedding-type", "rope"],
                               lambda cfg: cfg.model.position_embedding_type == "rope"),
    "use_flash_attn": (["--use-flash-attn"], lambda cfg: cfg.model.attention_backend == "flash"),
    "recompute_activations": (["--recompute-activations"],
                              lambda cfg: (cfg.model.recompute_granularity, cfg.model.recompute_modules) ==
                              ("selective", ["core_attn"])),
    "use_precision_aware_optimizer": (["--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16"],
                                      lambda cfg: cfg.optimizer.exp_avg_dtype == "bf16"),
}
ALIAS_REFUSALS = {
    "non_persistent_ckpt_type": (["--non-persistent-ckpt-type", "global", "--non-persistent-save-interval", "2"],
                                 "non-persistent checkpoints are node-local snapshots"),
    "add_position_embedding": (["--no-position-embedding"], "--no-position-embedding is deprecated"),
    "use_precision_aware_optimizer": (["--exp-avg-dtype", "bf16"], "need --use-precision-aware-optimizer"),
}


def _names_read_by_the_package():
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name in NOT_READERS and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in
                  ("getattr", "hasattr") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                names.add(node.args[1].value)
    return names


def test_every_accepted_flag_is_a_config_field_or_named_as_without_effect():
    parser = build_parser()
    field_options = {o for spec in SPECS for o in spec.options}
    accepted = {o for action in parser._actions for o in action.option_strings}
    others = accepted - field_options - set(UNSUPPORTED) - {"-h", "--help", "--config"}
    assert others == set(WITHOUT_EFFECT)


def test_every_config_field_is_read_by_the_code_that_implements_it():
    read = _names_read_by_the_package()
    unread = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
              if not f.metadata.get("internal") and f.name not in read
              and f.name not in ONLY_THE_DEFAULT and f.name not in ALIASES]
    assert unread == []


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_deprecated_spellings_and_gates_become_the_flags_they_stand_for(name):
    flags, holds = ALIASES[name]
    assert holds(validate(parse_args(flags + ["--train-iters", "1"]), 1))
    if name in ALIAS_REFUSALS:
        bad, message = ALIAS_REFUSALS[name]
        with pytest.raises(ConfigError, match=message):
            validate(parse_args(bad + ["--train-iters", "1"]), 1)


@pytest.mark.parametrize("name", sorted(ONLY_THE_DEFAULT))
def test_fields_with_one_accepted_value_refuse_the_others(name):
    flags, message = ONLY_THE_DEFAULT[name]
    with pytest.raises(ConfigError, match=message):
        validate(parse_args(flags + ["--train-iters", "1"]), 1)


def test_flags_without_effect_parse_and_change_nothing():
    assert parse_args(list(WITHOUT_EFFECT)).to_dict() == parse_args([]).to_dict()
