"""Triton decode attention over packed tiers (flash-decoding style), the CUDA twin of :mod:`.attend`.

A decode step is host-bound on a GPU: every launch and every small torch op costs microseconds
of host time while the device work per layer is tiny. So one layer costs one launch per part
(each packed tier, the full-precision part) plus one merge launch, and nothing else:

1. ``_block_kernel``: program ``(batch row x KV head, block)`` reads one block of ``BLOCK_T``
   tokens of one part, unpacking and dequantising the codes in registers (keys per channel or per
   token, values per token; no dense copy of a tier is ever written), and stores the block's row
   maxima ``m``, sums ``l`` and unnormalised output ``acc`` into its slot of one buffer shared by
   all parts of the layer;
2. ``_merge_kernel``: one program per (batch row x KV head, query row) merges all slots exactly by
   their maxima and writes the normalised output.

One block per program, on purpose: a version whose programs walked several blocks each with an
online softmax (fewer slots to merge) decoded 6x slower at 32k tokens and batch 8 on an H200 than
one block per program had (12 against 78 tokens/s; docs/benchmarks.md, "On a GPU", 2026-12-04).

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

from kvcore.decode_attention import DensePart, attend_dense
from kvcore.types import KVTier

BLOCK_T = 64
"""Tokens per block (one ``tl.dot``)."""
NUM_WARPS = 8
"""Warps per block program. With Triton's default of 4, ptxas gives the program 255 registers a
thread and spills 136-1416 bytes of it to local memory (sm_90, every tier width and key axis,
triton 3.9.0);
with 8, 170-172 registers (64-bit offsets per batch row and KV head) and no spill
(``tests/plugins/test_quant_triton.py``)."""
BLOCK_P = 32
"""Slots the merge kernel reads at once."""
DENSE_BITS = 16
"""``BITS`` of the full-precision part: keys and values are loaded as they are stored."""


@triton.jit
def _unpack_dequant(packed_ptr, scale_ptr, zero_ptr, tok, ch, tmask, bh, N, D: tl.constexpr, G: tl.constexpr,
                    BITS: tl.constexpr, TOKEN_AXIS: tl.constexpr):
    """Dequantised ``[BLOCK_T, D]`` float32 of tokens ``tok`` of one (batch row, KV head) ``bh``."""
    PER: tl.constexpr = 8 // BITS
    P: tl.constexpr = D // PER
    # (batch row, KV head) offsets in int64 (they pass 2**31 for long caches at batch > 1), added to
    # the base pointers once; the offsets within a block stay int32 (fewer registers).
    row0 = bh.to(tl.int64) * N
    byte = tl.load(packed_ptr + row0 * P + (tok[:, None] * P + ch[None, :] // PER), mask=tmask[:, None], other=0)
    code = ((byte.to(tl.int32) >> ((ch[None, :] % PER) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    if TOKEN_AXIS:
        NG: tl.constexpr = D // G
        base = row0 * NG
        stat = tok[:, None] * NG + ch[None, :] // G
    else:  # per channel: one statistics row per group of G tokens
        base = bh.to(tl.int64) * tl.cdiv(N, G) * D
        stat = (tok[:, None] // G) * D + ch[None, :]
    scale = tl.load(scale_ptr + base + stat, mask=tmask[:, None], other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + base + stat, mask=tmask[:, None], other=0.0).to(tl.float32)
    return code * scale + zero


@triton.jit
def _load_block(packed_ptr, scale_ptr, zero_ptr, tok, ch, tmask, bh, N, KV_STRIDE, D: tl.constexpr, G: tl.constexpr,
                BITS: tl.constexpr, TOKEN_AXIS: tl.constexpr):
    """``[BLOCK_T, D]`` float32 keys or values of one part: loaded (full precision, ``KV_STRIDE``
    elements per (batch row, KV head)) or unpacked and dequantised (a tier)."""
    if BITS == 16:
        return tl.load(packed_ptr + bh.to(tl.int64) * KV_STRIDE + (tok[:, None] * D + ch[None, :]), mask=tmask[:, None],
                       other=0.0).to(tl.float32)
    else:
        return _unpack_dequant(packed_ptr, scale_ptr, zero_ptr, tok, ch, tmask, bh, N, D, G, BITS, TOKEN_AXIS)


# Lengths and slot counts change from step to step: specialising on them (Triton compiles a variant
# for arguments equal to 1 or divisible by 16) would compile again in the middle of decoding.
@triton.jit(do_not_specialize=["N", "KV_STRIDE", "P", "SLOT0"])
def _block_kernel(
    rows_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, valid_ptr, m_ptr, l_ptr, acc_ptr,
    N, KV_STRIDE, P, SLOT0, R,
    D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, KEY_TOKEN_AXIS: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid ``(B * H_kv, blocks)``: block ``program_id(1)`` of one part for ``program_id(0)``,
    stored in slot ``SLOT0 + block`` of ``P``."""
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    ch = tl.arange(0, D)
    row = tl.arange(0, BLOCK_R)
    tok = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < N
    visible = tmask
    if HAS_VALID:
        visible = visible & (tl.load(valid_ptr + bh * N + tok, mask=tmask, other=0) != 0)
    q = tl.load(rows_ptr + (bh * R + row[:, None]) * D + ch[None, :], mask=row[:, None] < R, other=0.0)
    keys = _load_block(kp_ptr, ks_ptr, kz_ptr, tok, ch, tmask, bh, N, KV_STRIDE, D, G, BITS, KEY_TOKEN_AXIS)
    logits = tl.dot(q, tl.trans(keys), input_precision="ieee")  # [BLOCK_R, BLOCK_T]
    logits = tl.where(visible[None, :], logits, float("-inf"))
    m = tl.max(logits, axis=1)
    p = tl.exp(logits - tl.where(m == float("-inf"), 0.0, m)[:, None])  # nothing visible: every p is 0
    values = _load_block(vp_ptr, vs_ptr, vz_ptr, tok, ch, tmask, bh, N, KV_STRIDE, D, G, BITS, True)
    acc = tl.dot(p, values, input_precision="ieee")  # [BLOCK_R, D]
    slot = (bh.to(tl.int64) * P + SLOT0 + blk) * R + row
    live = row < R
    tl.store(m_ptr + slot, m, mask=live)
    tl.store(l_ptr + slot, tl.sum(p, axis=1), mask=live)
    tl.store(acc_ptr + slot[:, None] * D + ch[None, :], acc, mask=live[:, None])


