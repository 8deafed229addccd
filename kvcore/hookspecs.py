"""Hook specifications: the contract between kvcomp and its plugins.

A plugin is a module (or object) whose functions are marked with :data:`hookimpl`, exposed
through one of two entry-point groups:

- ``kvcomp.components`` (:data:`ENTRY_POINT_GROUP`): modules the component registry loads, for
  ``register_components``; they may add commands too. One that fails to import is an error.
- ``kvcomp.commands`` (:data:`COMMANDS_ENTRY_POINT_GROUP`): modules only the CLI loads, for
  ``register_commands``. One that fails to import is left out with a warning naming it, so the
  other commands keep working; the registry never imports them.

The old shared group ``kvcomp.plugins`` (:data:`LEGACY_ENTRY_POINT_GROUP`) is still read, as
both, with a :class:`DeprecationWarning`; it goes away in the next release. The built-in
components use exactly the same hooks as a third-party distribution; the kernel never
special-cases them.
"""

from __future__ import annotations

import argparse
from typing import Callable

import pluggy

PROJECT = "kvcomp"
ENTRY_POINT_GROUP = "kvcomp.components"
"""Entry points of component plugins (loaded by the registry and the CLI)."""
COMMANDS_ENTRY_POINT_GROUP = "kvcomp.commands"
"""Entry points of CLI-command plugins (loaded by the CLI only, leniently)."""
LEGACY_ENTRY_POINT_GROUP = "kvcomp.plugins"
"""The group both kinds shared before 0.2; still read, deprecated."""

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_components(register: Callable[..., None]) -> None:
    """Register compression components.

    Called once per plugin when the component registry is first built. Call
    ``register(kind, name, factory, config_model=None, description="")`` for each component:

    - ``kind``: ``"scorer"``, ``"quantizer"`` or ``"propagator"``.
    - ``name``: the name configs select it by (``scorer: {name: NAME, ...}``); unique per kind.
    - ``factory``: callable taking the validated parameters as keyword arguments and returning
      an object that satisfies the kind's protocol (:mod:`kvcore.protocols`).
    - ``config_model``: optional pydantic model of the parameters; when given, config
      sections are validated against it (unknown or ill-typed fields are refused).

    Every implementation is called; return values are ignored.
    """


@hookspec
def register_commands(add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add sub-commands to the ``kvcomp`` CLI.

    Called once when the CLI is built. ``add_command(name, help, handler, parent=None)`` adds the
    command and returns its ``argparse.ArgumentParser`` to add arguments to; ``handler(args) ->
    int`` runs the command and returns the exit status. For a command with sub-commands, add
    the group with ``parent_parser.add_subparsers()`` and pass it as ``parent``. Every
    implementation is called; return values are ignored.

    An implementation that still takes the former first argument ``subparsers`` keeps working
    for one release, with a :class:`DeprecationWarning`.
    """

