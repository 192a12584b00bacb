"""The command-line tools are modules of megatron_lite.tools: each runs as `python -m megatron_lite.tools.NAME`,
through its console script, and through the thin wrapper at its old path under tools/, and none edits sys.path."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# module -> (the wrapper at the old path, the console script)
TOOLS = {
    "convert": ("tools/checkpoint/convert.py", "megatron-lite-convert"),
    "inspect_checkpoint": ("tools/checkpoint/inspect_checkpoint.py", "megatron-lite-inspect-checkpoint"),
    "compare_logs": ("tools/compare_logs.py", "megatron-lite-compare-logs"),
    "generate": ("tools/generate.py", "megatron-lite-generate"),
    "preprocess_data": ("tools/preprocess_data.py", "megatron-lite-preprocess-data"),
}


def _help(command):
    return subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_module_and_wrapper_both_run(name):
    for command in (["-m", f"megatron_lite.tools.{name}"], [os.path.join(REPO, TOOLS[name][0])]):
        done = _help(command)
        assert done.returncode == 0, (command, done.stderr)
        assert "usage:" in done.stdout.lower() and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_wrapper_only_calls_the_module(name):
    wrapper = os.path.join(REPO, TOOLS[name][0])
    with open(wrapper) as f:
        source = f.read()
    assert "sys.path" not in source
    body = ast.parse(source).body
    assert isinstance(body[0], ast.Expr) and f"megatron_lite.tools.{name}" in body[0].value.value   # docstring
    imports = [(n.module, [a.name for a in n.names]) for n in body if isinstance(n, ast.ImportFrom)]
    assert imports == [(f"megatron_lite.tools.{name}", ["main"])]
    assert ast.unparse(body[-1]) == "sys.exit(main())"


def test_no_tool_edits_sys_path_or_shadows_the_standard_library():
    tool_files = [os.path.join(root, n) for top in ("tools", os.path.join("megatron_lite", "tools"))
                  for root, _, files in os.walk(os.path.join(REPO, top)) for n in files if n.endswith(".py")]
    assert len(tool_files) >= 11
    for path in tool_files:
        with open(path) as f:
            assert "sys.path" not in f.read(), path
    stdlib = set(sys.stdlib_module_names)
    for root in ("tools", os.path.join("tools", "checkpoint")):
        for n in os.listdir(os.path.join(REPO, root)):
            assert not (n.endswith(".py") and n[:-3] in stdlib), os.path.join(root, n)


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_console_script_names_the_module_main(name):
    script = TOOLS[name][1]
    [ep] = [ep for ep in entry_points(group="console_scripts") if ep.name == script] or [None]
    if ep is None:
        pytest.skip(f"{script} is not installed (pip install -e .)")
    assert ep.value == f"megatron_lite.tools.{name}:main"
    assert ep.load() is importlib.import_module(f"megatron_lite.tools.{name}").main
