"""Arrows point into ``kvcore``: the kernel imports no plugin or integration, and its own
components reach it only through the ``kvcomp.plugins`` entry points."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvcore.hookspecs import ENTRY_POINT_GROUP
from kvcore.plugins import PLUGINS_ENV
from kvcore.registry import get_registry, reset_registry

from ._support import REPO

KERNEL = REPO / "kvcore"
OUTSIDE = ("kvcomp_plugins", "kvcomp_eval", "kvcomp_lm_eval")
KERNEL_MODULES = [
    "kvcore",
    "kvcore.config",
    "kvcore.registry",
    "kvcore.compressor",
    "kvcore.cache",
    "kvcore.model",
    "kvcore.pipeline",
    "kvcore.cli",
]


def _is_outside(module: str) -> bool:
    return module.split(".")[0] in OUTSIDE


def test_importing_the_kernel_loads_no_plugin_module(tmp_path: Path) -> None:
    # A fresh interpreter, started away from the repository so that its folders are not on sys.path.
    # Site hooks may import integration modules at start-up (the lm-eval .pth does); those are
    # forgotten first, so only what the kernel itself imports is counted.
    script = f"""
import importlib.util, json, sys
for name in [m for m in sys.modules if m.split(".")[0] in {OUTSIDE!r}]:
    del sys.modules[name]
import pkgutil
for name in {KERNEL_MODULES!r}:
    __import__(name)
import kvcore
for info in pkgutil.walk_packages(kvcore.__path__, "kvcore."):  # every other kernel module too
    __import__(info.name)
print(json.dumps({{
    "outside": sorted(m for m in sys.modules if m.split(".")[0] in {OUTSIDE!r}),
    "top_level": {{n: importlib.util.find_spec(n) is not None for n in ("plugins", "integrations")}},
}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["outside"] == []
    # Import names carry the project prefix: nothing called plain `plugins` or `integrations`.
    assert result["top_level"] == {"plugins": False, "integrations": False}


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, module)`` of every import statement and literal ``import_module``/``__import__`` call."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def test_no_kernel_file_imports_a_plugin_package() -> None:
    files = sorted(KERNEL.rglob("*.py"))
    assert KERNEL / "registry.py" in files
    offending = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in files
        for line, module in _imports(path)
        if _is_outside(module)
    ]
    assert offending == []


def test_the_static_check_sees_every_import_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import kvcomp_plugins.scorers\n"
        "from kvcomp_eval import metrics\n"
        "import importlib\n"
        "importlib.import_module('kvcomp_lm_eval')\n"
        "__import__('kvcomp_plugins')\n"
        "from . import sibling\n",
        encoding="utf-8",
    )
    assert [m for _, m in _imports(sample) if _is_outside(m)] == [
        "kvcomp_plugins.scorers", "kvcomp_eval", "kvcomp_lm_eval", "kvcomp_plugins"
    ]  # fmt: skip


def test_builtin_components_come_only_through_entry_points() -> None:
    eps = [
        ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.dist and ep.dist.name == "kvcomp"
    ]
    assert {"scorers", "quantizers", "propagators"} <= {ep.name for ep in eps}
    assert all(_is_outside(ep.value.split(":")[0]) for ep in eps), [ep.value for ep in eps]
    # With those entry points narrowed away, the kernel knows no component at all: nothing is
    # special-cased.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PLUGINS_ENV, "no-such-plugin")
        reset_registry()
        try:
            assert get_registry().specs() == []
        finally:
            mp.delenv(PLUGINS_ENV)
            reset_registry()
    assert {s.distribution for s in get_registry().specs()} == {"kvcomp"}
