"""Quantizer-side wrappers of the C kernels (:mod:`kvcomp_plugins.native`): decode attention over
packed tiers, the token split of a prefill layer, and quantise+pack.

Each is the twin of a torch reference (:mod:`.attend`, :mod:`.tiers`, :mod:`.packing`): the split
and the packed bytes are the same bit for bit, decode attention the same up to the order of
float32 additions. Where the kernels cannot be built, backend ``auto`` keeps the references.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from kvcore.decode_attention import DensePart
from kvcore.types import KVTier, QuantizedTensor
from kvcomp_plugins.native import MAX_HEAD_DIM, QuantArgs, TierArgs, available, library
from kvcomp_plugins.quantizers import packing
from kvcomp_plugins.quantizers.attend import Scratch
from kvcomp_plugins.quantizers.packing import Axis, QuantRequest, validate_quant_args
from kvcomp_plugins.quantizers.tiers import TokenSplit, tier_counts

__all__ = ["LANES", "MAX_HEAD_DIM", "MAX_ROWS", "attend_layer", "available", "library", "quantize_available", "quantize_pack",
           "quantize_pack_many", "quantize_tiers", "rows_shared", "spans_per_head", "split_tokens", "supports", "unpack_dequantize"]


def quantize_available() -> bool:
    """True if the build also quantises (it needs the compiler's ``_Float16``)."""
    lib = library()
    return lib is not None and bool(lib.kvc_quantize_available())


def quantize_pack(x: Tensor, bits: int, group_size: int, axis: Axis) -> QuantizedTensor:
    """:func:`.packing.quantize_pack` in C: the same bytes (the same fp32 recipe, step by step)."""
    return quantize_pack_many([(x, bits, group_size, axis)])[0]


def quantize_pack_many(requests: list[QuantRequest]) -> list[QuantizedTensor]:
    """:func:`.packing.quantize_pack_many` in C: one call for requests sharing head dim and group
    size (a layer's tiers, keys and values), CPU tensors only."""
    for x, bits, group_size, axis in requests:
        validate_quant_args(tuple(x.shape), bits, group_size, axis)
    return _quantize([(x, None, bits, group_size, axis) for x, bits, group_size, axis in requests])


def quantize_tiers(
    keys: Tensor, values: Tensor, tier_idx: Sequence[Tensor], tier_bits: Sequence[int], group_size: int, key_axis: Axis
) -> list[tuple[QuantizedTensor, QuantizedTensor]]:
    """``(keys, values)`` of each tier of a prefill layer, quantised straight from the layer's K/V.

    Tier ``i`` holds the slots ``tier_idx[i]`` (int64 ``[B, H_kv, k_i]``) of ``keys``/``values``
    ``[B, H_kv, N, d]`` at ``tier_bits[i]``; the bytes are those of :func:`quantize_pack_many` on
    the gathered tokens, but the kernel reads the rows through the indices, in whatever layout
    the attention left them (``[B, N, H_kv, d]`` in memory), so no gathered copy is made.
    """
    work: list[tuple[Tensor, Tensor | None, int, int, Axis]] = []
    for idx, bits in zip(tier_idx, tier_bits):
        work += [(keys, idx, bits, group_size, key_axis), (values, idx, bits, group_size, "token")]
    for x, idx, bits, group, axis in work:
        validate_quant_args((*idx.shape, x.shape[-1]), bits, group, axis)
    out = _quantize(work)
    return list(zip(out[0::2], out[1::2]))


def _float_rows(x: Tensor) -> Tensor:
    """``x`` as float32 with contiguous channels (no copy where it already is; a cast keeps the layout)."""
    x = x.to(torch.float32)
    return x if x.stride(-1) == 1 else x.contiguous()


def _quantize(work: Sequence[tuple[Tensor, Tensor | None, int, int, Axis]]) -> list[QuantizedTensor]:
    """Quantise ``(x [B, H_kv, N, d], idx [B, H_kv, n] or None, bits, group_size, axis)`` items:
    the ``n`` rows ``idx`` names (all ``N`` rows without one) of each ``(batch row, KV head)``."""
    lib = library()
    if lib is None or not lib.kvc_quantize_available():
        raise RuntimeError("the CPU kernel's quantiser is not available here; use backend 'torch' or 'auto'")
    out: list[QuantizedTensor] = []
    calls: dict[tuple[int, int], list[tuple[Tensor, Tensor | None, QuantizedTensor]]] = {}  # (d, G) -> work
    for x, idx, bits, group_size, axis in work:
        if x.device.type != "cpu" or x.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"the CPU kernel quantises CPU tensors with head_dim <= {MAX_HEAD_DIM}, "
                             f"got one on {x.device} with head_dim {x.shape[-1]}")
        b, h, _, d = x.shape
        n = x.shape[2] if idx is None else idx.shape[-1]
        stat_shape = (b, h, n, d // group_size) if axis == "token" else (b, h, -(-n // group_size), d)
        q = QuantizedTensor(
            packed=torch.empty(b, h, n, d * bits // 8, dtype=torch.uint8),
            scale=torch.empty(stat_shape, dtype=torch.float16),
            zero=torch.empty(stat_shape, dtype=torch.float16),
            bits=bits, group_size=group_size, axis=axis, shape=(b, h, n, d),
        )
        out.append(q)
        if n:
            index = None if idx is None else idx.to(torch.int64).contiguous()
            calls.setdefault((d, group_size), []).append((_float_rows(x), index, q))
    for (d, group_size), items in calls.items():
        structs = (QuantArgs * len(items))(*(
            QuantArgs(x.data_ptr(), idx.data_ptr() if idx is not None else None, x.shape[1],
                          x.stride(0), x.stride(1), x.stride(2),
                          q.packed.data_ptr(), q.scale.data_ptr(), q.zero.data_ptr(),
                          q.shape[0] * q.shape[1], q.shape[2], q.bits, int(q.axis == "token"))
            for x, idx, q in items
        ))
        if lib.kvc_quantize_many(structs, len(items), d, group_size, torch.get_num_threads()) != 0:
            raise ValueError(f"the CPU kernel refused group_size={group_size}, head_dim={d}")
    return out


def rows_shared(positions: Tensor, protected: Tensor) -> bool:
    """Whether the batch rows of ``[B, N]`` ``positions`` and ``protected`` are all equal, as
    :func:`split_tokens` needs (always so for one row, without a comparison)."""
    if positions.shape[0] == 1:
        return True
    return torch.equal(positions, positions[:1].expand_as(positions)) and torch.equal(protected, protected[:1].expand_as(protected))


def split_tokens(
    positions: Tensor,
    scores: Tensor | None,
    protected: Tensor,
    n_kv_heads: int,
    residual_length: int,
    tiers: Sequence[tuple[int, float]],
) -> TokenSplit:
    """:func:`.tiers.split_tokens` in C (the same split), for batch rows that share their positions
    and protected slots (one prompt, or a batch of equal ones): one sort per (batch row, KV head)
    in one call instead of ~60 small torch ops. Raises ``ValueError`` for rows that differ."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available here; use backend 'torch' or 'auto'")
    b, n = positions.shape
    if not rows_shared(positions, protected):
        raise ValueError("the C token split serves batch rows that share positions and protected slots")
    residual = protected[0] | (torch.arange(n) >= n - residual_length)
    residual_idx = residual.nonzero().flatten()
    n_c = n - residual_idx.numel()
    counts = tier_counts(n_c, [frac for _, frac in tiers])
    kept = [(bits, count) for (bits, _), count in zip(tiers, counts) if count]
    idx = [torch.empty(b, n_kv_heads, count, dtype=torch.int64) for _, count in kept]
    pos = [torch.empty(b, n_kv_heads, count, dtype=torch.int32) for _, count in kept]
    row_positions = positions[0].to(torch.int64).contiguous()
    flags = residual.to(torch.uint8)
    score_rows = None if scores is None else scores.to(torch.float32).contiguous()
    scratch = torch.empty(b * n_kv_heads, 2 * n, dtype=torch.int64)  # uint64 sort keys and the radix sort's buffer
    tier_sizes = torch.tensor([c for _, c in kept], dtype=torch.int64)
    status = lib.kvc_split(
        score_rows.data_ptr() if score_rows is not None else None, row_positions.data_ptr(), flags.data_ptr(),
        b * n_kv_heads, n, len(kept), tier_sizes.data_ptr(),
        (ctypes.c_void_p * max(len(kept), 1))(*(t.data_ptr() for t in idx)),
        (ctypes.c_void_p * max(len(kept), 1))(*(t.data_ptr() for t in pos)),
        scratch.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"the C token split refused a layer of {n} tokens with tiers {counts}")
    return TokenSplit(
        residual_idx=residual_idx.unsqueeze(0).expand(b, -1),
        tier_bits=[bits for bits, _ in kept],
        tier_idx=idx,
        dropped_per_head=n_c - sum(counts),
        tier_positions=pos,
    )


unpack_dequantize = packing.unpack_dequantize  # dense copies (tests, the fallback path) stay in torch


_DENSE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
"""The dense part's storage dtypes the kernel reads, and their codes in the C source."""
MAX_ROWS = 1024
"""Query rows per KV head (query heads per KV head x new tokens) the kernel takes: it keeps a few
floats per row on its threads' stacks. A decode step has a handful; a long chunk of new tokens
goes to the torch path instead."""


LANES = 16
"""The kernel works on 16 channels at a time: it serves head dims that are multiples of 16 (every
LLaMA-family model's); others go to the torch path."""
SPAN_TOKENS = 256
"""Shortest stretch of a layer's keys one thread takes: the keys of every (batch row, KV head) are
cut into spans, so that a decode step with fewer KV heads than threads (or a count that does not
divide evenly, 3 heads on 2 cores) still keeps every core busy; each span's softmax is merged
by log-sum-exp at the end."""


def supports(rows: Tensor, dense: DensePart) -> bool:
    """True if the kernel can serve this call: CPU tensors, a dense part of float32, float16 or
    bfloat16 (keys and values alike), ``d`` a multiple of 16 up to 512, the row count in range."""
    d = rows.shape[-1]
    return (rows.device.type == "cpu" and dense.keys.dtype in _DENSE_DTYPES and dense.values.dtype == dense.keys.dtype
            and d <= MAX_HEAD_DIM and d % LANES == 0 and rows.shape[-2] <= MAX_ROWS)


def spans_per_head(total: int, heads: int, threads: int) -> int:
    """How many spans the keys of each of ``heads`` (batch row, KV head) pairs are cut into:
    enough for ~8 work items per thread, none shorter than :data:`SPAN_TOKENS` keys."""
    return max(1, min(-(-total // SPAN_TOKENS), -(-8 * threads // heads)))


def _rows_layout(t: Tensor) -> tuple[Tensor, int]:
    """``t [B, H_kv, n, d]`` with contiguous token rows, and its stride between (batch, head) pairs;
    a copy only where batch and head strides are not uniform (the dense store is a view with room)."""
    b, h, n, d = t.shape
    if t.stride(-1) != 1 or t.stride(-2) != d or t.stride(0) != h * t.stride(1):
        t = t.contiguous()
    return t, t.stride(1)


def attend_layer(
    rows: Tensor,
    tiers: Sequence[KVTier],
    dense: DensePart,
    padding: Sequence[Tensor | None] | None = None,
    scratch: object = None,
) -> Tensor:
    """C twin of :func:`kvcomp_plugins.quantizers.attend.attend_layer` (same arguments; ``rows``
    ``[B, H_kv, r, d]`` float32 already scaled); returns ``[B, H_kv, r, d]`` float32.

    Raises ``RuntimeError`` if the kernel is not available and ``ValueError`` if it cannot serve
    these tensors (see :func:`supports`).
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU decode kernel is not available here (see the warning it gave, or "
                           "KVCOMP_NATIVE=0); use backend 'torch' or 'auto'")
    if not supports(rows, dense):
        raise ValueError(f"the CPU decode kernel needs CPU tensors, a float32/16 or bfloat16 dense part, "
                         f"head_dim a multiple of {LANES} up to {MAX_HEAD_DIM} "
                         f"and at most {MAX_ROWS} query rows per KV head; "
                         f"got rows on {rows.device}, dense {dense.keys.dtype}, head_dim {rows.shape[-1]}, {rows.shape[-2]} rows")
    b, h, r, d = rows.shape
    g = tiers[0].keys.group_size if tiers else d
    if any((t.keys.group_size, t.values.group_size) != (g, g) for t in tiers) or d % g:
        raise ValueError(f"tiers attended together must share one group size dividing head_dim={d}")
    if any(t.values.axis != "token" for t in tiers):
        raise ValueError("the CPU decode kernel reads values quantised per token (axis 'token')")
    rows = rows.to(torch.float32).contiguous()
    keep = []  # tensors whose memory the call reads: alive until it returns
    structs = (TierArgs * max(len(tiers), 1))()
    for i, tier in enumerate(tiers):
        parts = [tier.keys.packed, tier.values.packed, tier.keys.scale, tier.keys.zero, tier.values.scale, tier.values.zero]
        parts = [p.contiguous() for p in parts]
        pad = None if padding is None or padding[i] is None else padding[i].reshape(b * h, tier.n_tokens).to(torch.uint8).contiguous()
        keep += [*parts, pad]
        kp, vp, ks, kz, vs, vz = (p.data_ptr() for p in parts)
        structs[i] = TierArgs(kp, vp, pad.data_ptr() if pad is not None else None, ks, kz, vs, vz,
                           tier.n_tokens, tier.bits, int(tier.keys.axis == "token"))
    keys, stride = _rows_layout(dense.keys)
    values, v_stride = _rows_layout(dense.values)
    if v_stride != stride:
        keys, values = keys.contiguous(), values.contiguous()
        stride = keys.stride(1)
    n_dense = keys.shape[-2]
    mask = None
    if dense.mask is not None:
        mask = dense.mask.expand(b, h, r, n_dense).to(torch.uint8).contiguous()
    total = sum(t.n_tokens for t in tiers) + n_dense
    threads = torch.get_num_threads()
    spans = spans_per_head(total, b * h, threads)
    shapes = {"native_logits": (b * h, r, total), "native_partial": (b * h, spans, r, d + 2)}
    if isinstance(scratch, Scratch):
        logits, partial = (scratch.get(name, shape, torch.float32, rows.device) for name, shape in shapes.items())
    else:
        logits, partial = (torch.empty(shape, dtype=torch.float32) for shape in shapes.values())
    out = torch.empty(b, h, r, d, dtype=torch.float32)
    status = lib.kvc_attend(
        rows.data_ptr(), b * h, r, d, g, structs, len(tiers), keys.data_ptr(), values.data_ptr(),
        _DENSE_DTYPES[keys.dtype], stride, n_dense, mask.data_ptr() if mask is not None else None,
        logits.data_ptr(), total, spans, partial.data_ptr(), out.data_ptr(), threads,
    )
    if status != 0:
        raise ValueError(f"the CPU decode kernel refused head_dim={d}, group_size={g}")
    del keep
    return out

