"""Prompt-guided importance: window attention, content relevance and a structural prior.

``I = alpha * A + beta * S + gamma * P`` per layer, KV head and token, each term min-max
normalised to ``[0, 1]`` over the candidate tokens of its ``(batch, KV head)``:

- ``A`` (prompt attention): mean softmax attention from the prompt window's queries (the
  group's ``g`` query heads, causal by original position), pooled along the tokens so the
  neighbours of a hit survive (the observation behind SnapKV, https://arxiv.org/abs/2404.14469).
- ``S`` (content relevance): cosine between the token's pre-RoPE key and the group's mean
  pre-RoPE window query: what the token says, independent of where it sits.
- ``P`` (structural prior): 1 for attention sinks, else exponential recency.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from kvcomp_plugins.scorers import _common
from kvcore.types import LayerObservation


class PromptGuidedConfig(BaseModel):
    """Parameters of :class:`PromptGuidedScorer`.

    The default weights lean on the window attention: scoring by attention from the question
    carried the passkey result in the design measurements, while content relevance and the
    recency prior are weaker signals that mostly break ties among low-attention tokens.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    alpha: float = Field(0.6, ge=0, allow_inf_nan=False, description="weight of the window attention term")
    beta: float = Field(0.2, ge=0, allow_inf_nan=False, description="weight of the content relevance term")
    gamma: float = Field(0.2, ge=0, allow_inf_nan=False, description="weight of the structural prior term")
    pool_kernel: _common.PoolKernel = Field(7, description="odd width of the token pool; 1 = no pooling")
    pool: _common.PoolMode = Field("max", description="pooling of the attention term: 'max' or 'avg'")
    recency_fraction: _common.RecencyFraction = Field(
        0.1, description="recency time constant as a fraction of the prompt length (> 0)"
    )

    @model_validator(mode="after")
    def _positive_sum(self) -> "PromptGuidedConfig":
        if self.alpha + self.beta + self.gamma <= 0:
            raise ValueError(
                f"alpha + beta + gamma must be > 0 (weights are normalised to sum to 1), "
                f"got alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}"
            )
        return self


class PromptGuidedScorer:
    """Importance from the prompt window's attention, content relevance and position.

    Parameters
    ----------
    config:
        A :class:`PromptGuidedConfig`; or pass its fields as keywords instead.

    ``score`` returns ``[B, H_kv, N]`` float32: candidates in ``[0, 1]``, protected tokens
    (sinks, window) :data:`~kvcomp_plugins.scorers._common.PROTECTED_SCORE`, padding
    :data:`~kvcomp_plugins.scorers._common.PADDING_SCORE`. Terms with zero weight are not computed.
    """

    def __init__(self, config: PromptGuidedConfig | None = None, **params: Any) -> None:
        self.config = _common.resolve_config(PromptGuidedConfig, config, params)
        total = self.config.alpha + self.config.beta + self.config.gamma
        self.weights: tuple[float, float, float] = (
            self.config.alpha / total,
            self.config.beta / total,
            self.config.gamma / total,
        )

    def score(self, obs: LayerObservation) -> Tensor:
        """Importance ``[B, H_kv, N]`` float32 of every token for one layer."""
        _common.check_observation(obs)
        cfg = self.config
        candidates = _common.candidate_mask(obs)
        w_attn, w_content, w_prior = self.weights
        b, h_kv, n, _ = obs.keys.shape
        total = torch.zeros((b, h_kv, n), dtype=torch.float32, device=obs.keys.device)
        if w_attn > 0:
            attn = _common.pool_tokens(_common.window_attention(obs), candidates, cfg.pool_kernel, cfg.pool)
            total = total + w_attn * _common.minmax_normalise(attn, candidates)
        if w_content > 0:
            total = total + w_content * _common.minmax_normalise(_common.content_relevance(obs), candidates)
        if w_prior > 0:
            prior = _common.structural_prior(obs, cfg.recency_fraction)
            total = total + w_prior * _common.minmax_normalise(prior, candidates)
        return _common.finalise(total, obs)
