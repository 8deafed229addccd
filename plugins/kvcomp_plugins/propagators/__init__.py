"""Built-in propagators (registered via the kvcomp.plugins entry point 'propagators')."""

from __future__ import annotations

from typing import Callable

from kvcomp_plugins.propagators.selective import SelectiveConfig, SelectivePropagator
from kvcore.hookspecs import hookimpl

__all__ = ["SelectiveConfig", "SelectivePropagator", "register_components"]


@hookimpl
def register_components(register: Callable[..., None]) -> None:
    """Register the built-in selective propagator."""
    register(
        "propagator",
        "selective",
        SelectivePropagator,
        SelectiveConfig,
        "after scheduled layers only the protected and highest-scoring tokens continue",
    )
