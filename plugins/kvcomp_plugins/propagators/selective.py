"""Token-selective propagation: after chosen layers only the most important tokens continue.

Later layers then run their prefill on fewer tokens, which is where the time saving comes
from. Kept tokens keep their original positions (the caller gathers ``positions`` with the
returned indices), so RoPE still sees where each token was.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from kvcore.config import MAX_TOKEN_COUNT, layer_index_keys, refuse_missing_layers
from kvcore.types import PADDING_POSITION

_TIER_PROTECTED, _TIER_REAL, _TIER_PADDING, _TIER_SURPLUS = 3, 2, 1, 0


class SelectiveConfig(BaseModel):
    """Parameters of :class:`SelectivePropagator`.

    ``keep_ratio_by_layer`` maps a layer index to the fraction of the *original* prompt tokens
    that continue after that layer, e.g. ``{8: 0.5, 16: 0.25}``. Layer keys are integers >= 0
    (digit strings such as ``"8"``, as JSON writes keys, are read as integers); ratios lie in
    ``(0, 1]`` and never grow with the layer.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    keep_ratio_by_layer: dict[int, float] = Field(
        description="layer index -> fraction of the original prompt tokens kept after it"
    )
    aggregation: Literal["mean", "max"] = Field("mean", description="how scores are combined over KV heads")
    min_keep_tokens: int = Field(
        0,
        ge=0,
        le=MAX_TOKEN_COUNT,
        description="never thin below this many tokens: prompts up to this length are not thinned at all",
    )
    """Short prompts gain little prefill time from thinning and lose the most fidelity (a quarter
    of 500 tokens leaves too little context for later layers), so a floor keeps them whole while
    long prompts still follow the ratios."""
    keep_first_tokens: int = Field(
        0,
        ge=0,
        le=MAX_TOKEN_COUNT,
        description="the tokens at prompt positions below this always continue, like protected ones",
    )
    """The start of a prompt holds the chat template's system header, the task's instruction and
    the opening of the document; attention from the question at the end rates them low (the
    question attends to content), yet every later layer reads them. Keeping the first 128 cut
    `fast`'s KL@8 on multi_news report rows from 0.100 to 0.026 (2-4k tokens) and from 0.131 to
    0.056 (1-1.5k) at the same token counts; 256 and 512 left too few slots to the scores on
    shorter prompts (docs/benchmarks.md)."""

    _layer_keys = field_validator("keep_ratio_by_layer", mode="before")(lambda cls, value: layer_index_keys(value))

    @field_validator("keep_ratio_by_layer", mode="after")
    @classmethod
    def _schedule(cls, value: dict[int, float]) -> dict[int, float]:
        if not value:
            raise ValueError("the schedule is empty; give at least one layer, e.g. {8: 0.5}")
        previous: tuple[int, float] | None = None
        for layer in sorted(value):
            ratio = value[layer]
            if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
                raise ValueError(f"layer {layer}: keep ratio {ratio} is out of range; ratios lie in (0, 1]")
            if previous is not None and ratio > previous[1]:
                raise ValueError(
                    f"layer {layer}: keep ratio {ratio} is larger than {previous[1]} at earlier layer "
                    f"{previous[0]}; ratios must not increase with the layer (dropped tokens never return)"
                )
            previous = (layer, ratio)
        return dict(sorted(value.items()))


