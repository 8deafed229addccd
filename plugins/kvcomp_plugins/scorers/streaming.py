"""StreamingLLM-style importance: attention sinks plus recency, nothing else.

G. Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
https://arxiv.org/abs/2309.17453. The ``P`` term of the prompt-guided scorer alone.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from kvcomp_plugins.scorers import _common
from kvcore.types import LayerObservation


class StreamingConfig(BaseModel):
    """Parameters of :class:`StreamingScorer`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    recency_fraction: _common.RecencyFraction = Field(
        0.1, description="recency time constant as a fraction of the prompt length (> 0)"
    )


class StreamingScorer:
    """Importance = ``exp(-age / tau)`` (sinks 1), ``[B, H_kv, N]`` float32, same for every head.

    Parameters
    ----------
    config:
        A :class:`StreamingConfig`; or pass its fields as keywords instead.
    """

    def __init__(self, config: StreamingConfig | None = None, **params: Any) -> None:
        self.config = _common.resolve_config(StreamingConfig, config, params)

    def score(self, obs: LayerObservation) -> Tensor:
        """Importance ``[B, H_kv, N]`` float32 of every token for one layer."""
        _common.check_observation(obs)
        prior = _common.structural_prior(obs, self.config.recency_fraction)
        return _common.finalise(_common.minmax_normalise(prior, _common.candidate_mask(obs)), obs)
