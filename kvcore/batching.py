"""Stacking single-row compressed layers into one batch, with filler slots.

Rows of a batch are compressed as if each were alone (tier sizes counted from the row's own
tokens), so their parts differ in length. To hold them in regular ``[B, ...]`` tensors every
part is padded to the longest row with *filler slots*: position ``-1``, which attention never
reads, all-zero codes and statistics (counted in ``kv_bytes``: they are really stored).

Fillers are appended after a row's tokens. A per-channel key group keeps the scale and zero it
got from the row's own tokens, so the row's codes and their dequantised values are exactly those
of its single run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvcore.types import PADDING_POSITION, CompressedLayer, KVTier, QuantizedTensor


def stack_rows(layers: list[CompressedLayer]) -> CompressedLayer:
    """One ``[B, ...]`` layer from single-row layers; shorter parts are padded with fillers.

    ``dropped_tokens`` becomes the most any row dropped.
    """
    n_res = max(layer.residual_positions.shape[-1] for layer in layers)
    keyed = [_tiers_by_width(layer) for layer in layers]
    tiers = []
    for key in sorted({key for row in keyed for key in row}, key=lambda k: (-k[0], k[1])):
        bits = key[0]
        rows = [row.get(key) for row in keyed]
        model = next(t for t in rows if t is not None)
        n = max(t.n_tokens for t in rows if t is not None)
        padded = [_pad_tier(t if t is not None else _empty_tier(model), n) for t in rows]
        tiers.append(
            KVTier(
                bits=bits,
                positions=torch.cat([t.positions for t in padded]),
                keys=cat_quantized([t.keys for t in padded], dim=0),
                values=cat_quantized([t.values for t in padded], dim=0),
            )
        )
    return CompressedLayer(
        tiers=tiers,
        residual_keys=torch.cat([_pad_tokens(layer.residual_keys, n_res, 0) for layer in layers]),
        residual_values=torch.cat([_pad_tokens(layer.residual_values, n_res, 0) for layer in layers]),
        residual_positions=torch.cat(
            [_pad_tokens(layer.residual_positions, n_res, PADDING_POSITION) for layer in layers]
        ),
        dropped_tokens=max(layer.dropped_tokens for layer in layers),
    )


def _tiers_by_width(layer: CompressedLayer) -> dict[tuple[int, int], KVTier]:
    """A layer's tiers keyed ``(bits, how many tiers of that width came before)``.

    A layer can hold two tiers of one width (protected tokens stored at a width a context tier
    also has); each is stacked with the rows' tiers of the same key, none is lost.
    """
    keyed: dict[tuple[int, int], KVTier] = {}
    for tier in layer.tiers:
        keyed[(tier.bits, sum(bits == tier.bits for bits, _ in keyed))] = tier
    return keyed


def _pad_tokens(x: Tensor, n: int, fill: int) -> Tensor:
    """Pad ``x`` along dim 2 (tokens or token groups) to ``n`` with ``fill``."""
    missing = n - x.shape[2]
    if missing == 0:
        return x
    shape = (*x.shape[:2], missing, *x.shape[3:])
    return torch.cat([x, x.new_full(shape, fill)], dim=2)


def _pad_quantized(q: QuantizedTensor, n: int) -> QuantizedTensor:
    """``q`` with ``n`` tokens: zero codes, and zero statistics for whole groups added."""
    groups = n if q.axis == "token" else math.ceil(n / q.group_size)
    b, h, _, d = q.shape
    return QuantizedTensor(
        packed=_pad_tokens(q.packed, n, 0),
        scale=_pad_tokens(q.scale, groups, 0),
        zero=_pad_tokens(q.zero, groups, 0),
        bits=q.bits,
        group_size=q.group_size,
        axis=q.axis,
        shape=(b, h, n, d),
    )


def _pad_tier(tier: KVTier, n: int) -> KVTier:
    return KVTier(
        bits=tier.bits,
        positions=_pad_tokens(tier.positions, n, PADDING_POSITION),
        keys=_pad_quantized(tier.keys, n),
        values=_pad_quantized(tier.values, n),
    )


def _empty_tier(like: KVTier) -> KVTier:
    """A tier of no tokens shaped like ``like`` (for a row that stores none at this width)."""
    return KVTier(
        bits=like.bits,
        positions=like.positions[:, :, :0],
        keys=_no_tokens(like.keys),
        values=_no_tokens(like.values),
    )


def _no_tokens(q: QuantizedTensor) -> QuantizedTensor:
    b, h, _, d = q.shape
    return QuantizedTensor(q.packed[:, :, :0], q.scale[:, :, :0], q.zero[:, :, :0], q.bits, q.group_size, q.axis, (b, h, 0, d))


def cat_quantized(parts: list[QuantizedTensor], dim: int) -> QuantizedTensor:
    """``parts`` joined along ``dim``: 0 (batch rows) or 2 (tokens; statistics lie along dim 2 in
    both layouts, so a per-channel key tensor must end on a group boundary to be extended)."""
    first = parts[0]
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return QuantizedTensor(
        packed=torch.cat([p.packed for p in parts], dim=dim),
        scale=torch.cat([p.scale for p in parts], dim=dim),
        zero=torch.cat([p.zero for p in parts], dim=dim),
        bits=first.bits,
        group_size=first.group_size,
        axis=first.axis,
        shape=(shape[0], shape[1], shape[2], shape[3]),
    )
