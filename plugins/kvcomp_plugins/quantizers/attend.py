"""Decode attention over the packed tiers of one layer (torch reference, any device).

All tiers of a layer and its full-precision part (prefill residual plus decoded tokens) are
attended *together*, in one softmax, through reused scratch buffers (shared by all layers: one
layer attends at a time), never through per-step allocations of the layer's size:

1. every tier's packed keys and values are unpacked into one uint8 staging buffer (a few integer
   ops per tier, see :func:`unpack_into`), then converted to float32 in one copy, with the
   full-precision keys and values copied behind them;
2. keys: ``code * scale + zero`` for all tiers at once, in place (per-channel scales broadcast
   over their ``G`` tokens), then one matmul for every logit and one softmax: no per-part
   log-sum-exp and no merge (each of those is several ops per layer, and a CPU decode step pays
   per op);
3. values: the per-token scale folds into the probabilities, ``sum_t (p_t s_tg) code_tc +
   sum_t p_t zero_tg``: one thin matmul per channel group over float codes.

Why not fold the key scales into the query too (``q . k = sum_c (q_c s_gc) code_tc + q . zero_g``),
which never writes a float key? On a CPU that needs one tiny GEMM per token group of 32 and was
measured slower (1.9 ms against 1.1 ms per layer of SmolLM2 at 3k tokens, one thread): the op
count, not the arithmetic, is what a CPU decode step pays for.

Layout: tier ``i`` owns slots ``[off_i, off_i + n_i)`` of a slot axis padded so every tier starts
on a multiple of ``G`` (per-channel key groups never straddle two tiers). Padding slots are
masked out of the softmax, and their value scale and zero are 0: the staged codes are uint8, so
stale but always finite.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from kvcore.decode_attention import DensePart
from kvcore.types import KVTier
from kvcomp_plugins.quantizers import packing


# x = c_0 + 2**b c_1 + ... (the packed byte) -> c_0 + 2**8 c_1 + 2**16 c_2 + ... (the codes, one per
# byte of a wider integer) is x plus a multiple of each right shift of x: for 4 bit
# x + 240 (x >> 4); for 2 bit x + 252 (x >> 2) + 64512 (x >> 4) + 16515072 (x >> 6).
_SPREAD = {4: (torch.int16, ((4, 240),)), 2: (torch.int32, ((2, 252), (4, 64512), (6, 16515072)))}
_LITTLE_ENDIAN = sys.byteorder == "little"


def unpack_into(packed: Tensor, bits: int, out: Tensor) -> None:
    """Write the codes of ``packed`` uint8 ``[..., m]`` into uint8 ``out`` ``[..., m * 8 // bits]``
    (channel ``j * (8 // bits) + k`` from bits ``[k * bits, (k + 1) * bits)`` of byte ``j``).

    Each byte is widened to an integer holding its codes one per byte (see ``_SPREAD``), written
    through an integer view of ``out``: a few contiguous integer ops instead of one strided byte
    op per code, which on a CPU is several times faster. ``out``'s last dim must be contiguous.
    """
    if bits == 8:
        out.copy_(packed)
        return
    wide, terms = _SPREAD[bits]
    if not _LITTLE_ENDIAN or out.stride(-1) != 1:  # the byte order of the integer view matters
        per, mask = 8 // bits, (1 << bits) - 1
        view = out.unflatten(-1, (packed.shape[-1], per))
        for k in range(per):
            view[..., k] = torch.bitwise_right_shift(packed, k * bits) & mask
        return
    x = packed.to(wide)
    target = out.view(wide)
    (shift, factor), *rest = terms
    torch.add(x, x >> shift, alpha=factor, out=target)
    for shift, factor in rest:
        target.add_(x >> shift, alpha=factor)


class Scratch:
    """Reusable staging buffers, grown on demand and shared by all layers (one layer attends at a time)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.zeros(max(numel, 1), dtype=dtype, device=device)  # zeros: staged codes stay finite
            self._buffers[key] = buf
        return buf[:numel].view(shape)


_DEFAULT_SCRATCH = Scratch()


@functools.lru_cache(maxsize=64)
def _layout(sizes: tuple[int, ...], group: int, device: torch.device) -> tuple[tuple[int, ...], int, Tensor]:
    """First slot of each tier, the padded slot count ``P`` and the bool ``[P]`` mask of padding
    slots. Computed once per distinct tier shape: every layer of a model has the same tier sizes
    (until propagation or a flush changes them)."""
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // group) * group
    pad = torch.ones(total, dtype=torch.bool)
    for off, n in zip(offsets, sizes):
        pad[off : off + n] = False
    return tuple(offsets), total, pad.to(device)


def _stats(parts: Sequence[Tensor], sizes: Sequence[int], group: int, dim: int = 2) -> Tensor:
    """Per-token tensors ``[..., n_i, ...]`` (token axis ``dim``) of each tier laid out on the padded
    slot axis (zeros in padding slots, or True for bool masks)."""
    pieces = []
    for part, n in zip(parts, sizes):
        pieces.append(part)
        slots = -(-n // group) * group
        if slots > n:
            shape = list(part.shape)
            shape[dim] = slots - n
            filler = torch.ones if part.dtype == torch.bool else torch.zeros
            pieces.append(filler(shape, dtype=part.dtype, device=part.device))
    return torch.cat(pieces, dim=dim)


def _fold_unlike(
    tiers: Sequence[KVTier], padding: Sequence[Tensor | None] | None, dense: DensePart, alike: list[bool], r: int
) -> tuple[list[KVTier], list[Tensor | None] | None, DensePart]:
    """Dequantise the tiers grouped unlike the first (``alike[i]`` False) into the dense part.

    Such tiers are few and small (decoded tokens flushed with per-token key groups beside
    per-channel prefill tiers), so one softmax over everything stays cheaper than a second pass
    and a merge. Returns the tiers left, their padding masks and the extended dense part.
    """
    others = [t for t, same in zip(tiers, alike) if not same]
    keys = [packing.unpack_dequantize(t.keys, dense.keys.dtype) for t in others]
    values = [packing.unpack_dequantize(t.values, dense.values.dtype) for t in others]
    pads = [p for p, same in zip(padding or [None] * len(tiers), alike) if not same]
    mask = dense.mask
    if mask is not None or any(p is not None for p in pads):
        b, h, n = dense.keys.shape[0], dense.keys.shape[1], dense.keys.shape[-2]
        everything = functools.partial(torch.ones, dtype=torch.bool, device=dense.keys.device)
        seen = [everything(b, h, r, t.n_tokens) if p is None else ~p.expand(b, h, r, -1) for t, p in zip(others, pads)]
        mask = torch.cat([*seen, everything(b, h, r, n) if mask is None else mask.expand(b, h, r, n)], dim=-1)
    dense = DensePart(torch.cat([*keys, dense.keys], dim=2), torch.cat([*values, dense.values], dim=2), mask)
    kept = [t for t, same in zip(tiers, alike) if same]
    kept_padding = None if padding is None else [p for p, same in zip(padding, alike) if same]
    return kept, kept_padding, dense


def attend_layer(
    rows: Tensor,
    tiers: Sequence[KVTier],
    dense: DensePart,
    padding: Sequence[Tensor | None] | None = None,
    scratch: Scratch | None = None,
) -> Tensor:
    """Attention of ``rows [B, H_kv, r, d]`` (float32, already scaled by the softmax scale) over
    every token of ``tiers`` and of the full-precision ``dense`` part, in one softmax. Tiers are
    read packed when quantised like the first (group size, key grouping); others are dequantised
    into the dense part first (:func:`_fold_unlike`).

    ``padding[i]`` is bool ``[B, H_kv, 1, n_i]`` (True = padding slot, never attended) or ``None``.
    Every row must see at least one dense key (in a decode step: the query's own token).
    Returns the output ``[B, H_kv, r, d]``, float32.
    """
    g, key_axis = tiers[0].keys.group_size, tiers[0].keys.axis
    alike = [(t.keys.group_size, t.values.group_size, t.keys.axis) == (g, g, key_axis) for t in tiers]
    if not all(alike):
        tiers, padding, dense = _fold_unlike(tiers, padding, dense, alike, r=rows.shape[-2])
    scratch = scratch or _DEFAULT_SCRATCH
    b, h, r, d = rows.shape
    groups = d // g  # channel groups of the values (and of per-token keys)
    sizes = [t.n_tokens for t in tiers]
    offsets, slots, pad = _layout(tuple(sizes), g, rows.device)
    total = slots + dense.keys.shape[-2]

    # Codes of every tier, keys then values, token-major [2, B, H, P, d]: each tier's rows are one
    # contiguous block per head; one conversion to float serves keys and values of all tiers, and
    # the dense part is copied behind them so that one matmul and one softmax see every token.
    codes = scratch.get("codes", (2, b, h, slots, d), torch.uint8, rows.device)
    for tier, off, n in zip(tiers, offsets, sizes):
        unpack_into(tier.keys.packed, tier.bits, codes[0, :, :, off : off + n])
        unpack_into(tier.values.packed, tier.bits, codes[1, :, :, off : off + n])
    kv = scratch.get("kv", (2, b, h, total, d), torch.float32, rows.device)
    kv[:, :, :, :slots].copy_(codes)
    kv[0, :, :, slots:].copy_(dense.keys)
    kv[1, :, :, slots:].copy_(dense.values)
    keys, values = kv[0], kv[1]
    if key_axis == "channel":
        # Keys are dequantised in place (scale and zero broadcast along the token group, a
        # contiguous inner dim): then one matmul gives every logit.
        kscale = torch.cat([t.keys.scale for t in tiers], dim=2).to(torch.float32).unsqueeze(3)  # [B, H, P / G, 1, d]
        kzero = torch.cat([t.keys.zero for t in tiers], dim=2).to(torch.float32).unsqueeze(3)
        grouped = keys[:, :, :slots].view(b, h, slots // g, g, d)
        torch.addcmul(kzero, grouped, kscale, out=grouped)
        logits = torch.matmul(rows, keys.transpose(-1, -2))  # [B, H, r, P + n_dense]
    else:  # per-token key groups: the scale multiplies each channel group's partial dot product
        kscale = _stats([t.keys.scale for t in tiers], sizes, g).to(torch.float32)  # [B, H, P, groups]
        kzero = _stats([t.keys.zero for t in tiers], sizes, g).to(torch.float32)
        tier_logits = torch.matmul(rows.view(b, h, r, groups, g).sum(-1), kzero.transpose(-1, -2))
        for j in range(groups):
            cols = slice(j * g, (j + 1) * g)
            tier_logits += torch.matmul(rows[..., cols], keys[:, :, :slots, cols].transpose(-1, -2)) * kscale[..., j].unsqueeze(2)
        logits = torch.cat([tier_logits, torch.matmul(rows, keys[:, :, slots:].transpose(-1, -2))], dim=-1)
    logits[..., :slots].masked_fill_(pad, float("-inf"))
    if padding is not None and any(p is not None for p in padding):
        masks = [torch.zeros(b, h, 1, n, dtype=torch.bool, device=rows.device) if p is None else p for p, n in zip(padding, sizes)]
        logits[..., :slots].masked_fill_(_stats(masks, sizes, g, dim=3), float("-inf"))
    if dense.mask is not None:
        logits[..., slots:].masked_fill_(~dense.mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)

    # Values: the dense part is one matmul. For the tiers the per-token scale folds into the
    # probabilities (sum_t p_t s_tg code_tc), the zero into one thin matmul (sum_t p_t zero_tg):
    # dequantising in place would broadcast a per-token scale over the channels of its group, an
    # inner-dim broadcast that measured 5x slower than these few small matmuls on a CPU.
    tier_probs = probs[..., :slots]
    vscale = _stats([t.values.scale for t in tiers], sizes, g).to(torch.float32)  # [B, H, P, groups], 0 in padding
    vzero = _stats([t.values.zero for t in tiers], sizes, g).to(torch.float32)
    out = torch.matmul(probs[..., slots:], values[:, :, slots:])
    out += torch.matmul(tier_probs, vzero).repeat_interleave(g, dim=-1)
    for j in range(groups):
        cols = slice(j * g, (j + 1) * g)
        out[..., cols] += torch.matmul(tier_probs * vscale[..., j].unsqueeze(2), values[:, :, :slots, cols])
    return out
