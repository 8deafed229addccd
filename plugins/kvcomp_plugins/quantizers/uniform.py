"""Uniform quantizer: every candidate token at one bit width, nothing dropped.

The same machinery as :mod:`.mixed_precision` with a single tier: sinks, protected tokens and
the last ``R`` tokens stay in full precision, all other tokens are packed at ``bits``.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from kvcomp_plugins.quantizers.mixed_precision import BitWidth, MixedPrecisionQuantizer, TieredQuantizerConfig


class UniformConfig(TieredQuantizerConfig):
    """One bit width for all candidate tokens."""

    bits: BitWidth = Field(4, description="Bit width of every non-residual token.")

    def tier_fractions(self) -> tuple[tuple[int, float], ...]:
        return ((self.bits, 1.0),)


class UniformQuantizer(MixedPrecisionQuantizer):
    """Stores every non-residual token at ``bits`` (fields of :class:`UniformConfig`).

    Implements :class:`kvcore.protocols.Quantizer`.
    """

    config_model: ClassVar[type[TieredQuantizerConfig]] = UniformConfig
