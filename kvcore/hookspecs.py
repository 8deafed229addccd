"""Hook specifications: the contract between kvcomp and its plugins.

A plugin is a module (or object) exposed through the ``kvcomp.plugins`` entry-point group
whose functions are marked with :data:`hookimpl`. The built-in components use exactly the
same hooks as a third-party distribution; the kernel never special-cases them.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import pluggy

PROJECT = "kvcomp"
ENTRY_POINT_GROUP = "kvcomp.plugins"

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
def register_commands(subparsers: argparse._SubParsersAction, add_command: Callable[..., Any]) -> None:
    """Add sub-commands to the ``kvcomp`` CLI.

    Called once when the CLI is built. ``add_command(name, help, handler)`` returns an
    ``argparse.ArgumentParser`` to add arguments to; ``handler(args) -> int`` runs the command
    and returns the exit status. Every implementation is called; return values are ignored.
    """
