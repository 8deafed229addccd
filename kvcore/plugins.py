"""The plugin manager: loads every distribution that registered a ``kvcomp.plugins`` entry point.

Set ``KVCOMP_PLUGINS`` to a comma-separated list of entry-point names (``scorers``) or
distribution-qualified names (``kvcomp:scorers``) to load only those (handy for tests and
debugging); leave it unset to load all.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Any

import pluggy

from kvcore import hookspecs

PLUGINS_ENV = "KVCOMP_PLUGINS"


class PluginLoadError(RuntimeError):
    """An entry-point plugin could not be imported; the message names it and its distribution."""


@dataclass(frozen=True)
class PluginInfo:
    """Where a loaded plugin came from."""

    name: str
    distribution: str
    module: str


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the provenance (distribution, module) of each plugin."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}

    def load_entry_points(self, allowed: set[str] | None = None) -> None:
        """Load the ``kvcomp.plugins`` entry points.

        ``allowed`` narrows loading to entry points whose name (``scorers``) or
        distribution-qualified name (``kvcomp:scorers``) it contains; ``None`` loads all.
        """
        for ep in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            dist = (ep.dist.metadata["Name"] if ep.dist is not None else None) or "unknown distribution"
            qualified = f"{dist}:{ep.name}"
            if allowed is not None and ep.name not in allowed and qualified not in allowed:
                continue
            module = ep.value.split(":")[0]
            name = ep.name
            if self.get_plugin(name) is not None:
                known = self._infos.get(name)
                if known is not None and (known.distribution, known.module) == (dist, module):
                    continue  # the same distribution found twice on sys.path
                # Entry-point names are only unique within one distribution; a second
                # distribution reusing one (say ``scorers``) must still load.
                name = qualified
                if self.get_plugin(name) is not None:
                    continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must say who it is
                raise PluginLoadError(
                    f"kvcomp plugin {ep.name!r} from distribution {dist!r} failed to load "
                    f"({ep.value}): {type(exc).__name__}: {exc}; leave it out with {PLUGINS_ENV}"
                ) from exc
            self.register(plugin, name=name)
            self._infos[name] = PluginInfo(name, dist, module)

    def info(self, plugin_name: str) -> PluginInfo:
        """Provenance of a plugin; one registered by hand reports ``(registered in-process)``."""
        if plugin_name in self._infos:
            return self._infos[plugin_name]
        plugin: Any = self.get_plugin(plugin_name)
        module = getattr(plugin, "__name__", type(plugin).__module__)
        return PluginInfo(plugin_name, "(registered in-process)", module)


def allowed_plugin_names() -> set[str] | None:
    """Entry-point names ``KVCOMP_PLUGINS`` narrows loading to, or ``None`` for all."""
    raw = os.environ.get(PLUGINS_ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def create_plugin_manager() -> PluginManager:
    """A fresh manager with every allowed entry-point plugin loaded."""
    pm = PluginManager()
    pm.load_entry_points(allowed_plugin_names())
    return pm


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (built on first use)."""
    return create_plugin_manager()
