"""Built-in quantizers (registered via the kvcomp.plugins entry point 'quantizers').

- ``mixed_precision``: :class:`MixedPrecisionQuantizer`, importance-ranked 8/4/2-bit tiers + drop.
- ``uniform``: :class:`UniformQuantizer`, one bit width for every non-residual token.

Both pack codes for real (uint8, several codes per byte) with a pure-torch reference kernel and
byte-identical Triton kernels (imported only when used).
"""

from __future__ import annotations

from typing import Callable

from kvcore.hookspecs import hookimpl
from kvcomp_plugins.quantizers.mixed_precision import MixedPrecisionConfig, MixedPrecisionQuantizer
from kvcomp_plugins.quantizers.uniform import UniformConfig, UniformQuantizer

__all__ = ["MixedPrecisionConfig", "MixedPrecisionQuantizer", "UniformConfig", "UniformQuantizer"]


@hookimpl
def register_components(register: Callable[..., None]) -> None:
    register(
        "quantizer",
        "mixed_precision",
        MixedPrecisionQuantizer,
        MixedPrecisionConfig,
        "importance-ranked tiers: top tokens at 8 bit, next at 4, next at 2, the rest dropped (packed codes)",
    )
    register(
        "quantizer",
        "uniform",
        UniformQuantizer,
        UniformConfig,
        "every non-residual token at one bit width (2, 4 or 8; packed codes), nothing dropped",
    )
