"""Random importance: the floor every real scorer must beat."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from kvcomp_plugins.scorers import _common
from kvcore.types import LayerObservation

_MIX = 0x9E3779B97F4A7C15
"""Odd 64-bit constant (golden ratio) that spreads nearby seeds far apart before adding the layer."""


class RandomConfig(BaseModel):
    """Parameters of :class:`RandomScorer`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed; scores depend only on (seed, layer index, shape)")


class RandomScorer:
    """Uniform ``[0, 1)`` scores, ``[B, H_kv, N]`` float32, reproducible per ``(seed, layer_idx)``.

    Draws from a private CPU generator, so neither the global RNG state nor the device changes
    the scores, and scoring never advances the global RNG.
    """

    def __init__(self, config: RandomConfig | None = None, **params: Any) -> None:
        self.config = _common.resolve_config(RandomConfig, config, params)

    def score(self, obs: LayerObservation) -> Tensor:
        """Importance ``[B, H_kv, N]`` float32 of every token for one layer."""
        _common.check_observation(obs)
        generator = torch.Generator(device="cpu")
        generator.manual_seed((self.config.seed * _MIX + obs.layer_idx) % (1 << 63))
        b, h_kv, n, _ = obs.keys.shape
        scores = torch.rand((b, h_kv, n), generator=generator, dtype=torch.float32)
        return _common.finalise(scores.to(obs.keys.device), obs)
