"""Decode attention read straight from packed tiers plus a dense part, against one softmax over the
dequantised tiers and the dense tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore.decode_attention import DensePart, attend_dense, merge_parts
from kvcore.types import KVTier
from kvcomp_plugins.native import _cpu_flags
from kvcomp_plugins.quantizers import attend, native
from kvcomp_plugins.quantizers.packing import quantize_pack, unpack_dequantize


IMPLEMENTATIONS = [
    pytest.param(attend.attend_layer, id="torch"),
    pytest.param(native.attend_layer, id="native"),
]


def _tier(bits: int, n: int, key_axis: str, seed: int, b: int = 2, h: int = 3, d: int = 16, g: int = 8) -> KVTier:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=gen) * torch.linspace(0.5, 4.0, d)  # outlier-ish channels
    values = torch.randn(b, h, n, d, generator=gen)
    positions = torch.arange(n, dtype=torch.int32).expand(b, h, n).contiguous()
    return KVTier(bits, positions, quantize_pack(keys, bits, g, key_axis), quantize_pack(values, bits, g, "token"))


def _dense(b: int, h: int, n: int, d: int, seed: int, mask: torch.Tensor | None = None) -> DensePart:
    gen = torch.Generator().manual_seed(seed)
    # Keys as large as the tiers' (whose channels reach 4x), so the dense tokens carry real weight.
    return DensePart(3 * torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen), mask)


def _reference(rows, tiers, dense, padding=None):
    """One softmax over the concatenated dequantised tiers and the dense tokens (what the old
    decode path built)."""
    keys = torch.cat([*(unpack_dequantize(t.keys, torch.float64) for t in tiers), dense.keys.double()], dim=2)
    values = torch.cat([*(unpack_dequantize(t.values, torch.float64) for t in tiers), dense.values.double()], dim=2)
    logits = rows.double() @ keys.transpose(-1, -2)
    visible = torch.ones_like(logits, dtype=torch.bool)
    if padding is not None:
        visible[..., : -dense.keys.shape[2]] &= ~torch.cat(padding, dim=-1)
    if dense.mask is not None:
        visible[..., -dense.keys.shape[2] :] &= dense.mask
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1) @ values


@pytest.mark.parametrize("attend_layer", IMPLEMENTATIONS)
@pytest.mark.parametrize("key_axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [5, 8, 29])  # shorter than a group, one full group, groups plus a partial one
def test_one_tier_matches_attention_over_its_dequantised_values(bits, key_axis, n, attend_layer):
    tier = _tier(bits, n, key_axis, seed=bits * 100 + n)
    rows = torch.randn(2, 3, 6, 16, generator=torch.Generator().manual_seed(n))
    dense = _dense(2, 3, 4, 16, seed=n)
    torch.testing.assert_close(attend_layer(rows, [tier], dense).double(), _reference(rows, [tier], dense), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attend_layer", IMPLEMENTATIONS)
@pytest.mark.parametrize("key_axis", ["channel", "token"])
def test_mixed_tiers_with_padding_share_one_softmax(key_axis, attend_layer):
    tiers = [_tier(8, 11, key_axis, 1), _tier(4, 40, key_axis, 2), _tier(2, 17, key_axis, 3), _tier(8, 8, key_axis, 4)]
    padding = [torch.zeros(2, 3, 1, t.n_tokens, dtype=torch.bool) for t in tiers]
    padding[1][0, :, :, :7] = True  # row 0 is left-padded in the 4-bit tier
    mask = torch.ones(2, 3, 4, 5, dtype=torch.bool)
    mask[1, :, :2, 3:] = False  # the first rows of batch row 1 must not see the last dense tokens (causal)
    dense = _dense(2, 3, 5, 16, seed=8, mask=mask)
    rows = torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(9))
    out = attend_layer(rows, tiers, dense, padding)
    torch.testing.assert_close(out.double(), _reference(rows, tiers, dense, padding), rtol=1e-4, atol=1e-5)
    # Negative controls: ignoring the padding or the dense mask gives a different answer, so both are applied.
    assert (attend_layer(rows, tiers, dense)[0] - out[0]).abs().max() > 1e-3
    unmasked = attend_layer(rows, tiers, DensePart(dense.keys, dense.values), padding)
    assert (unmasked[1, :, :2] - out[1, :, :2]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_kernel_reads_a_half_precision_dense_part(dtype):
    """The cache stores its full-precision tokens in float16 by default: the kernel reads them as
    stored, and agrees with the torch reference over the same values."""
    tiers = [_tier(4, 40, "channel", 2), _tier(2, 17, "channel", 3)]
    dense = _dense(2, 3, 5, 16, seed=8)
    half = DensePart(dense.keys.to(dtype), dense.values.to(dtype))
    rows = torch.randn(2, 3, 3, 16, generator=torch.Generator().manual_seed(9))
    expected = attend.attend_layer(rows, tiers, half)
    torch.testing.assert_close(native.attend_layer(rows, tiers, half), expected, rtol=1e-4, atol=1e-5)
    assert (native.attend_layer(rows, tiers, dense) - expected).abs().max() > 1e-4, "the dense part is read in its dtype"


@pytest.mark.parametrize("d", [64, 128])
def test_native_kernel_at_the_head_dims_it_is_specialised_for(d):
    """The C kernel compiles d = 64 and 128 as constants (unrolled loops): those paths too."""
    tiers = [_tier(8, 21, "channel", 1, d=d, g=32), _tier(4, 40, "channel", 2, d=d, g=32), _tier(2, 9, "channel", 3, d=d, g=32)]
    dense = _dense(2, 3, 5, d, seed=8)
    rows = torch.randn(2, 3, 3, d, generator=torch.Generator().manual_seed(9)) / d**0.5
    expected = _reference(rows, tiers, dense)
    torch.testing.assert_close(native.attend_layer(rows, tiers, dense).double(), expected, rtol=1e-4, atol=1e-5)


def test_a_long_chunk_of_queries_goes_to_the_torch_path_and_the_kernel_says_why_by_name():
    from kvcomp_plugins.quantizers import backends

    tiers, dense = [_tier(4, 40, "channel", 2)], _dense(2, 3, 5, 16, seed=8)
    rows = torch.randn(2, 3, native.MAX_ROWS + 1, 16, generator=torch.Generator().manual_seed(9))
    assert not native.supports(rows, dense)
    torch.testing.assert_close(backends.attend_layer(rows, tiers, dense, None), attend.attend_layer(rows, tiers, dense))
    with pytest.raises(ValueError, match="query rows per KV head"):
        native.attend_layer(rows, tiers, dense)


@pytest.mark.parametrize("attend_layer", IMPLEMENTATIONS)
@pytest.mark.parametrize("with_masks", [False, True])
def test_tiers_with_different_key_groupings_share_one_softmax(attend_layer, with_masks):
    """Prefill tiers with per-channel keys beside decoded tokens flushed with per-token keys."""
    tiers = [_tier(4, 40, "channel", 1), _tier(8, 3, "token", 2), _tier(2, 17, "channel", 3), _tier(8, 5, "token", 4)]
    padding, mask = None, None
    if with_masks:
        padding = [torch.zeros(2, 3, 1, t.n_tokens, dtype=torch.bool) for t in tiers]
        padding[0][0, :, :, :7] = True
        padding[1][1, :, :, :1] = True
        mask = torch.ones(2, 3, 4, 5, dtype=torch.bool)
        mask[1, :, :2, 3:] = False
    dense = _dense(2, 3, 5, 16, seed=8, mask=mask)
    rows = torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(9))
    out = attend_layer(rows, tiers, dense, padding)
    torch.testing.assert_close(out.double(), _reference(rows, tiers, dense, padding), rtol=1e-4, atol=1e-5)


def test_parts_merged_by_log_sum_exp_equal_one_softmax_over_all_keys():
    gen = torch.Generator().manual_seed(5)
    rows, keys, values = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 2, 30, 8, generator=gen), torch.randn(1, 2, 30, 8, generator=gen)
    whole, _ = attend_dense(rows, keys, values, None)
    split = [attend_dense(rows, keys[:, :, a:b], values[:, :, a:b], None) for a, b in [(0, 7), (7, 19), (19, 30)]]
    torch.testing.assert_close(merge_parts(split), whole, rtol=1e-5, atol=1e-6)
    # A part that attends to nothing (fully masked) adds nothing and yields no NaN.
    empty = attend_dense(rows, keys[:, :, :4], values[:, :, :4], torch.zeros(1, 2, 3, 4, dtype=torch.bool))
    assert torch.isneginf(empty[1]).all() and torch.equal(empty[0], torch.zeros_like(empty[0]))
    torch.testing.assert_close(merge_parts([*split, empty]), whole, rtol=1e-5, atol=1e-6)


def _long_layer(d: int, seed: int) -> tuple[list[KVTier], DensePart, list[torch.Tensor], torch.Tensor]:
    """Tiers long enough that the C kernel cuts each head's keys into several spans, with a
    stretch of padding longer than a span (a span some rows see nothing of) and a masked dense part."""
    tiers = [_tier(8, 300, "channel", seed, d=d, g=32), _tier(4, 700, "channel", seed + 1, d=d, g=32),
             _tier(2, 90, "channel", seed + 2, d=d, g=32), _tier(8, 40, "token", seed + 3, d=d, g=32)]
    padding = [torch.zeros(2, 3, 1, t.n_tokens, dtype=torch.bool) for t in tiers]
    padding[0][0] = True  # batch row 0 sees none of the 8-bit tier (longer than a span) ...
    padding[1][0, :, :, :200] = True  # ... nor the first 200 slots of the 4-bit one
    mask = torch.ones(2, 3, 4, 6, dtype=torch.bool)
    mask[1, :, :2, 4:] = False
    dense = _dense(2, 3, 6, d, seed=seed + 4, mask=mask)
    rows = torch.randn(2, 3, 4, d, generator=torch.Generator().manual_seed(seed + 5)) / d**0.5
    return tiers, dense, padding, rows


def _native_on_threads(threads: int, *args):
    """The C kernel's attention with torch (and so the kernel) on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return native.attend_layer(*args)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("d", [64, 128])
