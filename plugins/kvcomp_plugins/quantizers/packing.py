"""Pure-torch reference for asymmetric min-max quantisation with packed 2/4/8-bit codes.

The float recipe is fixed so that the Triton kernels (:mod:`.triton_kernels`) can reproduce it
bit for bit, and so that the error bound holds with the *stored* fp16 statistics:

1. group min/max are taken in fp32 (exact: they are input values);
2. ``zero = min`` rounded *down* to fp16, so every input satisfies ``x >= zero``;
3. ``scale = (max - zero) / qmax`` (fp32, correctly rounded; at least the smallest fp32 when
   ``max > zero``) rounded *up* to fp16, so that ``zero + qmax * scale`` reaches ``max``;
4. ``code = clamp(floor((x - zero) / scale + 0.5), 0, qmax)`` in fp32 (round half up; ``0``
   where ``scale == 0``, i.e. constant groups, which then come back as ``zero`` exactly);
5. dequantised value ``code * scale + zero`` in fp32 (``code * scale`` is exact: at most
   8 + 11 significant bits), then cast to the requested dtype.

Hence ``|dequant - x| <= scale / 2`` up to a few fp32 roundings (see ``error_tolerance``).
Inputs must lie in fp16 range, since the statistics are stored as fp16.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from kvcore.types import QuantizedTensor

Axis = Literal["token", "channel"]
SUPPORTED_BITS = (2, 4, 8)
FP32_TRUE_MIN = 2.0**-149
"""Smallest positive fp32 (subnormal)."""
AXES = ("token", "channel")


def validate_quant_args(shape: tuple[int, ...], bits: int, group_size: int, axis: str) -> None:
    """Raise ``ValueError`` naming the bad value unless ``shape`` can be quantised like this.

    Args:
        shape: tensor shape, must be ``[B, H_kv, n, d]``.
        bits: 2, 4 or 8.
        group_size: ``G >= 1``; for ``axis="token"`` it must divide ``d``.
        axis: ``"token"`` or ``"channel"``.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    if axis not in AXES:
        raise ValueError(f"axis={axis!r} is not supported; use one of {AXES}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive int")
    if len(shape) != 4:
        raise ValueError(f"expected a [B, H_kv, n, d] tensor, got shape {tuple(shape)}")
    d = shape[-1]
    per_byte = 8 // bits
    if d % per_byte:
        raise ValueError(f"head_dim d={d} must be divisible by {per_byte} to pack {bits}-bit codes")
    if axis == "token" and d % group_size:
        raise ValueError(f"head_dim d={d} is not divisible by group_size={group_size} (axis='token')")


def fp16_round_down(v: Tensor) -> Tensor:
    """Largest fp16 ``<= v`` for fp32 ``v`` (fp16 range assumed)."""
    h = v.to(torch.float16)
    too_big = h.to(torch.float32) > v
    return torch.where(too_big, _fp16_step(h, down=True), h)


def fp16_round_up(v: Tensor) -> Tensor:
    """Smallest fp16 ``>= v`` for fp32 ``v`` (fp16 range assumed)."""
    h = v.to(torch.float16)
    too_small = h.to(torch.float32) < v
    return torch.where(too_small, _fp16_step(h, down=False), h)


def _fp16_step(h: Tensor, down: bool) -> Tensor:
    """The fp16 neighbour of ``h`` below (``down``) or above, by stepping its bit pattern."""
    bits = h.view(torch.int16).to(torch.int32)
    away_from_zero = (h < 0) if down else (h > 0)
    stepped = torch.where(away_from_zero, bits + 1, bits - 1)
    # From +-0 the neighbour is the smallest subnormal of the requested sign (0x8001 / 0x0001).
    stepped = torch.where(h == 0, torch.full_like(bits, -32767 if down else 1), stepped)
    return stepped.to(torch.int16).view(torch.float16)


