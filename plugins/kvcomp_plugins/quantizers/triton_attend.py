"""Triton decode attention over packed tiers (flash-decoding style), the CUDA twin of :mod:`.attend`.

One program reads one block of ``BLOCK_T`` tokens of one tier for one (batch row, KV head): it
unpacks the codes in registers, dequantises them with their fp16 scale and zero (keys per channel
or per token, values per token), and returns the block's softmax statistics — row maxima ``m``,
sums ``l`` and the unnormalised output ``acc`` — for every query row of that KV head. No dense
copy of a tier is written. The blocks of all tiers and the full-precision part are then merged
exactly by their log-sum-exp (:func:`kvcore.decode_attention.merge_parts`).

Products use ``input_precision="ieee"`` (no TF32), so the result equals the torch path up to
float32 summation order. Importing this module imports triton; see :mod:`.triton_kernels` for
running it on a CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvcore.decode_attention import DensePart, attend_dense, merge_parts, merge_stacked
from kvcore.types import KVTier

BLOCK_T = 64
"""Tokens per program."""


@triton.jit
def _unpack_dequant(packed_ptr, scale_ptr, zero_ptr, tok, ch, tmask, bh, N, D: tl.constexpr, G: tl.constexpr,
                    BITS: tl.constexpr, TOKEN_AXIS: tl.constexpr):
    """Dequantised ``[BLOCK_T, D]`` float32 of tokens ``tok`` of one (batch row, KV head) ``bh``."""
    PER: tl.constexpr = 8 // BITS
    P: tl.constexpr = D // PER
    byte = tl.load(packed_ptr + (bh * N + tok[:, None]) * P + ch[None, :] // PER, mask=tmask[:, None], other=0)
    code = ((byte.to(tl.int32) >> ((ch[None, :] % PER) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    if TOKEN_AXIS:
        NG: tl.constexpr = D // G
        stat = (bh * N + tok[:, None]) * NG + ch[None, :] // G
    else:  # per channel: one statistics row per group of G tokens
        stat = (bh * tl.cdiv(N, G) + tok[:, None] // G) * D + ch[None, :]
    scale = tl.load(scale_ptr + stat, mask=tmask[:, None], other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + stat, mask=tmask[:, None], other=0.0).to(tl.float32)
    return code * scale + zero


@triton.jit
def _attend_tier_kernel(
    rows_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, valid_ptr, m_ptr, l_ptr, acc_ptr,
    N, NB, R,
    D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, KEY_TOKEN_AXIS: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid ``(B * H_kv, NB)``: block ``program_id(1)`` of ``BLOCK_T`` tokens for ``program_id(0)``."""
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    tok = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = tl.arange(0, D)
    row = tl.arange(0, BLOCK_R)
    tmask = tok < N
    visible = tmask
    if HAS_VALID:
        visible = visible & (tl.load(valid_ptr + bh * N + tok, mask=tmask, other=0) != 0)
    keys = _unpack_dequant(kp_ptr, ks_ptr, kz_ptr, tok, ch, tmask, bh, N, D, G, BITS, KEY_TOKEN_AXIS)
    q = tl.load(rows_ptr + (bh * R + row[:, None]) * D + ch[None, :], mask=row[:, None] < R, other=0.0)
    logits = tl.dot(q, tl.trans(keys), input_precision="ieee")  # [BLOCK_R, BLOCK_T]
    logits = tl.where(visible[None, :], logits, float("-inf"))
    m = tl.max(logits, axis=1)
    p = tl.exp(logits - tl.where(m == float("-inf"), 0.0, m)[:, None])  # a fully masked block: p = 0
    values = _unpack_dequant(vp_ptr, vs_ptr, vz_ptr, tok, ch, tmask, bh, N, D, G, BITS, True)
    acc = tl.dot(p, values, input_precision="ieee")  # [BLOCK_R, D]
    out = (bh * NB + blk) * BLOCK_R + row
    tl.store(m_ptr + out, m)
    tl.store(l_ptr + out, tl.sum(p, axis=1))
    tl.store(acc_ptr + out[:, None] * D + ch[None, :], acc)


def _attend_tier(rows: Tensor, tier: KVTier, padding: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(output [B, H_kv, r, d], lse [B, H_kv, r])`` of ``rows`` over one tier's tokens."""
    b, h, r, d = rows.shape
    n = tier.n_tokens
    nb = triton.cdiv(n, BLOCK_T)
    block_r = max(16, triton.next_power_of_2(r))  # tl.dot needs at least 16 rows
    m = torch.empty(b * h, nb, block_r, dtype=torch.float32, device=rows.device)
    l = torch.empty_like(m)
    acc = torch.empty(b * h, nb, block_r, d, dtype=torch.float32, device=rows.device)
    valid = None if padding is None else (~padding.reshape(b, h, n)).to(torch.uint8).contiguous()
    k, v = tier.keys, tier.values
    _attend_tier_kernel[(b * h, nb)](
        rows.contiguous(), k.packed.contiguous(), k.scale.contiguous(), k.zero.contiguous(),
        v.packed.contiguous(), v.scale.contiguous(), v.zero.contiguous(),
        valid if valid is not None else m, m, l, acc, n, nb, r,
        D=d, G=k.group_size, BITS=tier.bits, KEY_TOKEN_AXIS=k.axis == "token", HAS_VALID=valid is not None,
        BLOCK_R=block_r, BLOCK_T=BLOCK_T,
    )
    # Blocks become parts [NB, B * H_kv, r(, d)]: normalised output and log-sum-exp (-inf when empty).
    m, l, acc = m[..., :r].transpose(0, 1), l[..., :r].transpose(0, 1), acc[..., :r, :].transpose(0, 1)
    out, lse = merge_stacked(acc / torch.where(l > 0, l, 1.0).unsqueeze(-1), m + torch.log(l))
    return out.view(b, h, r, d), lse.view(b, h, r)


def attend_layer(
    rows: Tensor,
    tiers: Sequence[KVTier],
    dense: DensePart,
    padding: Sequence[Tensor | None] | None = None,
    scratch: object = None,
) -> Tensor:
    """Triton twin of :func:`kvcomp_plugins.quantizers.attend.attend_layer`: attention of ``rows
    [B, H_kv, r, d]`` (float32, already scaled) over every tier and the dense part; ``[B, H_kv, r, d]``.

    ``scratch`` is accepted for the common signature and unused (no staging buffers here).
    ``d`` must be a power of two (``tl.arange``) and at least 16 (``tl.dot``).
    """
    d = rows.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Triton decode kernel needs a head dim that is a power of two >= 16, got {d}")
    parts = [attend_dense(rows, dense.keys, dense.values, dense.mask)]
    for i, tier in enumerate(tiers):
        if tier.n_tokens:
            parts.append(_attend_tier(rows.to(torch.float32), tier, None if padding is None else padding[i]))
    return merge_parts(parts)
