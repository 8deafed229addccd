"""The unified compressor: scorer -> quantizer -> propagator, one layer at a time during prefill."""

from __future__ import annotations

import time
from typing import Any

import torch

from kvcore.config import CompressionConfig
from kvcore.protocols import LayerwiseQuantizer, Propagator, Quantizer, Scorer
from kvcore.registry import ComponentRegistry, get_registry
from kvcore.types import CompressedLayer, LayerObservation, LayerResult

UNCOMPRESSED_STORAGE_DTYPE = torch.float16
"""Storage dtype of the KV when no quantizer is configured (what an fp16 cache would hold)."""


class RealTimePrefillCompressor:
    """Composes the three components for one layer of prefill.

    Any component may be ``None`` (the ``none`` component): no scorer means all tokens are equally
    important, no quantizer keeps every token at fp16, no propagator lets every token continue.
    """

    def __init__(
        self,
        scorer: Scorer | None = None,
        quantizer: Quantizer | None = None,
        propagator: Propagator | None = None,
        *,
        window_size: int = 32,
        n_sink: int = 4,
    ) -> None:
        self.scorer = scorer
        self.quantizer = quantizer
        self.propagator = propagator
        self.window_size = window_size
        self.n_sink = n_sink

    @classmethod
    def from_config(
        cls, config: CompressionConfig, registry: ComponentRegistry | None = None
    ) -> "RealTimePrefillCompressor":
        """Build every component named by ``config`` (validated before anything is built)."""
        registry = registry or get_registry()
        params = config.validate_components(registry)
        built: dict[str, Any] = {
            kind: registry.create(kind, section.name, params[kind]) for kind, section in config.sections().items()
        }
        return cls(
            built["scorer"], built["quantizer"], built["propagator"], window_size=config.window_size, n_sink=config.n_sink
        )

    def check_model(self, num_layers: int, head_dim: int) -> None:
        """Ask each component that can (optional ``check_model`` method) whether it fits the model.

        Raises ``ValueError`` before any prefill work, e.g. for a propagation schedule naming a layer
        the model does not have, or a quantisation group that does not divide ``head_dim``.
        """
        for component in (self.scorer, self.quantizer, self.propagator):
            check = getattr(component, "check_model", None)
            if check is not None:
                check(num_layers=num_layers, head_dim=head_dim)

    def _needs_scores(self, layer_idx: int) -> bool:
        if self.scorer is None:
            return False
        propagates = self.propagator is not None and self.propagator.acts_after(layer_idx)
        return self.quantizer is not None or propagates

    def compress_layer_kv_cache(self, obs: LayerObservation) -> LayerResult:
        """Score, store and (maybe) thin one prefill layer.

        Args:
            obs: the layer's keys/values ``[B, H_kv, N, d]``, window queries and positions.

        Returns:
            the compressed layer (the caller may then free ``obs.keys``/``obs.values``) and the
            indices ``[B, n_keep]`` of the tokens that continue to the next layer (or ``None``).
        """
        timings: dict[str, float] = {}
        start = time.perf_counter()
        scores = self.scorer.score(obs) if self._needs_scores(obs.layer_idx) else None
        timings["score_s"] = time.perf_counter() - start

        start = time.perf_counter()
        protected = obs.protected_mask
        if self.quantizer is None:
            compressed = _uncompressed_layer(obs)
        else:
            quantizer = self.quantizer
            if isinstance(quantizer, LayerwiseQuantizer):
                quantizer = quantizer.for_layer(obs.layer_idx)
            compressed = quantizer.compress(obs.keys, obs.values, obs.positions, scores, protected)
        timings["quantize_s"] = time.perf_counter() - start

        keep_idx = None
        if self.propagator is not None and self.propagator.acts_after(obs.layer_idx):
            start = time.perf_counter()
            keep_idx = self.propagator.select(obs.layer_idx, scores, obs.positions, protected, obs.n_original)
            timings["propagate_s"] = time.perf_counter() - start
        return LayerResult(compressed=compressed, keep_idx=keep_idx, scores=scores, timings_s=timings)


def _uncompressed_layer(obs: LayerObservation) -> CompressedLayer:
    """Every token in the full-precision residual, in the uncompressed storage dtype."""
    b, h_kv, n, _ = obs.keys.shape
    positions = obs.positions.to(torch.int32)[:, None, :].expand(b, h_kv, n).contiguous()
    return CompressedLayer(
        tiers=[],
        residual_keys=obs.keys.to(UNCOMPRESSED_STORAGE_DTYPE),
        residual_values=obs.values.to(UNCOMPRESSED_STORAGE_DTYPE),
        residual_positions=positions,
    )