def test_native_kernel_merges_spans_of_long_layers(d, threads):
    """Each head's keys in several spans (merged by log-sum-exp), some of them all padding for a
    row: the same attention as one softmax, whatever the thread count."""
    tiers, dense, padding, rows = _long_layer(d, seed=d)
    total = sum(t.n_tokens for t in tiers) + dense.keys.shape[2]
    assert native.spans_per_head(total, 2 * 3, threads) > 1
    out = _native_on_threads(threads, rows, tiers, dense, padding)
    torch.testing.assert_close(out.double(), _reference(rows, tiers, dense, padding), rtol=1e-4, atol=1e-5)


def test_head_dims_the_kernel_does_not_serve_go_to_the_torch_path():
    from kvcomp_plugins.quantizers import backends

    tiers, dense = [_tier(4, 40, "channel", 2, d=24, g=8)], _dense(2, 3, 5, 24, seed=8)
    rows = torch.randn(2, 3, 3, 24, generator=torch.Generator().manual_seed(9))
    assert not native.supports(rows, dense)
    torch.testing.assert_close(backends.attend_layer(rows, tiers, dense, None), attend.attend_layer(rows, tiers, dense))
    with pytest.raises(ValueError, match="head_dim a multiple of 16"):
        native.attend_layer(rows, tiers, dense)


