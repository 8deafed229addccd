"""The plugin managers: components from ``kvcomp.components``, CLI commands from ``kvcomp.commands``.

:func:`get_plugin_manager` (what the component registry uses) loads the component group only,
so building the registry imports no command plugin and no evaluation code.
:func:`create_command_plugin_manager` (what the CLI uses) loads the component group as well
(a component module may add commands) plus the commands group, where a module that fails to
import is left out with a :class:`PluginLoadWarning` naming it: the other commands still work.
Entry points of the deprecated ``kvcomp.plugins`` group are read as both kinds, with a
:class:`LegacyEntryPointWarning`.

Set ``KVCOMP_PLUGINS`` to a comma-separated list of entry-point names (``scorers``) or
distribution-qualified names (``kvcomp:scorers``) to load only those (handy for tests and
debugging); leave it unset to load all.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pluggy

from kvcore import hookspecs

PLUGINS_ENV = "KVCOMP_PLUGINS"


class PluginLoadError(RuntimeError):
    """An entry-point plugin could not be imported; the message names it and its distribution."""


class PluginLoadWarning(UserWarning):
    """A command plugin could not be imported and was left out; the message names it."""


class LegacyEntryPointWarning(DeprecationWarning):
    """A plugin is registered in the deprecated ``kvcomp.plugins`` entry-point group."""


@dataclass(frozen=True)
class PluginInfo:
    """Where a loaded plugin came from."""

    name: str
    distribution: str
    module: str


class _LegacyCommands:
    """Adapts a ``register_commands(subparsers, add_command)`` implementation to the current hook."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function
        self.__name__ = getattr(function, "__module__", None) or "legacy plugin"

    @hookspecs.hookimpl
    def register_commands(self, add_command: Any) -> None:
        self._function(subparsers=getattr(add_command, "subparsers", None), add_command=add_command)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the provenance (distribution, module) of each plugin."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}

    def load_entry_points(
        self, allowed: set[str] | None = None, group: str = hookspecs.ENTRY_POINT_GROUP, lenient: bool = False
    ) -> None:
        """Load the entry points of ``group``.

        ``allowed`` narrows loading to entry points whose name (``scorers``) or
        distribution-qualified name (``kvcomp:scorers``) it contains; ``None`` loads all. A
        plugin that fails to import raises :class:`PluginLoadError`, or with ``lenient`` is
        left out with a :class:`PluginLoadWarning`.
        """
        for ep in importlib.metadata.entry_points(group=group):
            dist = (ep.dist.metadata["Name"] if ep.dist is not None else None) or "unknown distribution"
            qualified = f"{dist}:{ep.name}"
            if allowed is not None and ep.name not in allowed and qualified not in allowed:
                continue
            module = ep.value.split(":")[0]
            name = ep.name
            if self.get_plugin(name) is not None:
                known = self._infos.get(name)
                if known is not None and (known.distribution, known.module) == (dist, module):
                    continue  # the same distribution found twice on sys.path, or in two groups
                # Entry-point names are only unique within one distribution; a second
                # distribution reusing one (say ``scorers``) must still load.
                name = qualified
                if self.get_plugin(name) is not None:
                    continue
            if group == hookspecs.LEGACY_ENTRY_POINT_GROUP:
                warnings.warn(
                    f"kvcomp plugin {ep.name!r} from distribution {dist!r} uses the entry-point group "
                    f"{group!r}, which goes away in the next release; declare it under "
                    f"{hookspecs.ENTRY_POINT_GROUP!r} (components) or {hookspecs.COMMANDS_ENTRY_POINT_GROUP!r} "
                    "(CLI commands) instead (docs/plugins.md, 'Migrating')",
                    LegacyEntryPointWarning,
                    stacklevel=2,
                )
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must say who it is
                message = (
                    f"kvcomp plugin {ep.name!r} from distribution {dist!r} failed to load "
                    f"({ep.value}): {type(exc).__name__}: {exc}"
                )
                if not lenient:
                    raise PluginLoadError(f"{message}; leave it out with {PLUGINS_ENV}") from exc
                warnings.warn(f"{message}; its commands are left out", PluginLoadWarning, stacklevel=2)
                continue
            self._register_plugin(plugin, name)
            self._infos[name] = PluginInfo(name, dist, module)

    def _register_plugin(self, plugin: Any, name: str) -> None:
        old = getattr(plugin, "register_commands", None)
        if old is not None and "subparsers" in inspect.signature(old).parameters:
            warnings.warn(
                f"kvcomp plugin {name!r}: register_commands(subparsers, add_command) is deprecated; "
                "take add_command only (docs/plugins.md, 'Migrating')",
                LegacyEntryPointWarning,
                stacklevel=3,
            )
            # The module's other hooks register as they are; its commands go through the adapter.
            self.register(_LegacyCommands(old), name=f"{name}:register_commands")
            self.register(_WithoutCommands(plugin), name=name)
            return
        self.register(plugin, name=name)

    def info(self, plugin_name: str) -> PluginInfo:
        """Provenance of a plugin; one registered by hand reports ``(registered in-process)``."""
        plugin_name = plugin_name.removesuffix(":register_commands")
        if plugin_name in self._infos:
            return self._infos[plugin_name]
        plugin: Any = self.get_plugin(plugin_name)
        module = getattr(plugin, "__name__", type(plugin).__module__)
        return PluginInfo(plugin_name, "(registered in-process)", module)


class _WithoutCommands:
    """A plugin's hooks other than ``register_commands`` (registered through :class:`_LegacyCommands`)."""

    def __init__(self, plugin: Any) -> None:
        self.__name__ = getattr(plugin, "__name__", type(plugin).__module__)
        components = getattr(plugin, "register_components", None)
        if components is not None:
            self.register_components = components


def allowed_plugin_names() -> set[str] | None:
    """Entry-point names ``KVCOMP_PLUGINS`` narrows loading to, or ``None`` for all."""
    raw = os.environ.get(PLUGINS_ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def create_plugin_manager() -> PluginManager:
    """A fresh manager with every allowed component plugin loaded (and legacy-group plugins)."""
    pm = PluginManager()
    allowed = allowed_plugin_names()
    pm.load_entry_points(allowed, hookspecs.ENTRY_POINT_GROUP)
    pm.load_entry_points(allowed, hookspecs.LEGACY_ENTRY_POINT_GROUP)
    return pm


def create_command_plugin_manager() -> PluginManager:
    """A fresh manager for the CLI: the component plugins, then the command plugins (leniently)."""
    pm = create_plugin_manager()
    pm.load_entry_points(allowed_plugin_names(), hookspecs.COMMANDS_ENTRY_POINT_GROUP, lenient=True)
    return pm


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> PluginManager:
    """The process-wide component plugin manager (built on first use)."""
    return create_plugin_manager()
