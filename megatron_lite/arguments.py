"""Megatron-LM-compatible command line (and `--config run.yaml`) -> RunConfig.

Flags are generated from the config dataclasses, so a field and its flag cannot drift
apart. YAML keys are the flag names with or without the dashes (`tensor-model-parallel-size`
or `tensor_model_parallel_size`), flat or nested under the section names; command-line
flags override the file. Every mistake is a `ConfigError` of one line that names the problem
and the fix: an unknown flag (with the nearest known one), a bad value, a YAML value of the
wrong type (with its line) or a YAML syntax error (line and column), and a Megatron-LM flag of
a feature megatron_lite does not have (unsupported.py). `validate` (validation.py) checks the
combinations before any process group exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_lite.config import SECTIONS, RunConfig
from megatron_lite.unsupported import UNSUPPORTED, WITHOUT_EFFECT, refusal


class ConfigError(ValueError):
    """A flag value or combination that cannot work; the message names the fix."""


@dataclass(frozen=True)
class FlagSpec:
    """One config field's flag: its names, its value type, and where the value goes."""
    section: str
    name: str
    options: Tuple[str, ...]       # the flag and its aliases
    kind: type                     # bool, list or the scalar type
    elem: Optional[type]           # element type of a list
    store_false: bool
    choices: Optional[Tuple[Any, ...]]
    nargs: Any
    default: Any

    @property
    def dest(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def flag(self) -> str:
        return self.options[0]


def _value_type(hint) -> Tuple[type, Optional[type]]:
    """(kind, element type) of a field's type hint: Optional[X] is X, List[X] is (list, X)."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (list, List):
        return list, typing.get_args(hint)[0]
    return hint, None


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def flag_specs() -> List[FlagSpec]:
    """Every config field that has a flag, in section order."""
    specs = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            kind, elem = _value_type(hints[f.name])
            name = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            choices = f.metadata.get("choices")
            specs.append(FlagSpec(section, f.name, (name, *f.metadata.get("aliases", ())), kind, elem,
                                  bool(f.metadata.get("store_false")), tuple(choices) if choices else None,
                                  f.metadata.get("nargs"), _default(f)))
    return specs


SPECS = flag_specs()
SPEC_BY_DEST = {s.dest: s for s in SPECS}


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line) instead of printing the usage and exiting."""

    def error(self, message):
        raise ConfigError(message.replace("argument ", "", 1))


def _shown_default(spec: FlagSpec, help_: str) -> str:
    if spec.kind is bool:
        return f"{help_} (default: off)"
    default = " ".join(map(str, spec.default)) if isinstance(spec.default, list) else spec.default
    return f"{help_} (default: {'none' if default in (None, '') else default})"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every flag; `--help` shows each flag's default."""
    parser = _Parser(description="megatron_lite: Megatron-style GPT/Llama training", allow_abbrev=False,
                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", dest="__config", metavar="RUN.YAML",
                        help="YAML file of flags (same names); the command line overrides it")
    groups = {}
    for section, cls in SECTIONS.items():
        groups[section] = parser.add_argument_group(section)
        helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
        for spec in (s for s in SPECS if s.section == section):
            group, help_ = groups[section], _shown_default(spec, helps[spec.name])
            if spec.kind is bool:
                group.add_argument(*spec.options, dest=spec.dest, help=help_,
                                   action="store_false" if spec.store_false else "store_true")
            elif spec.kind is list:
                group.add_argument(*spec.options, dest=spec.dest, nargs=spec.nargs or "*", type=spec.elem,
                                   metavar=spec.name.upper(), help=help_)
            else:
                group.add_argument(*spec.options, dest=spec.dest, type=spec.kind, choices=spec.choices,
                                   metavar=None if spec.choices else spec.name.upper(), help=help_)
    for option in WITHOUT_EFFECT:
        parser.add_argument(option, dest="__without_effect", nargs="?", const=True, help=argparse.SUPPRESS)
    for option in UNSUPPORTED:
        parser.add_argument(option, dest="__unsupported." + option, nargs="*", help=argparse.SUPPRESS)
    return parser


def unknown_flag_error(unknown: List[str]) -> ConfigError:
    """`--hiden-size: unknown flag; did you mean --hidden-size?` for the first unknown flag."""
    flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
    if not flags:
        return ConfigError(f"unexpected value {unknown[0]!r}: values follow their flag (--flag VALUE)")
    first = flags[0]
    known = [o for spec in SPECS for o in spec.options] + ["--config"]
    near = difflib.get_close_matches(first, known, n=1, cutoff=0.6)
    others = f" (and {len(flags) - 1} more unknown flags: {' '.join(flags[1:])})" if len(flags) > 1 else ""
    hint = f"did you mean {near[0]}?" if near else "see pretrain_gpt.py --help for the flags"
    return ConfigError(f"{first}: unknown flag; {hint}{others}")


# ------------------------------------------------------------------------------------- YAML

class _Mapping(dict):
    """A YAML mapping that remembers the line of each key."""
    lines: Dict[Any, int]


def _load_yaml(path: str) -> _Mapping:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node):
        loader.flatten_mapping(node)
        out = _Mapping()
        out.lines = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            out[key] = loader.construct_object(value_node, deep=True)
            out.lines[key] = key_node.start_mark.line + 1
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    if not os.path.exists(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.load(fh, Loader=Loader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            raise ConfigError(f"{where}: YAML syntax error: {e.problem or e.context}; fix the file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: YAML error: {e}; fix the file") from None
    if raw is None:
        raw = _Mapping()
        raw.lines = {}
    if not isinstance(raw, _Mapping):
        raise ConfigError(f"{path}: the file must be a mapping of flag names to values, not a "
                          f"{type(raw).__name__}")
    return raw


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(value, kind: type, where: str, key: str):
    """A YAML scalar as `kind` (numbers may be quoted or written as YAML 1.1 reads them, e.g. 1e-5)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{where}: {key} must be {_TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")


def _yaml_values(path: str, by_key: Dict[str, Tuple[FlagSpec, bool]]) -> Tuple[Dict[str, Any], List[str]]:
    """(dest -> value, unsupported flags) of a YAML file."""
    raw = _load_yaml(path)
    entries = []   # (key, value, line)
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            entries += [(k, v, getattr(value, "lines", {}).get(k)) for k, v in value.items()]
        else:
            entries.append((key, value, raw.lines.get(key)))
    out, unsupported = {}, []
    for key, value, line in entries:
        where = f"{path}:{line}" if line else path
        name = str(key).lstrip("-").replace("_", "-")
        if "--" + name in UNSUPPORTED:
            unsupported.append("--" + name)
            continue
        if "--" + name in WITHOUT_EFFECT:
            continue
        if name not in by_key:
            near = difflib.get_close_matches(name, list(by_key), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else "use the flag names of `pretrain_gpt.py --help`"
            raise ConfigError(f"{where}: unknown key '{key}'; {hint}")
        spec, negated = by_key[name]
        if spec.kind is list:
            items = value if isinstance(value, list) else [value]
            value = [_coerce(v, spec.elem, where, str(key)) for v in items]
        elif value is None and spec.default is None:
            pass
        else:
            value = _coerce(value, spec.kind, where, str(key))
            if negated:
                value = not value
        if spec.choices and value is not None and spec.kind is not list and value not in spec.choices:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
        out[spec.dest] = value
    return out, unsupported


def _yaml_keys() -> Dict[str, Tuple[FlagSpec, bool]]:
    """YAML key (dashed) -> (spec, whether the key is a negative flag that stores False)."""
    keys = {}
    for spec in SPECS:
        keys[spec.name.replace("_", "-")] = (spec, False)
        for option in spec.options:
            keys.setdefault(option.lstrip("-"), (spec, spec.store_false))
    return keys


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """Parse Megatron-style flags (and an optional --config YAML) into a RunConfig."""
    parser = build_parser()
    ns, unknown = parser.parse_known_args(list(argv) if argv is not None else sys.argv[1:])
    if unknown:
        raise unknown_flag_error(unknown)
    ns = vars(ns)
    ns.pop("__without_effect", None)
    unsupported = [k.split(".", 1)[1] for k in list(ns) if k.startswith("__unsupported.")]
    values = {}
    config_path = ns.pop("__config", None)
    if config_path:
        from_yaml, yaml_unsupported = _yaml_values(config_path, _yaml_keys())
        values.update(from_yaml)
        unsupported = yaml_unsupported + [f for f in unsupported if f not in yaml_unsupported]
    if unsupported:
        raise ConfigError(refusal(unsupported))
    values.update({k: v for k, v in ns.items() if not k.startswith("__")})
    cfg = RunConfig()
    for dest, value in values.items():
        section, name = dest.split(".", 1)
        setattr(getattr(cfg, section), name, value)
    cfg.explicit = set(values)
    return cfg


def format_arguments(cfg: RunConfig) -> str:
    """Megatron's start-up block: every argument, sorted, with dots to a fixed column."""
    rows = sorted((spec.name, getattr(getattr(cfg, spec.section), spec.name)) for spec in SPECS)
    lines = ["------------------------ arguments ------------------------"]
    lines += [f"  {name} {'.' * max(48 - len(name), 1)} {value}" for name, value in rows]
    lines.append("-------------------- end of arguments ---------------------")
    return "\n".join(lines)


from megatron_lite.validation import pad_vocab_size, validate  # noqa: E402  (validate raises ConfigError)

__all__ = ["ConfigError", "parse_args", "validate", "pad_vocab_size", "build_parser", "format_arguments",
           "SPECS", "SPEC_BY_DEST"]