@pytest.mark.parametrize("flags", [
    pytest.param(["-DKVC_PORTABLE"], id="portable"),
    pytest.param(["-DKVC_PORTABLE", "-DKVC_NO_SHUFFLE", "-mno-avx512f", "-mno-avx2"], id="plain-loops"),
    pytest.param(["-mno-avx512f"], id="avx2", marks=pytest.mark.skipif("avx2" not in _cpu_flags().split(), reason="needs an AVX2 CPU")),
])
def test_every_build_of_the_decode_kernel_agrees(flags, tmp_path, monkeypatch):
    """The plain loops (other CPUs, old compilers) and the 8-lane AVX2 build compute what the
    AVX-512 build and the torch reference compute: built here into a fresh folder and swapped in."""
    import shutil

    from kvcomp_plugins import native as native_build

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or native.library() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("KVCOMP_CACHE_DIR", str(tmp_path))
    path, why = native_build._build(compiler, flags)
    assert path is not None, why
    monkeypatch.setattr(native, "library", lambda: native_build.load(path))
    for d, g in [(16, 8), (64, 32)]:
        tiers = [_tier(bits, n, axis, seed=bits + n, d=d, g=g) for bits, n, axis in [(8, 21, "channel"), (4, 300, "channel"),
                                                                                   (2, 9, "channel"), (4, 7, "token")]]
        padding = [torch.zeros(2, 3, 1, t.n_tokens, dtype=torch.bool) for t in tiers]
        padding[1][0, :, :, :11] = True
        dense = _dense(2, 3, 5, d, seed=8)
        rows = torch.randn(2, 3, 3, d, generator=torch.Generator().manual_seed(9)) / d**0.5
        torch.testing.assert_close(native.attend_layer(rows, tiers, dense, padding).double(),
                                   _reference(rows, tiers, dense, padding), rtol=1e-4, atol=1e-5)


@settings(max_examples=150, deadline=None)
@given(
    d=st.sampled_from([16, 32, 64, 128]),
    g_div=st.sampled_from([1, 2, 4]),
    parts=st.lists(st.tuples(st.sampled_from([2, 4, 8]), st.integers(1, 300), st.sampled_from(["channel", "token"])),
                   min_size=1, max_size=4),
    rows=st.integers(1, 40),
    n_dense=st.integers(1, 20),
    pad=st.integers(0, 300),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_native_kernel_matches_one_softmax_on_random_layers(d, g_div, parts, rows, n_dense, pad, threads, seed):
    """Any mix of tiers, group sizes (also narrower than a vector), query rows (also more than a
    block of 16), left padding and thread counts: the kernel equals one softmax over everything."""
    g = d // g_div
    tiers = [_tier(bits, n, axis, seed + i, b=2, h=2, d=d, g=g) for i, (bits, n, axis) in enumerate(parts)]
    padding = [torch.zeros(2, 2, 1, t.n_tokens, dtype=torch.bool) for t in tiers]
    padding[0][0, :, :, : min(pad, tiers[0].n_tokens)] = True
    dense = _dense(2, 2, n_dense, d, seed=seed)
    q = torch.randn(2, 2, rows, d, generator=torch.Generator().manual_seed(seed)) / d**0.5
    out = _native_on_threads(threads, q, tiers, dense, padding)
    torch.testing.assert_close(out.double(), _reference(q, tiers, dense, padding), rtol=1e-4, atol=1e-5)