@triton.jit(do_not_specialize=["P"])
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, P, R, D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Grid ``(B * H_kv * R,)``: the exact softmax merge of one query row's ``P`` slots."""
    i = tl.program_id(0).to(tl.int64)  # = bh * R + row
    bh = i // R
    row = i % R
    ch = tl.arange(0, D)
    top = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for start in range(0, P, BLOCK_P):
        s = start + tl.arange(0, BLOCK_P)
        top = tl.maximum(top, tl.load(m_ptr + (bh * P + s) * R + row, mask=s < P, other=float("-inf")))
    mx = tl.max(top, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # a row that saw nothing: output 0, not NaN
    l_sum = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_P, D], tl.float32)
    for start in range(0, P, BLOCK_P):
        s = start + tl.arange(0, BLOCK_P)
        live = s < P
        slot = (bh * P + s) * R + row
        w = tl.exp(tl.load(m_ptr + slot, mask=live, other=float("-inf")) - mx)
        l_sum += w * tl.load(l_ptr + slot, mask=live, other=0.0)
        acc += w[:, None] * tl.load(acc_ptr + slot[:, None] * D + ch[None, :], mask=live[:, None], other=0.0)
    total = tl.sum(l_sum, axis=0)
    tl.store(out_ptr + i * D + ch, tl.sum(acc, axis=0) / tl.where(total > 0.0, total, 1.0))


