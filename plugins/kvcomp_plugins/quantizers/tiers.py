"""Which token goes where: full-precision residual, a quantised tier, or dropped.

Pure index bookkeeping shared by the quantizers; no quantisation happens here. Every KV head
and every batch row gets the same *number* of tokens per part, so all stored tensors are
regular; padding slots (position ``-1``) fill the gaps where a row has fewer real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from kvcomp_plugins.quantizers.memo import LastRead


@dataclass
class TokenSplit:
    """Slot indices (into the layer's ``N`` axis) of each storage part.

    Attributes:
        residual_idx: int64 ``[B, n_r]``, ascending; the same tokens for every KV head.
        tier_bits: bit width of each non-empty tier, highest first (after the protected tier, if
            the quantizer stores one).
        tier_idx: per tier, int64 ``[B, H_kv, k]`` sorted by original position (padding last).
        dropped_per_head: candidate slots dropped per (batch row, KV head).
        tier_positions: per tier, int32 ``[B, H_kv, k]`` original positions of ``tier_idx``.
    """

    residual_idx: Tensor
    tier_bits: list[int]
    tier_idx: list[Tensor]
    dropped_per_head: int
    tier_positions: list[Tensor]


def tier_counts(n_candidates: int, fractions: Sequence[float]) -> list[int]:
    """Tokens per tier from fractions (highest precision first; the rest is dropped).

    Cumulative fractions are rounded half up, so counts never exceed ``n_candidates`` and a
    set of fractions summing to 1 stores every candidate.
    """
    counts, done, cum = [], 0, 0.0
    for frac in fractions:
        cum += frac
        upto = min(n_candidates, math.floor(cum * n_candidates + 0.5))
        counts.append(max(0, upto - done))
        done += counts[-1]
    return counts


_RESIDUAL_COUNT: LastRead[int] = LastRead()


def _residual_and_candidates(positions: Tensor, protected: Tensor, residual_length: int) -> tuple[Tensor, Tensor]:
    """Ascending slot indices ``([B, n_r], [B, N - n_r])`` of residual and candidate tokens.

    Residual = protected slots plus the last ``residual_length`` slots. Rows with fewer such
    slots than the fullest row are topped up with padding slots, then with their most recent
    candidates (kept in full precision rather than lost), so that ``n_r`` is the same for all.
    """
    b, n = positions.shape
    slot = torch.arange(n, device=positions.device)
    wanted = protected | (slot >= n - residual_length).unsqueeze(0)
    # The fullest row's residual: a host read, once per stream (see .memo).
    n_res = _RESIDUAL_COUNT.get([protected], (n, residual_length), lambda: int(wanted.sum(dim=1).max()) if b else 0)
    priority = torch.where(wanted, 2, torch.where(positions < 0, 1, 0))
    key = priority * (n + 1) + slot  # unique per row: priority first, then recency
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    residual = order[:, :n_res].sort(dim=1).values
    candidates = order[:, n_res:].sort(dim=1).values
    return residual, candidates


def _rank_candidates(cand_scores: Tensor, cand_padding: Tensor) -> Tensor:
    """Candidate indices ``[B, H_kv, n_c]`` best first: real before padding, then score
    descending, then most recent first (so ties are broken deterministically)."""
    n_c = cand_scores.shape[-1]
    scores = torch.nan_to_num(cand_scores.flip(-1), nan=float("-inf"))
    by_score = torch.argsort(scores, dim=-1, descending=True, stable=True)
    padding = cand_padding.flip(-1).to(torch.uint8).gather(-1, by_score)
    order = by_score.gather(-1, torch.argsort(padding, dim=-1, stable=True))
    return n_c - 1 - order  # undo the flip


def split_tokens(
    positions: Tensor,
    scores: Tensor | None,
    protected: Tensor,
    n_kv_heads: int,
    residual_length: int,
    tiers: Sequence[tuple[int, float]],
) -> TokenSplit:
    """Assign every slot of one layer to the residual, a tier, or the dropped set.

    Args:
        positions: original positions ``[B, N]`` int, ``-1`` for padding.
        scores: importance ``[B, H_kv, N]`` or ``None`` (all equal: the most recent win).
        protected: ``[B, N]`` bool; always in the residual.
        n_kv_heads: ``H_kv``.
        residual_length: the last ``R`` slots stay in the residual.
        tiers: ``(bits, fraction)`` highest precision first; fractions of the candidates.
    """
    b, n = positions.shape
    residual, cand = _residual_and_candidates(positions, protected, residual_length)
    n_c = cand.shape[1]
    cand_pos = positions.gather(1, cand)  # [B, n_c]
    if scores is None:
        cand_scores = torch.zeros(b, n_kv_heads, n_c, dtype=torch.float32, device=positions.device)
    else:
        cand_scores = scores.to(torch.float32).gather(2, cand.unsqueeze(1).expand(b, n_kv_heads, n_c))
    ranked = _rank_candidates(cand_scores, (cand_pos < 0).unsqueeze(1).expand(b, n_kv_heads, n_c))
    counts = tier_counts(n_c, [frac for _, frac in tiers])
    tier_bits, tier_idx, tier_pos, start = [], [], [], 0
    big = torch.iinfo(torch.int64).max
    for (bits, _), count in zip(tiers, counts):
        if count == 0:
            continue
        chosen = ranked[..., start : start + count]  # candidate indices [B, H_kv, k]
        start += count
        slots = cand.unsqueeze(1).expand(b, n_kv_heads, n_c).gather(2, chosen)
        pos = positions.gather(1, slots.reshape(b, -1)).reshape(slots.shape)
        # Position order puts neighbours in the same per-channel key group; padding goes last.
        within = torch.argsort(torch.where(pos < 0, big, pos), dim=-1, stable=True)
        tier_bits.append(bits)
        tier_idx.append(slots.gather(2, within))
        tier_pos.append(pos.gather(2, within).to(torch.int32))
    return TokenSplit(residual, tier_bits, tier_idx, n_c - sum(counts), tier_pos)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x`` ``[B, H_kv, N, d]`` at slot indices ``idx`` ``[B, H_kv, k]`` -> ``[B, H_kv, k, d]``."""
    return gather_parts(x, [idx])[0]


def gather_parts(x: Tensor, parts: Sequence[Tensor]) -> list[Tensor]:
    """``x`` ``[B, H_kv, N, d]`` at the slot indices of each part (``[B, H_kv, k_i]``): one
    ``[B, H_kv, k_i, d]`` tensor per part, all taken by a single row copy.

    One ``index_select`` of whole ``d``-rows replaces a ``gather`` per part with an index per
    element (several times slower on a CPU). Keys and values straight from the attention are laid
    out ``[B, N, H_kv, d]`` in memory; that layout is indexed as it is, without a copy.
    """
    b, h, n, d = x.shape
    idx = torch.cat(list(parts), dim=-1) if len(parts) > 1 else parts[0]  # [B, H_kv, K]
    if x.transpose(1, 2).is_contiguous():  # memory [B, N, H_kv, d]
        flat = x.transpose(1, 2).reshape(b * n * h, d)
        rows = (idx + (torch.arange(b, device=x.device) * n).view(b, 1, 1)) * h + torch.arange(h, device=x.device).view(1, h, 1)
    else:
        flat = x.contiguous().view(b * h * n, d)
        rows = idx + (torch.arange(b * h, device=x.device) * n).view(b, h, 1)
    taken = flat.index_select(0, rows.reshape(-1)).view(b, h, -1, d)
    return list(taken.split([p.shape[-1] for p in parts], dim=2))
