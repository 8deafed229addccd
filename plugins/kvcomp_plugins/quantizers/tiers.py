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

from kvcomp_plugins.memo import LastRead


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


@dataclass(frozen=True)
class _StreamSlots:
    """What a layer's split takes from its stream alone (positions and protected slots), the same
    for every layer until propagation thins the stream."""

    residual: Tensor  # [B, n_r] ascending
    candidates: Tensor  # [B, n_c] ascending
    candidate_positions: Tensor  # [B, n_c]
    padded: bool  # some slot of the stream is padding (then some candidate may be)


# The stream's slots, kept for the very tensors of the last call (see kvcomp_plugins.memo): each
# layer of a stream would otherwise sort its slots again (three sorts and ~15 small ops per layer
# on a GPU), and it is also where the one host read of a stream is made.
_STREAM_SLOTS: LastRead[_StreamSlots] = LastRead()


def _stream_slots(positions: Tensor, protected: Tensor, residual_length: int) -> _StreamSlots:
    return _STREAM_SLOTS.get([positions, protected], (residual_length,),
                             lambda: _residual_and_candidates(positions, protected, residual_length))


def _residual_and_candidates(positions: Tensor, protected: Tensor, residual_length: int) -> _StreamSlots:
    """Ascending slot indices ``[B, n_r]`` and ``[B, N - n_r]`` of residual and candidate tokens.

    Residual = protected slots plus the last ``residual_length`` slots. Rows with fewer such
    slots than the fullest row are topped up with padding slots, then with their most recent
    candidates (kept in full precision rather than lost), so that ``n_r`` is the same for all.
    """
    b, n = positions.shape
    slot = torch.arange(n, device=positions.device)
    wanted = protected | (slot >= n - residual_length).unsqueeze(0)
    # One host read: the fullest row's residual, and whether there is padding at all.
    n_res, padded = torch.stack([wanted.sum(dim=1).max(), (positions < 0).any()]).tolist() if b else (0, False)
    priority = torch.where(wanted, 2, torch.where(positions < 0, 1, 0))
    key = priority * (n + 1) + slot  # unique per row: priority first, then recency
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    residual = order[:, :n_res].sort(dim=1).values
    candidates = order[:, n_res:].sort(dim=1).values
    return _StreamSlots(residual, candidates, positions.gather(1, candidates), bool(padded))


def _rank_candidates(cand_scores: Tensor, cand_padding: Tensor | None) -> Tensor:
    """Candidate indices ``[B, H_kv, n_c]`` best first: real before padding (``cand_padding``,
    ``None`` if there is none), then score descending, then most recent first (so ties are
    broken deterministically)."""
    n_c = cand_scores.shape[-1]
    scores = torch.nan_to_num(cand_scores.flip(-1), nan=float("-inf"))
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    if cand_padding is not None:
        padding = cand_padding.flip(-1).to(torch.uint8).gather(-1, order)
        order = order.gather(-1, torch.argsort(padding, dim=-1, stable=True))
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
    stream = _stream_slots(positions, protected, residual_length)
    cand, cand_pos = stream.candidates, stream.candidate_positions
    n_c = cand.shape[1]
    if scores is None:
        cand_scores = torch.zeros(b, n_kv_heads, n_c, dtype=torch.float32, device=positions.device)
    else:
        cand_scores = scores.to(torch.float32).gather(2, cand.unsqueeze(1).expand(b, n_kv_heads, n_c))
    padding = (cand_pos < 0).unsqueeze(1).expand(b, n_kv_heads, n_c) if stream.padded else None
    ranked = _rank_candidates(cand_scores, padding)
    counts = tier_counts(n_c, [frac for _, frac in tiers])
    kept = [(bits, count) for (bits, _), count in zip(tiers, counts) if count]
    slots = cand.unsqueeze(1).expand(b, n_kv_heads, n_c)
    pos = cand_pos.unsqueeze(1).expand(b, n_kv_heads, n_c)
    # Each tier in position order (neighbours share a per-channel key group; padding goes last):
    # one sort of every candidate by (tier, position), the dropped ones last, cut at the counts.
    label = torch.zeros(n_c, dtype=torch.int64, device=positions.device)
    rank = torch.arange(n_c, device=positions.device)
    done = 0
    for _, count in kept:
        done += count
        label += rank >= done  # the rank's tier; len(kept) = dropped
    tier_of = torch.empty_like(ranked).scatter_(2, ranked, label.expand(b, n_kv_heads, n_c))
    big = torch.iinfo(torch.int32).max + 1  # above every position
    within = pos
    if padding is not None:  # padding after the real tokens of its tier, in rank order
        rank_of = torch.empty_like(ranked).scatter_(2, ranked, rank.expand(b, n_kv_heads, n_c))
        within = torch.where(padding, big + rank_of, pos)
    order = torch.argsort(tier_of * (2 * big) + within, dim=-1, stable=True)
    tier_idx, tier_pos, start = [], [], 0
    for _, count in kept:
        chosen = order[..., start : start + count]
        start += count
        tier_idx.append(slots.gather(2, chosen))
        tier_pos.append(pos.gather(2, chosen).to(torch.int32))
    return TokenSplit(stream.residual, [bits for bits, _ in kept], tier_idx, n_c - sum(counts), tier_pos)


def gather_parts(tensors: Sequence[Tensor], parts: Sequence[Tensor]) -> list[list[Tensor]]:
    """Each of ``tensors`` (``[B, H_kv, N, d]``, keys and values, say) at the slot indices of each
    part (``[B, H_kv, k_i]``): per tensor, one ``[B, H_kv, k_i, d]`` tensor per part, all taken by
    a single row copy.

    One ``index_select`` of whole ``d``-rows replaces a ``gather`` per part with an index per
    element (several times slower on a CPU). Keys and values straight from the attention are laid
    out ``[B, N, H_kv, d]`` in memory; that layout is indexed as it is, without a copy. The row
    indices are computed once per layout, not per tensor.
    """
    idx = torch.cat(list(parts), dim=-1) if len(parts) > 1 else parts[0]  # [B, H_kv, K]
    sizes = [p.shape[-1] for p in parts]
    rows_by_layout: dict[bool, Tensor] = {}
    out = []
    for x in tensors:
        b, h, n, d = x.shape
        token_major = x.transpose(1, 2).is_contiguous()  # memory [B, N, H_kv, d]
        flat = x.transpose(1, 2).reshape(b * n * h, d) if token_major else x.contiguous().view(b * h * n, d)
        if token_major not in rows_by_layout:
            if token_major:
                rows = (idx + (torch.arange(b, device=x.device) * n).view(b, 1, 1)) * h + torch.arange(h, device=x.device).view(1, h, 1)
            else:
                rows = idx + (torch.arange(b * h, device=x.device) * n).view(b, h, 1)
            rows_by_layout[token_major] = rows.reshape(-1)
        taken = flat.index_select(0, rows_by_layout[token_major]).view(b, h, -1, d)
        out.append(list(taken.split(sizes, dim=2)))
    return out
