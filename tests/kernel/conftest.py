"""Fixtures that put fake third-party distributions on ``sys.path`` (see :mod:`._support`)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvcore.hookspecs import ENTRY_POINT_GROUP
from kvcore.plugins import PLUGINS_ENV
from kvcore.registry import reset_registry

from ._support import FAKE_MODULE, write_dist, write_doc_dist


@dataclass
class SysPathDists:
    """Puts fake distributions on ``sys.path`` and rebuilds the registry around them."""

    monkeypatch: pytest.MonkeyPatch
    tmp_path: Path
    modules: set[str]

    def add(
        self,
        folder: str,
        name: str,
        version: str,
        entry_points: dict[str, str],
        modules: dict[str, str],
        group: str = ENTRY_POINT_GROUP,
    ) -> Path:
        root = self.tmp_path / folder
        write_dist(root, name, version, entry_points, modules, group)
        self._activate(root, modules)
        return root

    def add_doc_example(self, folder: str = "doc_example") -> Path:
        root = self.tmp_path / folder
        write_doc_dist(root)
        self._activate(root, {FAKE_MODULE: ""})
        return root

    def _activate(self, root: Path, modules: dict[str, str]) -> None:
        self.modules.update(modules)
        self.monkeypatch.syspath_prepend(str(root))
        importlib.invalidate_caches()
        reset_registry()


@pytest.fixture
def sys_path_dists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[SysPathDists]:
    """Fake distributions on ``sys.path``; the registry is rebuilt before and after the test."""
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    dists = SysPathDists(monkeypatch, tmp_path, set())
    reset_registry()
    yield dists
    monkeypatch.undo()  # restore sys.path and the environment before the registry is rebuilt
    for module in dists.modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()
    reset_registry()


@pytest.fixture
def fake_plugin(sys_path_dists: SysPathDists) -> Path:
    """The doc's ``fake-kvcomp-plugin`` on ``sys.path``; returns its folder."""
    return sys_path_dists.add_doc_example()


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The built-in registry only (``KVCOMP_PLUGINS`` unset), rebuilt after the test."""
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    reset_registry()
    yield
    monkeypatch.undo()
    reset_registry()
