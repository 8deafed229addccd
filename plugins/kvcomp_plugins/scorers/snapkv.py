"""SnapKV-style importance: pooled attention from the prompt window only.

Y. Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
https://arxiv.org/abs/2404.14469. This is the ``A`` term of the prompt-guided scorer alone,
which makes ablations of the other terms honest.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from kvcomp_plugins.scorers import _common
from kvcore.types import LayerObservation


class SnapKVConfig(BaseModel):
    """Parameters of :class:`SnapKVScorer`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pool_kernel: _common.PoolKernel = Field(7, description="odd width of the token pool; 1 = no pooling")
    pool: _common.PoolMode = Field("max", description="pooling: 'max' or 'avg'")


class SnapKVScorer:
    """Importance = pooled mean attention from the window queries, ``[B, H_kv, N]`` float32.

    Parameters
    ----------
    config:
        A :class:`SnapKVConfig`; or pass its fields as keywords instead.
    """

    def __init__(self, config: SnapKVConfig | None = None, **params: Any) -> None:
        self.config = _common.resolve_config(SnapKVConfig, config, params)

    def score(self, obs: LayerObservation) -> Tensor:
        """Importance ``[B, H_kv, N]`` float32 of every token for one layer."""
        _common.check_observation(obs)
        candidates = _common.candidate_mask(obs)
        attn = _common.pool_tokens(
            _common.window_attention(obs), candidates, self.config.pool_kernel, self.config.pool
        )
        return _common.finalise(_common.minmax_normalise(attn, candidates), obs)
