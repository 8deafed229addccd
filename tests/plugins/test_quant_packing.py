"""Laws of the torch reference quantiser: error bound, invertible packing, exact constants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcomp_plugins.quantizers import backends
from kvcomp_plugins.quantizers.packing import (
    error_tolerance,
    expand_stats,
    fp16_round_down,
    fp16_round_up,
    pack_codes,
    quantize_codes,
    quantize_pack,
    unpack_codes,
    unpack_dequantize,
)

SETTINGS = settings(max_examples=40, deadline=None)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@st.composite
def quant_cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, str]:
    """A small random ``[B, H_kv, n, d]`` tensor with a compatible (bits, group_size, axis)."""
    bits = draw(st.sampled_from([2, 4, 8]))
    axis = draw(st.sampled_from(["token", "channel"]))
    d = draw(st.sampled_from([8, 16, 24, 64]))
    group_size = draw(st.sampled_from([g for g in (4, 8, 16, 32) if axis == "channel" or d % g == 0]))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 40)), d)
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    magnitude = 10.0 ** draw(st.integers(-6, 3))
    offset = draw(st.sampled_from([0.0, 1.0, -300.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = (torch.randn(shape, generator=gen) * magnitude + offset).clamp(-6e4, 6e4).to(dtype)
    return x, bits, group_size, axis


@SETTINGS
@given(quant_cases())
def test_error_is_at_most_half_a_stored_scale(case: tuple[torch.Tensor, int, int, str]) -> None:
    x, bits, group_size, axis = case
    q = quantize_pack(x, bits, group_size, axis)
    err = (unpack_dequantize(q, torch.float32) - x.to(torch.float32)).abs()
    assert bool((err <= error_tolerance(x, q)).all()), float((err - error_tolerance(x, q)).max())


@SETTINGS
@given(quant_cases())
def test_layout_dtypes_and_stored_codes(case: tuple[torch.Tensor, int, int, str]) -> None:
    x, bits, group_size, axis = case
    b, h, n, d = x.shape
    q = quantize_pack(x, bits, group_size, axis)
    assert q.packed.dtype == torch.uint8 and tuple(q.packed.shape) == (b, h, n, d * bits // 8)
    stat_shape = (b, h, n, d // group_size) if axis == "token" else (b, h, -(-n // group_size), d)
    assert q.scale.dtype == q.zero.dtype == torch.float16
    assert tuple(q.scale.shape) == tuple(q.zero.shape) == stat_shape
    assert q.shape == (b, h, n, d) and q.nbytes == q.packed.nbytes + q.scale.nbytes + q.zero.nbytes
    # The unpacked bytes are exactly the codes the recipe gives with the stored statistics.
    expected = quantize_codes(
        x.to(torch.float32),
        expand_stats(q.scale, n, d, group_size, axis),
        expand_stats(q.zero, n, d, group_size, axis),
        bits,
    )
    assert torch.equal(unpack_codes(q.packed, bits), expected)
    assert int(expected.max()) < 2**bits


@SETTINGS
@given(quant_cases())
def test_deterministic_bytes(case: tuple[torch.Tensor, int, int, str]) -> None:
    x, bits, group_size, axis = case
    a, b = quantize_pack(x, bits, group_size, axis), quantize_pack(x.clone(), bits, group_size, axis)
    assert torch.equal(a.packed, b.packed)
    assert torch.equal(a.scale.view(torch.int16), b.scale.view(torch.int16))
    assert torch.equal(a.zero.view(torch.int16), b.zero.view(torch.int16))


@SETTINGS
@given(quant_cases(), st.data())
def test_constant_groups_come_back_exactly(case: tuple[torch.Tensor, int, int, str], data: st.DataObject) -> None:
    x, bits, group_size, axis = case
    x = x.to(torch.float16)
    value = data.draw(st.sampled_from([0.0, 1.5, -3.25, 1e-7, 60000.0]))
    if axis == "token":  # a whole token row is constant -> all its channel groups are
        idx = data.draw(st.integers(0, x.shape[2] - 1))
        x[:, :, idx, :] = value
        sel = (slice(None), slice(None), idx, slice(None))
    else:  # a whole channel is constant -> all its token groups are
        idx = data.draw(st.integers(0, x.shape[3] - 1))
        x[:, :, :, idx] = value
        sel = (slice(None), slice(None), slice(None), idx)
    q = quantize_pack(x, bits, group_size, axis)
    for dtype in (torch.float16, torch.float32):
        assert torch.equal(unpack_dequantize(q, dtype)[sel], x[sel].to(dtype))


@settings(max_examples=50, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(1, 3), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_pack_unpack_is_invertible(bits: int, rows: int, bytes_per_row: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, bytes_per_row * 8 // bits), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, bytes_per_row)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_lowest_channel_sits_in_lowest_bits() -> None:
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_codes(torch.tensor([5, 12], dtype=torch.uint8), 4).tolist() == [5 | 12 << 4]
    assert pack_codes(torch.tensor([7, 200], dtype=torch.uint8), 8).tolist() == [7, 200]


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_spans_below_fp16_resolution_keep_the_bound(axis: str) -> None:
    # span / qmax underflows fp32 here; the scale must still be the smallest fp16, not 0.
    tiny = torch.tensor([0.0, 1e-40, 3e-45, 2e-39])
    x = torch.stack([tiny.roll(i) for i in range(4)]).reshape(1, 1, 4, 4)  # no constant row or column
    q = quantize_pack(x, 8, 4, axis)  # type: ignore[arg-type]
    assert bool((q.scale > 0).all())
    err = (unpack_dequantize(q, torch.float32) - x).abs()
    assert bool((err <= error_tolerance(x, q)).all())


def test_partial_last_token_group_stores_no_padding() -> None:
    x = torch.randn(1, 1, 37, 16)
    q = quantize_pack(x, 4, 16, "channel")
    assert q.scale.shape == (1, 1, 3, 16)
    # The third group only sees tokens 32..36.
    tail = x[0, 0, 32:].to(torch.float32)
    assert torch.equal(q.zero[0, 0, 2], fp16_round_down(tail.amin(dim=0)))


ALL_FP16 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)
FINITE_FP16 = np.unique(ALL_FP16[np.isfinite(ALL_FP16)])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-65504.0, 65504.0, width=32), min_size=1, max_size=20))
def test_directed_fp16_rounding_matches_brute_force(values: list[float]) -> None:
    v = torch.tensor(values, dtype=torch.float32)
    v64 = v.double().numpy()
    down = FINITE_FP16[np.searchsorted(FINITE_FP16, v64, side="right") - 1]
    up = FINITE_FP16[np.searchsorted(FINITE_FP16, v64, side="left")]
    assert np.array_equal(fp16_round_down(v).double().numpy(), down)
    assert np.array_equal(fp16_round_up(v).double().numpy(), up)


@pytest.mark.parametrize(
    ("shape", "bits", "group_size", "axis", "match"),
    [
        ((1, 1, 4, 16), 3, 8, "token", "bits=3"),
        ((1, 1, 4, 16), 0, 8, "token", "bits=0"),
        ((1, 1, 4, 16), 16, 8, "token", "bits=16"),
        ((1, 1, 4, 24), 4, 16, "token", "d=24 .*group_size=16"),
        ((1, 1, 4, 6), 2, 2, "channel", "d=6 .*divisible by 4"),
        ((1, 1, 4, 16), 4, 0, "token", "group_size=0"),
        ((1, 1, 4, 16), 4, 8, "tokens", "axis='tokens'"),
        ((4, 16), 4, 8, "token", r"\[B, H_kv, n, d\]"),
    ],
)
def test_bad_arguments_are_refused(shape: tuple[int, ...], bits: int, group_size: int, axis: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize_pack(torch.zeros(shape), bits, group_size, axis)  # type: ignore[arg-type]


def test_auto_backend_on_cpu_stores_the_torch_references_bytes() -> None:
    x = torch.randn(1, 2, 8, 16)
    # The C kernel where it builds (tests/plugins/test_quant_native.py), else the reference itself.
    assert backends.select_backend("auto", x.device).__name__.rsplit(".", 1)[-1] in ("native", "packing")
    q = backends.quantize_pack(x, 4, 8, "token", backend="auto")
    assert torch.equal(q.packed, quantize_pack(x, 4, 8, "token").packed)
    with pytest.raises(ValueError, match="backend='cuda'"):
        backends.quantize_pack(x, 4, 8, "token", backend="cuda")  # type: ignore[arg-type]


def _np_fp16_directed(v: np.ndarray, down: bool) -> np.ndarray:
    """Nearest fp16 at or below (``down``) / at or above ``v`` (float32), by stepping NumPy's
    round-to-nearest result one ulp when it landed on the wrong side."""
    h = v.astype(np.float16)
    wrong = (h.astype(np.float32) > v) if down else (h.astype(np.float32) < v)
    return np.where(wrong, np.nextafter(h, np.float16(-np.inf if down else np.inf)), h)


def _np_reference(x: np.ndarray, bits: int, group_size: int, axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scale, zero, codes)`` from the definition, in plain NumPy and independent of the code under
    test: per group zero = min rounded down to fp16, scale = (max - zero) / qmax rounded up to fp16
    (at least the smallest fp32 when max > zero), code = clamp(floor((x - zero) / scale + 0.5), 0, qmax)."""
    qmax = np.float32(2**bits - 1)
    b, h, n, d = x.shape
    if axis == "token":
        starts, stat_shape = range(0, d, group_size), (b, h, n, d // group_size)
    else:
        starts, stat_shape = range(0, n, group_size), (b, h, -(-n // group_size), d)
    scale, zero = np.zeros(stat_shape, np.float16), np.zeros(stat_shape, np.float16)
    codes = np.zeros(x.shape, np.uint8)
    for gi, s in enumerate(starts):
        sl = (..., slice(None), slice(s, s + group_size)) if axis == "token" else (..., slice(s, s + group_size), slice(None))
        g = x[sl]
        red = -1 if axis == "token" else -2
        z = _np_fp16_directed(g.min(axis=red), down=True)
        span = g.max(axis=red) - z.astype(np.float32)
        with np.errstate(under="ignore"):
            step = np.where(span > 0, np.maximum(span / qmax, np.float32(1.4e-45)), np.float32(0))
        sc = _np_fp16_directed(step.astype(np.float32), down=False)
        sc32, z32 = np.expand_dims(sc.astype(np.float32), red), np.expand_dims(z.astype(np.float32), red)
        t = (g - z32) / np.where(sc32 > 0, sc32, np.float32(1))
        codes[sl] = np.clip(np.floor(t + np.float32(0.5)), 0, qmax).astype(np.uint8)
        if axis == "token":
            scale[..., gi], zero[..., gi] = sc, z
        else:
            scale[..., gi, :], zero[..., gi, :] = sc, z
    return scale, zero, codes


@SETTINGS
@given(quant_cases())
def test_scale_zero_and_codes_match_an_independent_numpy_reference(case: tuple[torch.Tensor, int, int, str]) -> None:
    x, bits, group_size, axis = case
    q = quantize_pack(x, bits, group_size, axis)
    x32 = x.to(torch.float32).numpy()
    scale, zero, codes = _np_reference(x32, bits, group_size, axis)
    np.testing.assert_array_equal(q.zero.numpy(), zero)
    np.testing.assert_array_equal(q.scale.numpy(), scale)
    np.testing.assert_array_equal(unpack_codes(q.packed, bits).numpy(), codes)
    # The error bound, with the reference's scale: an inflated stored scale cannot loosen it.
    n, d = x.shape[2], x.shape[3]
    ref_scale = expand_stats(torch.from_numpy(scale), n, d, group_size, axis).to(torch.float32).numpy()
    err = np.abs(unpack_dequantize(q, torch.float32).numpy() - x32)
    assert bool((err <= ref_scale / 2 + 2.0**-20 * (np.abs(x32) + 256 * ref_scale + np.abs(zero).max())).all())
