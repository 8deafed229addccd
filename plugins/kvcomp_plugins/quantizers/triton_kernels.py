"""Triton kernels for quantise+pack and unpack+dequantise, byte-identical to :mod:`.packing`.

Same interface and the same float recipe as the torch reference (see its module docstring):
the only divisions use ``div_rn`` (IEEE round-to-nearest, as torch does; Triton's default
fp32 division is approximate on GPUs), ``code * scale`` is exact so a fused multiply-add
gives the same dequantised values as torch's separate multiply and add, and fp16 statistics
are rounded down/up by stepping the fp16 bit pattern exactly as the reference does.

Importing this module imports triton. On a machine without a GPU, triton only runs when
``TRITON_INTERPRET=1`` was set before this module was imported (:data:`INTERPRETED`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvcore.types import QuantizedTensor
from kvcomp_plugins.quantizers.packing import Axis, validate_quant_args

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
"""Whether the kernels below were built for the CPU interpreter (``TRITON_INTERPRET=1``)."""

_TILE_ELEMENTS = 4096  # elements per program: keeps register use moderate on GPUs


@triton.jit
def _fp16_round(v, DOWN: tl.constexpr):
    """fp16 nearest to fp32 ``v`` in the direction DOWN (``<= v``) or up (``>= v``)."""
    h = v.to(tl.float16)
    hf = h.to(tl.float32)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    if DOWN:
        wrong = hf > v
        stepped = tl.where(hf < 0.0, bits + 1, bits - 1)
        stepped = tl.where(hf == 0.0, -32767, stepped)
    else:
        wrong = hf < v
        stepped = tl.where(hf > 0.0, bits + 1, bits - 1)
        stepped = tl.where(hf == 0.0, 1, stepped)
    return tl.where(wrong, stepped.to(tl.int16).to(tl.float16, bitcast=True), h)


@triton.jit
def _scale_zero(mn, mx, QMAX: tl.constexpr):
    zero = _fp16_round(mn, True)
    span = mx - zero.to(tl.float32)
    step = tl.math.div_rn(span, tl.full(span.shape, QMAX, tl.float32))
    step = tl.where(span > 0.0, tl.maximum(step, 1.401298464324817e-45), 0.0)  # 2**-149, as packing.py
    return _fp16_round(step, False), zero


@triton.jit
def _stats_token_kernel(
    x_ptr, scale_ptr, zero_ptr, R,
    D: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, QMAX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """One program: ``BLOCK_R`` rows (tokens) x one group of ``G`` channels."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1)
    cols = tl.arange(0, BLOCK_G)
    mask = (rows[:, None] < R) & (cols[None, :] < G)
    x = tl.load(x_ptr + rows[:, None] * D + g * G + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mn = tl.min(tl.where(mask, x, float("inf")), axis=1)
    mx = tl.max(tl.where(mask, x, float("-inf")), axis=1)
    scale, zero = _scale_zero(mn, mx, QMAX)
    out = rows * NG + g
    tl.store(scale_ptr + out, scale, mask=rows < R)
    tl.store(zero_ptr + out, zero, mask=rows < R)


@triton.jit
def _stats_channel_kernel(
    x_ptr, scale_ptr, zero_ptr, N, NS,
    D: tl.constexpr, G: tl.constexpr, QMAX: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: one (batch*head, token group) x all ``D`` channels."""
    bh = tl.program_id(0)
    tg = tl.program_id(1)
    tok = tg * G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_D)
    tok_ok = (tok < N) & (tl.arange(0, BLOCK_G) < G)
    mask = tok_ok[:, None] & (cols[None, :] < D)
    x = tl.load(x_ptr + (bh * N + tok[:, None]) * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mn = tl.min(tl.where(mask, x, float("inf")), axis=0)
    mx = tl.max(tl.where(mask, x, float("-inf")), axis=0)
    scale, zero = _scale_zero(mn, mx, QMAX)
    out = (bh * NS + tg) * D + cols
    tl.store(scale_ptr + out, scale, mask=cols < D)
    tl.store(zero_ptr + out, zero, mask=cols < D)


@triton.jit
def _stat_index(r3, c3, N, NS, D: tl.constexpr, G: tl.constexpr, TOKEN_AXIS: tl.constexpr):
    """Index into the stored statistics of element (row ``r3`` = bh * N + t, channel ``c3``)."""
    if TOKEN_AXIS:
        return r3 * NS + c3 // G
    return ((r3 // N) * NS + (r3 % N) // G) * D + c3


@triton.jit
def _quant_pack_kernel(
    x_ptr, scale_ptr, zero_ptr, out_ptr, R, N, NS,
    D: tl.constexpr, P: tl.constexpr, PER: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    TOKEN_AXIS: tl.constexpr, QMAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program: ``BLOCK_R`` rows; element (row, byte p, slot k) is channel ``p * PER + k``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    k = tl.arange(0, PER)
    r3 = rows[:, None, None]
    c3 = p[None, :, None] * PER + k[None, None, :]
    mask = (r3 < R) & (c3 < D)
    x = tl.load(x_ptr + r3 * D + c3, mask=mask, other=0.0).to(tl.float32)
    sidx = _stat_index(r3, c3, N, NS, D, G, TOKEN_AXIS)
    s = tl.load(scale_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    nonzero = s > 0.0
    t = tl.math.div_rn(x - z, tl.where(nonzero, s, 1.0))
    code = tl.minimum(tl.maximum(tl.floor(t + 0.5), 0.0), QMAX)
    code = tl.where(nonzero & mask, code, 0.0).to(tl.int32)
    byte = tl.sum(code << (k[None, None, :] * BITS), axis=2)
    out_mask = (rows[:, None] < R) & (p[None, :] < P)
    tl.store(out_ptr + rows[:, None] * P + p[None, :], byte.to(tl.uint8), mask=out_mask)


@triton.jit
def _unpack_dequant_kernel(
    packed_ptr, scale_ptr, zero_ptr, out_ptr, R, N, NS,
    D: tl.constexpr, P: tl.constexpr, PER: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    TOKEN_AXIS: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Inverse of :func:`_quant_pack_kernel`; with OUT_BF16, ``out_ptr`` is an int16 view."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    k = tl.arange(0, PER)
    byte_mask = (rows[:, None] < R) & (p[None, :] < P)
    byte = tl.load(packed_ptr + rows[:, None] * P + p[None, :], mask=byte_mask, other=0).to(tl.int32)
    code = (byte[:, :, None] >> (k[None, None, :] * BITS)) & ((1 << BITS) - 1)
    r3 = rows[:, None, None]
    c3 = p[None, :, None] * PER + k[None, None, :]
    mask = (r3 < R) & (c3 < D)
    sidx = _stat_index(r3, c3, N, NS, D, G, TOKEN_AXIS)
    s = tl.load(scale_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    out = code.to(tl.float32) * s + z
    if OUT_BF16:
        out = _bf16_bits_rtne(out)
    tl.store(out_ptr + r3 * D + c3, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bf16_bits_rtne(v):
    """int16 bit pattern of fp32 ``v`` rounded to bf16, nearest-even (what torch does).

    Spelled out because the CPU interpreter truncates fp32 -> bf16 casts.
    """
    bits = v.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.int16)


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"the triton backend needs a CUDA tensor, got one on {t.device}; on a CPU set "
            "TRITON_INTERPRET=1 before triton is first imported, or use backend='torch'"
        )


def _block_rows(d: int) -> int:
    return max(1, _TILE_ELEMENTS // triton.next_power_of_2(d))


def quantize_pack(x: Tensor, bits: int, group_size: int, axis: Axis) -> QuantizedTensor:
    """Triton twin of :func:`kvcomp_plugins.quantizers.packing.quantize_pack` (same bytes)."""
    validate_quant_args(tuple(x.shape), bits, group_size, axis)
    _check_device(x)
    b, h, n, d = x.shape
    x = x.contiguous()
    rows, per = b * h * n, 8 // bits
    n_stats = d // group_size if axis == "token" else -(-n // group_size)
    stat_shape = (b, h, n, n_stats) if axis == "token" else (b, h, n_stats, d)
    scale = torch.empty(stat_shape, dtype=torch.float16, device=x.device)
    zero = torch.empty(stat_shape, dtype=torch.float16, device=x.device)
    packed = torch.empty((b, h, n, d // per), dtype=torch.uint8, device=x.device)
    qmax = float(2**bits - 1)
    if rows:
        if axis == "token":
            block_r = _block_rows(group_size)
            grid = (triton.cdiv(rows, block_r), n_stats)
            _stats_token_kernel[grid](
                x, scale, zero, rows, D=d, G=group_size, NG=n_stats, QMAX=qmax,
                BLOCK_R=block_r, BLOCK_G=triton.next_power_of_2(group_size),
            )
        else:
            _stats_channel_kernel[(b * h, n_stats)](
                x, scale, zero, n, n_stats, D=d, G=group_size, QMAX=qmax,
                BLOCK_G=triton.next_power_of_2(group_size), BLOCK_D=triton.next_power_of_2(d),
            )
        block_r = _block_rows(d)
        _quant_pack_kernel[(triton.cdiv(rows, block_r),)](
            x, scale, zero, packed, rows, n, n_stats, D=d, P=d // per, PER=per, BITS=bits, G=group_size,
            TOKEN_AXIS=axis == "token", QMAX=qmax, BLOCK_R=block_r, BLOCK_P=triton.next_power_of_2(d // per),
        )
    return QuantizedTensor(packed, scale, zero, bits, group_size, axis, (b, h, n, d))


def unpack_dequantize(q: QuantizedTensor, dtype: torch.dtype) -> Tensor:
    """Triton twin of :func:`kvcomp_plugins.quantizers.packing.unpack_dequantize`."""
    _check_device(q.packed)
    b, h, n, d = q.shape
    per = 8 // q.bits
    rows = b * h * n
    out = torch.empty((b, h, n, d), dtype=dtype, device=q.packed.device)
    out_bf16 = dtype == torch.bfloat16
    if rows:
        n_stats = q.scale.shape[-1] if q.axis == "token" else q.scale.shape[-2]
        block_r = _block_rows(d)
        _unpack_dequant_kernel[(triton.cdiv(rows, block_r),)](
            q.packed.contiguous(), q.scale.contiguous(), q.zero.contiguous(),
            out.view(torch.int16) if out_bf16 else out, rows, n, n_stats,
            D=d, P=d // per, PER=per, BITS=q.bits, G=q.group_size, TOKEN_AXIS=q.axis == "token", OUT_BF16=out_bf16,
            BLOCK_R=block_r, BLOCK_P=triton.next_power_of_2(d // per),
        )
    return out