class SelectivePropagator:
    """Keeps the protected tokens and the highest-scoring others after scheduled layers.

    Parameters
    ----------
    config:
        A :class:`SelectiveConfig`; or pass its fields as keywords instead.

    After layer ``l`` with ratio ``r``: ``n_keep = max(ceil(r * n_original), min_keep_tokens,
    protected count)`` (the largest protected count in the batch), capped at the current token
    count ``N``; the same ``n_keep`` holds for every row. Protected are the caller's protected
    tokens and those at positions below ``keep_first_tokens``. Order of preference: protected tokens, then real
    tokens by score aggregated over KV heads (``None`` scores: most recent first), then padding.
    """

    def __init__(self, config: SelectiveConfig | None = None, **params: Any) -> None:
        if config is not None:
            if params:
                raise ValueError(
                    f"pass either a SelectiveConfig or its fields as keywords, not both (got {sorted(params)})"
                )
            self.config = config
        else:
            self.config = SelectiveConfig.model_validate(params)

    def check_model(self, *, num_layers: int, head_dim: int) -> None:
        """Refuse a schedule naming a layer the model does not have (called before any prefill)."""
        refuse_missing_layers("propagator.keep_ratio_by_layer", self.config.keep_ratio_by_layer, num_layers)

    def acts_after(self, layer_idx: int) -> bool:
        """True if the schedule names ``layer_idx``."""
        return layer_idx in self.config.keep_ratio_by_layer

    def n_keep(self, layer_idx: int, n_original: int) -> int:
        """Tokens the schedule keeps after ``layer_idx`` (before protected tokens and ``N`` cap it)."""
        ratio = self.config.keep_ratio_by_layer[layer_idx]
        # Rounding first stops float noise (0.3 * 10 = 3.0000000000000004) from keeping one extra token.
        return max(1, math.ceil(round(ratio * n_original, 9)), self.config.min_keep_tokens)

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
            protected: ``[B, N]`` bool, tokens that always continue (sinks, prompt window). In a
                batch each row's last token must be among them (the model's prompt window always
                holds it): a row's length is read as its last kept position + 1.
            n_original: prompt length before any propagation; the ratios refer to it.

        Returns:
            ``None`` if the layer is not scheduled or every token continues, else int64 indices
            ``[B, n_keep]`` into ``N``, ascending in each row.
        """
        if not self.acts_after(layer_idx):
            return None
        if positions.dim() != 2:
            raise ValueError(f"positions must be [B, N], got shape {tuple(positions.shape)}")
        b, n = positions.shape
        if tuple(protected.shape) != (b, n):
            raise ValueError(f"protected must be [B={b}, N={n}] like positions, got shape {tuple(protected.shape)}")
        if scores is not None and (scores.dim() != 3 or scores.shape[0] != b or scores.shape[2] != n):
            raise ValueError(f"scores must be [B={b}, H_kv, N={n}], got shape {tuple(scores.shape)}")
        if n_original < 1:
            raise ValueError(f"n_original must be >= 1, got {n_original}")

        padding = positions == PADDING_POSITION
        keep_protected = (protected.bool() | (positions < self.config.keep_first_tokens)) & ~padding
        # Each row keeps what it would keep alone: its ratio of its *own* prompt (a left-padded
        # row's length is its last position + 1), at least its protected tokens. Rows keeping
        # fewer than the batch's n_keep fill up with their padding slots (masked everywhere).
        row_original = (positions.amax(dim=1).clamp_min(0) + 1).tolist() if b > 1 else [n_original] * b
        row_keep = torch.tensor([self.n_keep(layer_idx, int(n_row)) for n_row in row_original], device=positions.device)
        n_prot = keep_protected.sum(dim=1)
        row_keep = torch.maximum(row_keep, n_prot)
        n_keep = int(row_keep.max()) if b else 0
        if n_keep >= n:
            return None

        if scores is None:
            rank_value = positions.to(torch.float32)
        elif self.config.aggregation == "mean":
            rank_value = scores.float().mean(dim=1)
        else:
            rank_value = scores.float().amax(dim=1)
        # Padding slots may hold anything (even NaN); they are ranked by tier alone.
        rank_value = torch.nan_to_num(rank_value, nan=0.0)
        by_value = torch.sort(rank_value, dim=1, descending=True, stable=True).indices
        # A row's best (row_keep - protected) real tokens make its budget; the rest rank below
        # padding, so they fill a row only when it has no padding slot left.
        candidate = ~padding & ~keep_protected
        sorted_candidate = candidate.gather(1, by_value)
        in_budget_sorted = sorted_candidate & (sorted_candidate.cumsum(dim=1) <= (row_keep - n_prot)[:, None])
        in_budget = torch.zeros_like(candidate).scatter(1, by_value, in_budget_sorted)
        tier = torch.full_like(positions, _TIER_SURPLUS)
        tier = torch.where(padding, torch.full_like(tier, _TIER_PADDING), tier)
        tier = torch.where(in_budget, torch.full_like(tier, _TIER_REAL), tier)
        tier = torch.where(keep_protected, torch.full_like(tier, _TIER_PROTECTED), tier)

        # Lexicographic order (tier, then value), both descending: sort by value, then stably by tier.
        by_tier = torch.sort(tier.gather(1, by_value), dim=1, descending=True, stable=True).indices
        order = by_value.gather(1, by_tier)
        return torch.sort(order[:, :n_keep], dim=1).values.to(torch.int64)
