"""Helpers for the kernel tests: fake distributions built from ``docs/plugins.md``, CLI runs.

A distribution is just a ``NAME-VERSION.dist-info`` folder (``METADATA`` + ``entry_points.txt``)
next to its module on ``sys.path``: ``importlib.metadata`` finds it exactly as it finds an
installed one, so nothing is installed. The example plugin's files are taken verbatim from the
``<!-- file: NAME -->`` blocks of the plugin-authoring page, so the page is tested too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

from kvcore.hookspecs import ENTRY_POINT_GROUP
from kvcore.plugins import PLUGINS_ENV

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DOC = REPO / "docs" / "plugins.md"
FAKE_DIST = "fake-kvcomp-plugin"
FAKE_MODULE = "fake_kvcomp_plugin"
FAKE_ENTRY_POINT = "fake"
FAKE_SCORER = "value_norm"

_FILE_BLOCK = re.compile(r"<!-- file: (?P<name>\S+) -->\n```[\w-]*\n(?P<body>.*?)\n```", re.DOTALL)


def doc_files() -> dict[str, str]:
    """``{file name: text}`` of every ``<!-- file: NAME -->`` code block in the plugin doc."""
    files = {m["name"]: m["body"] + "\n" for m in _FILE_BLOCK.finditer(PLUGIN_DOC.read_text(encoding="utf-8"))}
    assert {"pyproject.toml", f"{FAKE_MODULE}.py", "value-norm.yaml"} <= set(files), sorted(files)
    return files


def write_dist(
    root: Path,
    name: str,
    version: str,
    entry_points: dict[str, str],
    modules: dict[str, str],
    group: str = ENTRY_POINT_GROUP,
) -> Path:
    """Write ``root/<name>-<version>.dist-info`` plus ``modules`` (``{module: source}``) into ``root``.

    ``entry_points`` maps entry-point names in ``group`` (default: the components group) to their
    object references (``"module"`` or ``"module:attr"``). Returns the dist-info folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    dist_info = root / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    lines = [f"[{group}]", *(f"{ep} = {ref}" for ep, ref in entry_points.items())]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source, encoding="utf-8")
    return dist_info


def write_doc_dist(root: Path) -> Path:
    """The doc's example distribution, its metadata read from the doc's ``pyproject.toml``."""
    files = doc_files()
    project = tomllib.loads(files["pyproject.toml"])["project"]
    return write_dist(
        root,
        project["name"],
        project["version"],
        dict(project["entry-points"][ENTRY_POINT_GROUP]),
        {FAKE_MODULE: files[f"{FAKE_MODULE}.py"]},
    )



def run_kvcomp(
    *args: str, extra_path: Iterable[Path] = (), env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``kvcomp`` script in a fresh process (``KVCOMP_PLUGINS`` unset unless given)."""
    script = Path(sys.executable).with_name("kvcomp")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kvcore.cli"]
    environment = {k: v for k, v in os.environ.items() if k != PLUGINS_ENV}
    paths = [str(p) for p in extra_path] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    if paths:
        environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment.update(env or {})
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=environment, cwd=cwd, timeout=300, check=False
    )
