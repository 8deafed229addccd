"""The three component contracts. Plugins implement them; the kernel only calls them.

A component is any object with the right methods (structural typing): no base class to
inherit, so a third-party plugin needs nothing from kvcomp but these signatures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from kvcore.decode_attention import DensePart
from kvcore.types import CompressedLayer, KVTier, LayerObservation, QuantizedTensor


@runtime_checkable
class Scorer(Protocol):
    """Rates how important each context token is, per layer and KV head."""

    def score(self, obs: LayerObservation) -> Tensor:
        """Return importance ``[B, H_kv, N]`` float32; higher is more important.

        Must be finite for real tokens; padding slots may be anything (callers mask them).
        Must not build the full ``N x N`` attention matrix: ``W x N`` per layer is the budget.
        """
        ...


@runtime_checkable
class Quantizer(Protocol):
    """Stores one layer's K/V: mixed-precision tiers plus a full-precision residual."""

    residual_length: int
    """Most recent tokens kept in full precision (R); the decode buffer flushes past it."""

    flush_tokens: int
    """How many of the oldest residual tokens are quantised at once when decoding overflows R."""

    def compress(
        self,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        scores: Tensor | None,
        protected: Tensor,
    ) -> CompressedLayer:
        """Compress a whole prefill layer.

        Args:
            keys: post-RoPE keys ``[B, H_kv, N, d]``.
            values: values ``[B, H_kv, N, d]``.
            positions: original positions ``[B, N]`` int64, ``-1`` for padding.
            scores: importance ``[B, H_kv, N]`` float32, or ``None`` (all tokens equal).
            protected: ``[B, N]`` bool; these tokens (sinks, prompt window) stay full precision.
        """
        ...

    def quantize_block(self, keys: Tensor, values: Tensor, positions: Tensor) -> KVTier:
        """Quantise ``[B, H_kv, n, d]`` tokens that overflowed the decode residual buffer.

        ``positions`` is int32 ``[B, H_kv, n]``.
        """
        ...

    def dequantize(self, tensor: QuantizedTensor, dtype: torch.dtype) -> Tensor:
        """Unpack and dequantise to a dense ``[B, H_kv, n, d]`` tensor of ``dtype``."""
        ...


@runtime_checkable
class TierAttention(Protocol):
    """Optional quantizer capability: decode attention read straight from packed tiers.

    A quantizer that has it lets the decode path skip building a dense dequantised copy of its
    tiers at every step; one without it still works (its tiers are dequantised, one part at a
    time, through :meth:`Quantizer.dequantize`).
    """

    def attend(
        self, rows: Tensor, tiers: Sequence[KVTier], dense: DensePart, padding: Sequence[Tensor | None] | None = None
    ) -> Tensor:
        """Attention of query ``rows [B, H_kv, r, d]`` over every token of ``tiers`` and of ``dense``.

        Args:
            rows: float32, already multiplied by the softmax scale; the query heads of one KV head
                are folded into the rows.
            tiers: quantised tiers of one layer (all strictly before the queries: no causal mask).
            dense: the layer's full-precision tokens (prefill residual and decoded tokens) with
                their mask; every row sees at least one of them (the query's own token).
            padding: per tier, bool ``[B, H_kv, 1, n]`` (True = padding slot, never attended) or ``None``.

        Returns:
            the output ``[B, H_kv, r, d]``, float32: one softmax over all those tokens.
        """
        ...


@runtime_checkable
class LayerwiseQuantizer(Protocol):
    """Optional quantizer capability: settings that differ from layer to layer.

    During prefill the compressor asks for the quantizer of each layer before compressing it;
    decoding (flushes, attention) always goes through the quantizer itself.
    """

    def for_layer(self, layer_idx: int) -> Quantizer:
        """The quantizer that compresses the prefill K/V of decoder layer ``layer_idx``."""
        ...


@runtime_checkable
class Propagator(Protocol):
    """Decides which tokens continue through the residual stream after a layer."""

    def acts_after(self, layer_idx: int) -> bool:
        """True if :meth:`select` may drop tokens after this layer."""
        ...

    def select(
        self,
        layer_idx: int,
        scores: Tensor | None,
        positions: Tensor,
        protected: Tensor,
        n_original: int,
    ) -> Tensor | None:
        """Pick the tokens that continue after ``layer_idx``.

        Args:
            scores: importance ``[B, H_kv, N]`` (``None``: prefer recent tokens).
            positions: original positions ``[B, N]`` int64, ``-1`` for padding.
            protected: ``[B, N]`` bool, tokens that must continue (sinks, prompt window).
            n_original: prompt length before any propagation; keep ratios refer to it.

        Returns:
            ``None`` if all tokens continue, else sorted int64 indices ``[B, n_keep]`` into ``N``
            (same ``n_keep`` for the whole batch; padding is dropped first).
        """
        ...


COMPONENT_KINDS: dict[str, type] = {"scorer": Scorer, "quantizer": Quantizer, "propagator": Propagator}
"""Kind name -> protocol; the kinds a plugin may register."""