def attend_layer(
    rows: Tensor,
    tiers: Sequence[KVTier],
    dense: DensePart,
    padding: Sequence[Tensor | None] | None = None,
    scratch: object = None,
) -> Tensor:
    """Triton twin of :func:`kvcomp_plugins.quantizers.attend.attend_layer`: attention of ``rows
    [B, H_kv, r, d]`` (float32, already scaled) over every tier and the dense part; ``[B, H_kv, r, d]``.

    ``scratch`` is accepted for the common signature and unused (the slot buffers are a few
    allocations from torch's caching allocator). ``d`` must be a power of two (``tl.arange``) and
    at least 16 (``tl.dot``). A dense part with a mask (several queries, or padding) is attended by
    the torch path and enters the merge as one slot.
    """
    b, h, r, d = rows.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Triton decode kernel needs a head dim that is a power of two >= 16, got {d}")
    rows = rows.to(torch.float32).contiguous()
    bh = b * h
    parts = [(i, t) for i, t in enumerate(tiers) if t.n_tokens]
    n_dense = dense.keys.shape[-2]
    kernel_dense = dense.mask is None and n_dense > 0
    blocks = [triton.cdiv(t.n_tokens, BLOCK_T) for _, t in parts]
    n_slots = sum(blocks) + (triton.cdiv(n_dense, BLOCK_T) if kernel_dense else 1)
    m = torch.empty(bh, n_slots, r, dtype=torch.float32, device=rows.device)
    l = torch.empty_like(m)
    acc = torch.empty(bh, n_slots, r, d, dtype=torch.float32, device=rows.device)
    common = dict(D=d, BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_T=BLOCK_T)  # tl.dot needs 16 rows
    slot = 0
    for (i, tier), n_blocks in zip(parts, blocks):
        pad = None if padding is None else padding[i]
        valid = None if pad is None else (~pad.reshape(b, h, tier.n_tokens)).to(torch.uint8).contiguous()
        k, v = tier.keys, tier.values
        _block_kernel[(bh, n_blocks)](
            rows, k.packed.contiguous(), k.scale.contiguous(), k.zero.contiguous(),
            v.packed.contiguous(), v.scale.contiguous(), v.zero.contiguous(),
            valid if valid is not None else m, m, l, acc, tier.n_tokens, 0, n_slots, slot, r,
            G=k.group_size, BITS=tier.bits, KEY_TOKEN_AXIS=k.axis == "token", HAS_VALID=valid is not None, **common,
            num_warps=NUM_WARPS,
        )
        slot += n_blocks
    if kernel_dense:
        keys, values = _heads_flat(dense.keys, h), _heads_flat(dense.values, h)
        _block_kernel[(bh, n_slots - slot)](
            rows, keys, keys, keys, values, values, values, m, m, l, acc,
            n_dense, keys.stride(1), n_slots, slot, r,
            G=1, BITS=DENSE_BITS, KEY_TOKEN_AXIS=True, HAS_VALID=False, **common, num_warps=NUM_WARPS,
        )
    else:  # masked rows: the torch path, as one slot (m = lse, l = 1)
        out, lse = attend_dense(rows, dense.keys, dense.values, dense.mask)
        m[:, slot], l[:, slot], acc[:, slot] = lse.reshape(bh, r), 1.0, out.reshape(bh, r, d)
    out = torch.empty(b, h, r, d, dtype=torch.float32, device=rows.device)
    _merge_kernel[(bh * r,)](m, l, acc, out, n_slots, r, D=d, BLOCK_P=BLOCK_P)
    return out


def _heads_flat(x: Tensor, h: int) -> Tensor:
    """``x [B, H_kv, n, d]`` as the kernel reads a full-precision part: rows of ``d`` contiguous,
    tokens ``d`` apart, (batch row, KV head) pairs ``stride(1)`` apart. A view of the dense store
    (free slots behind its tokens) qualifies as it is; anything else is copied."""
    b, _, n, d = x.shape
    if x.stride(3) == 1 and x.stride(2) == d and x.stride(0) == h * x.stride(1):
        return x
    return x.contiguous()
