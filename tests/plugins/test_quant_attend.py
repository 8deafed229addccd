"""Decode attention read straight from packed tiers, against attention over the dequantised tiers."""

from __future__ import annotations

import pytest
import torch

from kvcore.decode_attention import attend_dense, merge_into_nonempty, merge_parts
from kvcore.types import KVTier
from kvcomp_plugins.quantizers.attend import attend_tiers
from kvcomp_plugins.quantizers.packing import quantize_pack, unpack_dequantize


def _tier(bits: int, n: int, key_axis: str, seed: int, b: int = 2, h: int = 3, d: int = 16, g: int = 8) -> KVTier:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=gen) * torch.linspace(0.5, 4.0, d)  # outlier-ish channels
    values = torch.randn(b, h, n, d, generator=gen)
    positions = torch.arange(n, dtype=torch.int32).expand(b, h, n).contiguous()
    return KVTier(bits, positions, quantize_pack(keys, bits, g, key_axis), quantize_pack(values, bits, g, "token"))


def _reference(rows, tiers, padding=None):
    """Softmax attention over the concatenated dequantised tiers (what the old decode path built)."""
    keys = torch.cat([unpack_dequantize(t.keys, torch.float64) for t in tiers], dim=2)
    values = torch.cat([unpack_dequantize(t.values, torch.float64) for t in tiers], dim=2)
    logits = rows.double() @ keys.transpose(-1, -2)
    if padding is not None:
        logits = logits.masked_fill(torch.cat(padding, dim=-1), float("-inf"))
    return torch.softmax(logits, dim=-1) @ values, torch.logsumexp(logits, dim=-1)


@pytest.mark.parametrize("key_axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [5, 8, 29])  # shorter than a group, one full group, groups plus a partial one
def test_one_tier_matches_attention_over_its_dequantised_values(bits, key_axis, n):
    tier = _tier(bits, n, key_axis, seed=bits * 100 + n)
    rows = torch.randn(2, 3, 6, 16, generator=torch.Generator().manual_seed(n))
    out, lse = attend_tiers(rows, [tier])
    ref_out, ref_lse = _reference(rows, [tier])
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key_axis", ["channel", "token"])
def test_mixed_tiers_with_padding_share_one_softmax(key_axis):
    tiers = [_tier(8, 11, key_axis, 1), _tier(4, 40, key_axis, 2), _tier(2, 17, key_axis, 3), _tier(8, 8, key_axis, 4)]
    padding = [torch.zeros(2, 3, 1, t.n_tokens, dtype=torch.bool) for t in tiers]
    padding[1][0, :, :, :7] = True  # row 0 is left-padded in the 4-bit tier
    rows = torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(9))
    out, lse = attend_tiers(rows, tiers, padding)
    ref_out, ref_lse = _reference(rows, tiers, padding)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    # Negative control: ignoring the padding gives a different answer, so the mask is really applied.
    unmasked, _ = attend_tiers(rows, tiers)
    assert (unmasked[0] - out[0]).abs().max() > 1e-3


def test_tiers_quantised_differently_are_refused():
    with pytest.raises(ValueError, match="one group size and one key grouping"):
        attend_tiers(torch.zeros(2, 3, 1, 16), [_tier(8, 8, "channel", 1), _tier(8, 8, "token", 2)])


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
    # The two-part form used while decoding agrees, also when the first part is empty.
    torch.testing.assert_close(merge_into_nonempty(split[0], split[1]), merge_parts(split[:2]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merge_into_nonempty(empty, split[1]), split[1][0], rtol=1e-6, atol=1e-7)