def scale_zero_from_minmax(mn: Tensor, mx: Tensor, bits: int | Tensor) -> tuple[Tensor, Tensor]:
    """fp16 ``(scale, zero)`` from fp32 group minima/maxima (steps 2-3 of the recipe).

    ``bits`` is the bit width, or an fp32 tensor of ``qmax = 2**bits - 1`` per group.
    """
    qmax = torch.full_like(mn, float(2**bits - 1)) if isinstance(bits, int) else bits
    zero = fp16_round_down(mn)
    span = mx - zero.to(torch.float32)
    # A non-zero span must give a non-zero scale even if span / qmax underflows fp32.
    # Divide by a full tensor, not the Python float: on CUDA, torch turns division by a scalar
    # into multiplication by its reciprocal, which is not correctly rounded, and the bytes
    # would then depend on the device (and differ from the Triton kernels' div_rn).
    step = torch.where(span > 0, (span / qmax).clamp_min(FP32_TRUE_MIN), 0.0)
    return fp16_round_up(step), zero


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """uint8 codes of fp32 ``x`` given broadcastable fp16 ``scale``/``zero`` (step 4).

    ``scale == 0`` only when a group's max equals its zero, so there ``x - zero == 0`` and
    dividing by 1 instead yields code 0 without a separate mask.
    """
    s = scale.to(torch.float32)
    t = (x - zero.to(torch.float32)).div_(torch.where(s > 0, s, 1.0))
    return t.add_(0.5).floor_().clamp_(0.0, float(2**bits - 1)).to(torch.uint8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes ``[..., d]`` (each ``< 2**bits``) into ``[..., d * bits // 8]`` bytes.

    Channel ``j * (8 // bits) + k`` sits in bits ``[k * bits, (k + 1) * bits)`` of byte ``j``.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last dim {codes.shape[-1]} must be divisible by {per_byte} for {bits}-bit packing")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = grouped[..., 0].clone()
    for k in range(1, per_byte):
        packed |= grouped[..., k] << (k * bits)
    return packed


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., m]`` -> uint8 codes ``[..., m * 8 // bits]``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    if bits == 8:
        return packed
    per_byte = 8 // bits
    mask = 2**bits - 1
    codes = torch.stack([(packed >> (k * bits)) & mask for k in range(per_byte)], dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)


def _group_dim(axis: Axis) -> int:
    """The dim of the :func:`_group_views` views that runs inside one statistics group."""
    return 4 if axis == "token" else 3


def _group_views(x: Tensor, group_size: int, axis: Axis) -> list[Tensor]:
    """5-d views of ``x`` ``[B, H_kv, n, d]``; dim :func:`_group_dim` runs over one group.

    ``"token"``: one view ``[B, H_kv, n, d // G, G]``.
    ``"channel"``: ``[B, H_kv, n // G, G, d]`` for the full token groups plus, if ``n % G``,
    ``[B, H_kv, 1, n % G, d]`` for the partial last group: nothing is padded.
    """
    b, h, n, d = x.shape
    if axis == "token":
        return [x.reshape(b, h, n, d // group_size, group_size)]
    n_full = n - n % group_size
    views = [x[:, :, :n_full].reshape(b, h, n_full // group_size, group_size, d)]
    if n_full < n:
        views.append(x[:, :, n_full:].unsqueeze(2))
    return views


def _from_group_views(pieces: list[Tensor], shape: tuple[int, int, int, int], axis: Axis) -> Tensor:
    """Inverse of :func:`_group_views` for element-wise results of the same layout."""
    b, h, n, d = shape
    if axis == "token":
        return pieces[0].reshape(b, h, n, d)
    return torch.cat([p.reshape(b, h, -1, d) for p in pieces], dim=2)


def expand_stats(stat: Tensor, n: int, d: int, group_size: int, axis: Axis) -> Tensor:
    """Broadcast stored statistics to the element layout ``[B, H_kv, n, d]``."""
    if axis == "token":
        return stat.repeat_interleave(group_size, dim=-1)
    return stat.repeat_interleave(group_size, dim=-2)[..., :n, :]


QuantRequest = tuple[Tensor, int, int, Axis]
"""``(x [B, H_kv, n, d], bits, group_size, axis)``: one tensor to quantise."""


def quantize_pack(x: Tensor, bits: int, group_size: int, axis: Axis) -> QuantizedTensor:
    """Quantise ``x`` ``[B, H_kv, n, d]`` (fp16/bf16/fp32) to packed ``bits``-bit codes.

    Returns:
        A :class:`QuantizedTensor` with uint8 ``packed`` ``[B, H_kv, n, d * bits // 8]`` and fp16
        ``scale``/``zero`` in the layout of ``axis`` (see its docstring).
    """
    return quantize_pack_many([(x, bits, group_size, axis)])[0]


def quantize_pack_many(requests: list[QuantRequest]) -> list[QuantizedTensor]:
    """:func:`quantize_pack` of several tensors (a layer's tiers, keys and values), same bytes.

    The fp16 statistics of every group of every request are computed in one pass: the recipe is
    element-wise, so batching changes no byte, and on a CPU the ~25 small ops of the rounding
    steps would otherwise be paid once per tensor (and per partial key group) of every layer.
    """
    views, minima, maxima, qmax = [], [], [], []
    for x, bits, group_size, axis in requests:
        validate_quant_args(tuple(x.shape), bits, group_size, axis)
        # One fp32 copy serves both passes (torch's fp16 reductions are much slower than fp32 ones).
        parts, g = _group_views(x.to(torch.float32), group_size, axis), _group_dim(axis)
        views.append(parts)
        for v in parts:
            minima.append(v.amin(dim=g))
            maxima.append(v.amax(dim=g))
            qmax.append(torch.full_like(minima[-1], float(2**bits - 1)))
    scale_all, zero_all = scale_zero_from_minmax(_flat(minima), _flat(maxima), _flat(qmax))
    sizes = [m.numel() for m in minima]
    scales, zeros = iter(scale_all.split(sizes)), iter(zero_all.split(sizes))
    out, k = [], 0
    for (x, bits, group_size, axis), parts in zip(requests, views):
        g = _group_dim(axis)
        stats = []
        for v in parts:
            shape = minima[k].shape
            stats.append((next(scales).view(shape), next(zeros).view(shape)))
            k += 1
        codes = [quantize_codes(v, s.unsqueeze(g), z.unsqueeze(g), bits) for v, (s, z) in zip(parts, stats)]
        stat_dim = 3 if axis == "token" else 2  # where the group index lives in the stored layout
        out.append(
            QuantizedTensor(
                packed=pack_codes(_from_group_views(codes, tuple(x.shape), axis), bits),
                scale=torch.cat([s for s, _ in stats], dim=stat_dim),
                zero=torch.cat([z for _, z in stats], dim=stat_dim),
                bits=bits,
                group_size=group_size,
                axis=axis,
                shape=tuple(x.shape),
            )
        )
    return out


def _flat(parts: list[Tensor]) -> Tensor:
    return torch.cat([p.reshape(-1) for p in parts])


def unpack_dequantize(q: QuantizedTensor, dtype: torch.dtype) -> Tensor:
    """Dense ``[B, H_kv, n, d]`` tensor of ``dtype`` from a :class:`QuantizedTensor`."""
    codes, g = _group_views(unpack_codes(q.packed, q.bits), q.group_size, q.axis), _group_dim(q.axis)
    if q.axis == "token":
        stats = [(q.scale, q.zero)]
    else:  # statistics of the full token groups, then of the partial last one (if any)
        n_full = codes[0].shape[2]
        stats = [(q.scale[:, :, :n_full], q.zero[:, :, :n_full]), (q.scale[:, :, n_full:], q.zero[:, :, n_full:])]
    out = [
        (c.to(torch.float32) * s.unsqueeze(g).to(torch.float32) + z.unsqueeze(g).to(torch.float32)).to(dtype)
        for c, (s, z) in zip(codes, stats)
    ]
    return _from_group_views(out, q.shape, q.axis)


def error_tolerance(x: Tensor, q: QuantizedTensor) -> Tensor:
    """Per-element bound on ``|unpack_dequantize(q, float32) - x|``: ``scale / 2`` plus slack.

    The slack covers the fp32 roundings of the recipe: ``x - zero``, the division and ``+ 0.5``
    each err by at most 2**-24 relative, which can move a code across a rounding boundary by
    about ``(qmax + 1) * 2**-22`` steps (``<= 2**-14 * scale``), and the final ``+ zero``
    rounds once (``<= 2**-24 * |result|``). ``2**-20 * (|x| + |zero| + 256 * scale)`` covers
    both with margin.
    """
    _, _, n, d = q.shape
    scale = expand_stats(q.scale, n, d, q.group_size, q.axis).to(torch.float32)
    zero = expand_stats(q.zero, n, d, q.group_size, q.axis).to(torch.float32)
    xf = x.to(torch.float32)
    return scale / 2 + 2.0**-20 * (xf.abs() + zero.abs() + 256 * scale)
