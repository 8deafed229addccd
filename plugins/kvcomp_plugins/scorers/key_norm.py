"""Key-norm importance: tokens whose post-RoPE key has a *small* L2 norm matter more.

A. Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
https://arxiv.org/abs/2406.11430. Needs no queries at all, so it is the cheapest scorer.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from kvcomp_plugins.scorers import _common
from kvcore.types import LayerObservation


class KeyNormConfig(BaseModel):
    """:class:`KeyNormScorer` takes no parameters."""

    model_config = ConfigDict(extra="forbid", strict=True)


class KeyNormScorer:
    """Importance = ``-||k||`` of the post-RoPE key, min-max normalised per ``(batch, KV head)``."""

    def __init__(self, config: KeyNormConfig | None = None, **params: Any) -> None:
        self.config = _common.resolve_config(KeyNormConfig, config, params)

    def score(self, obs: LayerObservation) -> Tensor:
        """Importance ``[B, H_kv, N]`` float32 of every token for one layer."""
        _common.check_observation(obs)
        keys = obs.keys.float()
        # Min-max normalisation ignores a positive scale, so dividing each (batch, head) by its
        # largest magnitude changes nothing but keeps the norms from overflowing.
        scale = keys.abs().amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        neg_norm = -torch.linalg.vector_norm(keys / scale, dim=-1)
        candidates = _common.candidate_mask(obs)
        return _common.finalise(_common.minmax_normalise(neg_norm, candidates), obs)
