"""MixedPrecisionQuantizer / UniformQuantizer: who goes where, real bytes, errors, registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kvcore.protocols import LayerwiseQuantizer, Quantizer
from kvcore.registry import ComponentError, ComponentRegistry, get_registry, reset_registry
from kvcore.types import CompressedLayer, tensor_bytes
from kvcomp_plugins.quantizers import MixedPrecisionConfig, MixedPrecisionQuantizer, UniformQuantizer
from kvcomp_plugins.quantizers.packing import error_tolerance, quantize_pack, unpack_dequantize
from kvcomp_plugins.quantizers.tiers import tier_counts

@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[ComponentRegistry]:
    """The registry with only this distribution's quantizer plugin loaded (other plugins may be absent)."""
    monkeypatch.setenv("KVCOMP_PLUGINS", "quantizers")
    reset_registry()
    yield get_registry()
    reset_registry()


PAPER_TIERS = dict(frac_8bit=0.1, frac_4bit=0.2, frac_2bit=0.4, frac_drop=0.3)


def _layer(b: int, h: int, n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float16):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=gen).to(dtype)
    values = torch.randn(b, h, n, d, generator=gen).to(dtype)
    scores = torch.rand(b, h, n, generator=gen)
    positions = torch.arange(n).repeat(b, 1)
    return keys, values, positions, scores


def _all_stored_tensors(layer: CompressedLayer) -> list[torch.Tensor]:
    out = [layer.residual_keys, layer.residual_values, layer.residual_positions]
    for tier in layer.tiers:
        out += [tier.positions, tier.keys.packed, tier.keys.scale, tier.keys.zero]
        out += [tier.values.packed, tier.values.scale, tier.values.zero]
    return out


def test_bytes_at_paper_tiers_are_727020_or_23_1_percent_of_fp16() -> None:
    """K/V [1, 3, 4096, 64] fp16, tiers 8:0.1 4:0.2 2:0.4 drop:0.3, 4 sinks + R=128 in fp16.

    Per KV head: 132 fp16 tokens (33,792 B + 528 B positions); 3,964 candidates -> 396 at 8 bit
    (58,768 B), 793 at 4 bit (66,668 B), 1,586 at 2 bit (82,584 B), 1,189 dropped. Codes, fp16
    scales/zeros (keys per channel, groups of 32 tokens; values per token, groups of 32
    channels) and int32 positions: 242,340 B per head, 727,020 B in all = 23.11% of the
    3,145,728 B an fp16 cache of the same tokens takes.
    """
    keys, values, positions, scores = _layer(1, 3, 4096, 64)
    quantizer = MixedPrecisionQuantizer(residual_length=128, **PAPER_TIERS)
    layer = quantizer.compress(keys, values, positions, scores, positions < 4)
    fp16_bytes = 2 * 1 * 3 * 4096 * 64 * 2
    assert layer.kv_bytes == tensor_bytes(*_all_stored_tensors(layer)) == 727_020
    assert layer.kv_bytes / fp16_bytes == pytest.approx(0.23111, abs=1e-5) and layer.kv_bytes <= 0.25 * fp16_bytes
    assert layer.tokens_by_bits == {8: 396, 4: 793, 2: 1586, 16: 132}
    assert layer.dropped_tokens == 1189


@st.composite
def layers(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    """A small layer with optional left padding per row, sinks + window protected, random tiers."""
    b, h, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 70))
    keys, values, positions, scores = _layer(b, h, n, 16, seed=draw(st.integers(0, 1000)))
    for row in range(b):
        pad = draw(st.integers(0, n - 1))
        positions[row, :pad] = -1
        positions[row, pad:] = torch.arange(n - pad)
    protected = (positions >= 0) & (positions < 2)
    protected[:, n - draw(st.integers(0, 4)) :] = True
    protected &= positions >= 0
    cuts = sorted(draw(st.lists(st.integers(0, 100), min_size=3, max_size=3)))
    fracs = [cuts[0] / 100, (cuts[1] - cuts[0]) / 100, (cuts[2] - cuts[1]) / 100, (100 - cuts[2]) / 100]
    params = dict(zip(["frac_8bit", "frac_4bit", "frac_2bit", "frac_drop"], fracs))
    params["residual_length"] = draw(st.integers(0, 20))
    params["key_mode"] = draw(st.sampled_from(["channel", "token"]))
    params["group_size"] = 8
    if draw(st.booleans()):
        scores = None
    return keys, values, positions, scores, protected, params


def _parts(layer: CompressedLayer, row: int, head: int) -> list[list[int]]:
    """Stored positions of one (row, head): residual first, then each tier."""
    return [layer.residual_positions[row, head].tolist()] + [t.positions[row, head].tolist() for t in layer.tiers]


@settings(max_examples=40, deadline=None)
@given(layers())
def test_stored_tokens_partition_the_layer_and_follow_the_ranking(case) -> None:  # type: ignore[no-untyped-def]
    # Rows that differ are compressed one by one (test below): the split is checked on each alone.
    keys, values, positions, scores, protected, params = case
    for row in range(keys.shape[0]):
        _check_partition(*_real_row(keys, values, positions, scores, protected, row), params)
    # Rows alike (no padding, the same protected slots): one shared split of the whole batch.
    alike = torch.arange(keys.shape[2]).repeat(keys.shape[0], 1)
    _check_partition(keys, values, alike, scores, protected[-1:].expand_as(protected), params)


def _real_row(keys, values, positions, scores, protected, row):  # type: ignore[no-untyped-def]
    """Row ``row`` of a layer without its padding slots: what the row is alone."""
    real = (positions[row] >= 0).nonzero().flatten()
    return (
        keys[row : row + 1, :, real],
        values[row : row + 1, :, real],
        positions[row : row + 1, real],
        None if scores is None else scores[row : row + 1, :, real],
        protected[row : row + 1, real],
    )


def _check_partition(keys, values, positions, scores, protected, params) -> None:  # type: ignore[no-untyped-def]
    layer = MixedPrecisionQuantizer(**params).compress(keys, values, positions, scores, protected)
    b, h, n, _ = keys.shape
    assert layer.kv_bytes == tensor_bytes(*_all_stored_tensors(layer))
    assert [t.bits for t in layer.tiers] == sorted({t.bits for t in layer.tiers}, reverse=True)
    n_res = layer.residual_positions.shape[-1]
    fracs = [params["frac_8bit"], params["frac_4bit"], params["frac_2bit"]]
    counts = [c for c in tier_counts(n - n_res, fracs) if c]
    assert [t.n_tokens for t in layer.tiers] == counts  # same count for every head and row; empty tiers omitted
    assert n_res + sum(counts) + layer.dropped_tokens == n
    for tier in layer.tiers:
        assert tier.positions.dtype == torch.int32 and tuple(tier.positions.shape) == (b, h, tier.n_tokens)
    for row in range(b):
        real = positions[row][positions[row] >= 0].tolist()
        slot = {p: i for i, p in enumerate(positions[row].tolist()) if p >= 0}
        recent = positions[row, max(0, n - params["residual_length"]) :].tolist()
        must_keep = {p for p in positions[row][protected[row]].tolist() + recent if p >= 0}
        n_padding = n - len(real)
        for head in range(h):
            parts = _parts(layer, row, head)
            stored = [p for part in parts for p in part if p >= 0]
            assert len(stored) == len(set(stored)) and set(stored) <= set(real)  # nobody stored twice
            assert must_keep <= set(parts[0])
            dropped = sorted(set(real) - set(stored))
            stored_padding = sum(p < 0 for part in parts for p in part)
            assert len(dropped) + n_padding - stored_padding == layer.dropped_tokens  # every slot accounted for
            if dropped:  # padding is only stored when no real candidate is dropped
                assert all(p >= 0 for part in parts[1:] for p in part)
            # Each tier beats the next and the dropped tokens on (score, recency).
            rank = scores[row, head] if scores is not None else torch.zeros(n)
            keyed = [[(float(rank[slot[p]]), slot[p]) for p in part if p >= 0] for part in parts[1:] + [dropped]]
            for better, worse in zip(keyed, keyed[1:]):
                if better and worse:
                    assert min(better) >= max(worse)
            for part in parts[1:]:  # inside a tier: by position, padding last
                real_part = [p for p in part if p >= 0]
                assert part[: len(real_part)] == sorted(real_part)


@settings(max_examples=30, deadline=None)
@given(layers())
def test_each_row_of_a_batch_is_stored_exactly_as_it_would_be_alone(case) -> None:  # type: ignore[no-untyped-def]
    keys, values, positions, scores, protected, params = case
    assume(keys.shape[0] > 1 or bool((positions >= 0).all()))  # a lone padded row is not split (rows_differ)
    quantizer = MixedPrecisionQuantizer(**params)
    batch = quantizer.compress(keys, values, positions, scores, protected)
    widths = [t.bits for t in batch.tiers]
    for row in range(keys.shape[0]):
        alone = quantizer.compress(*_real_row(keys, values, positions, scores, protected, row))
        pairs = [(batch.residual_positions[row : row + 1], batch.residual_keys[row : row + 1], alone.residual_positions, alone.residual_keys)]
        for tier in alone.tiers:
            mine = batch.tiers[widths.index(tier.bits)]
            got = quantizer.dequantize(mine.keys, torch.float32)[row : row + 1], quantizer.dequantize(mine.values, torch.float32)[row : row + 1]
            ref = quantizer.dequantize(tier.keys, torch.float32), quantizer.dequantize(tier.values, torch.float32)
            pairs += [(mine.positions[row : row + 1], torch.cat(got, -1), tier.positions, torch.cat(ref, -1))]
        for got_pos, got_x, ref_pos, ref_x in pairs:
            k = ref_pos.shape[-1]
            assert torch.equal(got_pos[..., :k], ref_pos) and bool((got_pos[..., k:] == -1).all()), "fillers come last, masked"
            assert torch.equal(got_x[:, :, :k], ref_x), "the row's stored values are those of its single run"
        stored = sum(t.n_tokens for t in alone.tiers if t.bits not in widths)
        assert stored == 0, "every width the row uses exists in the batch"


@settings(max_examples=25, deadline=None)
@given(layers())
def test_round_trip_exact_residual_and_half_scale_tiers(case) -> None:  # type: ignore[no-untyped-def]
    keys, values, positions, scores, protected, params = case
    quantizer = MixedPrecisionQuantizer(**params)
    layer = quantizer.compress(keys, values, positions, scores, protected)
    b, h = keys.shape[:2]

    def originals(source: torch.Tensor, stored_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The source rows of each stored position (zeros for padding) and a real-token mask."""
        out = torch.zeros(*stored_positions.shape, source.shape[-1], dtype=source.dtype)
        for row in range(b):
            for head in range(h):
                for j, p in enumerate(stored_positions[row, head].tolist()):
                    if p >= 0:
                        out[row, head, j] = source[row, head, int((positions[row] == p).nonzero()[0])]
        return out, (stored_positions >= 0).unsqueeze(-1)

    for stored, source in ((layer.residual_keys, keys), (layer.residual_values, values)):
        orig, real = originals(source, layer.residual_positions)
        assert stored.dtype == torch.float16 and torch.equal(stored * real, orig * real)
    for tier in layer.tiers:
        for q, source in ((tier.keys, keys), (tier.values, values)):
            orig, real = originals(source, tier.positions)
            err = (quantizer.dequantize(q, torch.float32) - orig.float()).abs()
            assert bool(((err <= error_tolerance(orig, q)) | ~real).all())


def test_same_input_gives_identical_bytes() -> None:
    keys, values, positions, scores = _layer(2, 2, 100, 32, seed=5)
    protected = positions < 4
    quantizer = MixedPrecisionQuantizer(**PAPER_TIERS, residual_length=16)
    a, b = (quantizer.compress(keys, values, positions, scores, protected) for _ in range(2))
    for x, y in zip(_all_stored_tensors(a), _all_stored_tensors(b), strict=True):
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    assert a.dropped_tokens == b.dropped_tokens
    # ... and the bytes are the right ones: each tier packs exactly the tokens at its positions
    # (keys per channel, values per token), the residual holds those tokens unchanged.
    def at(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x.gather(2, pos.long().unsqueeze(-1).expand(*pos.shape, x.shape[-1]))

    assert torch.equal(a.residual_keys, at(keys, a.residual_positions))
    for tier in a.tiers:
        ref_k = quantize_pack(at(keys, tier.positions), tier.bits, 32, "channel")
        ref_v = quantize_pack(at(values, tier.positions), tier.bits, 32, "token")
        for got, ref in ((tier.keys, ref_k), (tier.values, ref_v)):
            assert torch.equal(got.packed, ref.packed) and torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)


def test_without_scores_the_most_recent_candidates_get_the_best_tiers() -> None:
    keys, values, positions, _ = _layer(1, 2, 40, 16)
    quantizer = MixedPrecisionQuantizer(frac_8bit=0.25, frac_4bit=0.25, frac_drop=0.5, residual_length=8, group_size=8)
    layer = quantizer.compress(keys, values, positions, None, positions < 2)
    # Candidates are positions 2..31 (30 tokens): 8 bit gets 24..31, 4 bit 16..23 (rounded half up: 8, 15 -> 7).
    assert layer.tiers[0].positions[0, 0].tolist() == list(range(24, 32))
    assert layer.tiers[1].positions[0, 1].tolist() == list(range(17, 24))
    assert layer.residual_positions[0, 0].tolist() == [0, 1] + list(range(32, 40))
    assert layer.dropped_tokens == 15


def test_rows_with_different_padding_stay_regular() -> None:
    keys, values, positions, scores = _layer(2, 2, 24, 16)
    positions[1, :10] = -1
    positions[1, 10:] = torch.arange(14)
    protected = (positions >= 0) & (positions < 2)
    layer = MixedPrecisionQuantizer(frac_8bit=0.5, frac_4bit=0.5, residual_length=4, group_size=8).compress(
        keys, values, positions, scores, protected
    )
    # Row 0 has 18 candidates (9 + 9), row 1 only 8 real ones: alone it stores 4 + 4, and in
    # the batch each of its tiers is topped up with 5 filler slots (position -1) at the end.
    assert layer.residual_positions.shape == (2, 2, 6) and layer.dropped_tokens == 0
    assert [t.n_tokens for t in layer.tiers] == [9, 9]
    row1 = sorted(p for t in layer.tiers for p in t.positions[1, 0].tolist())
    assert row1 == [-1] * 10 + list(range(2, 10))
    for tier in layer.tiers:
        assert bool((tier.positions[1, :, :4] >= 2).all()) and bool((tier.positions[1, :, 4:] == -1).all())


def test_residual_covers_everything_when_the_layer_is_short() -> None:
    keys, values, positions, scores = _layer(1, 1, 10, 16)
    quantizer = MixedPrecisionQuantizer(residual_length=128, group_size=8)
    layer = quantizer.compress(keys, values, positions, scores, positions < 4)
    assert layer.tiers == [] and layer.residual_positions.tolist() == [[list(range(10))]]
    assert torch.equal(layer.residual_keys, keys) and layer.dropped_tokens == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_residual_dtype(dtype: str) -> None:
    keys, values, positions, scores = _layer(1, 1, 40, 16, dtype=torch.float32)
    layer = MixedPrecisionQuantizer(residual_length=8, residual_dtype=dtype, group_size=8).compress(
        keys, values, positions, scores, positions < 2
    )
    assert layer.residual_keys.dtype == layer.residual_values.dtype == getattr(torch, dtype)


def test_key_modes_group_keys_per_channel_or_per_token() -> None:
    keys, values, positions, scores = _layer(1, 2, 80, 32)
    for mode, key_scale in (("channel", (1, 2, 5, 32)), ("token", (1, 2, 40, 4))):
        quantizer = MixedPrecisionQuantizer(
            frac_4bit=0.5, frac_drop=0.5, residual_length=0, group_size=8, key_mode=mode
        )
        layer = quantizer.compress(keys, values, positions, scores, torch.zeros(1, 80, dtype=torch.bool))
        (tier,) = layer.tiers
        assert tier.keys.axis == mode and tuple(tier.keys.scale.shape) == key_scale
        assert tier.values.axis == "token" and tuple(tier.values.scale.shape) == (1, 2, 40, 4)


def test_quantize_block_uses_flush_bits() -> None:
    quantizer = MixedPrecisionQuantizer(flush_bits=4, group_size=16)
    assert quantizer.flush_tokens == 16 and quantizer.residual_length == 128
    keys, values, _, _ = _layer(2, 3, 16, 32)
    positions = torch.arange(100, 116).expand(2, 3, 16)
    tier = quantizer.quantize_block(keys, values, positions)
    assert tier.bits == 4 and tier.positions.dtype == torch.int32 and torch.equal(tier.positions, positions.int())
    assert tier.keys.packed.shape == (2, 3, 16, 16) and tier.keys.axis == "channel"
    err = (quantizer.dequantize(tier.values, torch.float32) - values.float()).abs()
    assert bool((err <= error_tolerance(values, tier.values)).all())
    with pytest.raises(ValueError, match="positions must be"):
        quantizer.quantize_block(keys, values, positions[:, :, :4])


def test_quantize_block_groups_keys_by_flush_key_mode() -> None:
    quantizer = MixedPrecisionQuantizer(group_size=16, residual_length=0, flush_tokens=1, flush_key_mode="token")
    keys, values, _, _ = _layer(1, 2, 1, 32)
    tier = quantizer.quantize_block(keys, values, torch.full((1, 2, 1), 7))
    # One token: one scale per 16 channels, not one per channel (as per-channel groups would need).
    assert tier.keys.axis == "token" and tuple(tier.keys.scale.shape) == (1, 2, 1, 2)
    assert MixedPrecisionQuantizer(group_size=16).quantize_block(keys, values, torch.full((1, 2, 1), 7)).keys.axis == "channel"


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("residual_length", [0, 5])
def test_protected_bits_8_stores_protected_tokens_as_an_8_bit_tier(backend: str, residual_length: int) -> None:
    keys, values, positions, scores = _layer(2, 2, 60, 32, dtype=torch.float32)
    protected = torch.zeros(2, 60, dtype=torch.bool)
    protected[:, [0, 1, 2, 3, 30, 31, 57]] = True  # sinks, a question, one protected slot inside the last R
    params = dict(frac_8bit=0.1, frac_4bit=0.2, frac_drop=0.7, group_size=8, residual_length=residual_length, backend=backend)
    fp16 = MixedPrecisionQuantizer(**params).compress(keys, values, positions, scores, protected)
    eight = MixedPrecisionQuantizer(**params, protected_bits=8).compress(keys, values, positions, scores, protected)
    recent = list(range(60 - residual_length, 60))
    old = [0, 1, 2, 3, 30, 31] + ([57] if residual_length == 0 else [])
    assert eight.residual_positions[0, 0].tolist() == sorted(set(recent) | ({57} - set(old)))
    first = eight.tiers[0]
    assert first.bits == 8 and first.positions[1, 1].tolist() == old
    # The candidates are split exactly as before; the protected tier holds what the residual held.
    assert [t.positions.tolist() for t in eight.tiers[1:]] == [t.positions.tolist() for t in fp16.tiers]
    assert eight.dropped_tokens == fp16.dropped_tokens
    err = (unpack_dequantize(first.keys, torch.float32) - keys[:, :, old]).abs()
    assert bool((err <= error_tolerance(keys[:, :, old], first.keys)).all())
    assert tensor_bytes(*_all_stored_tensors(eight)) < tensor_bytes(*_all_stored_tensors(fp16))


def test_uniform_stores_every_candidate_at_one_width() -> None:
    keys, values, positions, scores = _layer(1, 2, 300, 64)
    layer = UniformQuantizer(bits=2, residual_length=32).compress(keys, values, positions, scores, positions < 4)
    assert layer.tokens_by_bits == {2: 264, 16: 36} and layer.dropped_tokens == 0
    assert isinstance(UniformQuantizer(bits=8), Quantizer) and isinstance(MixedPrecisionQuantizer(), Quantizer)


@pytest.mark.parametrize(
    ("avg_bits", "expected"),
    [
        (0.0, ((8, 0.0), (4, 0.0), (2, 0.0))),
        (2.0, ((8, 0.0), (4, 0.5), (2, 0.0))),
        (4.0, ((8, 0.0), (4, 1.0), (2, 0.0))),
        (6.0, ((8, 0.5), (4, 0.5), (2, 0.0))),
        (8.0, ((8, 1.0), (4, 0.0), (2, 0.0))),
    ],
)
def test_avg_bits_rule(avg_bits: float, expected: tuple[tuple[int, float], ...]) -> None:
    assert MixedPrecisionConfig(avg_bits=avg_bits).tier_fractions() == expected


def test_default_and_partial_fractions() -> None:
    assert MixedPrecisionConfig().tier_fractions() == ((8, 0.1), (4, 0.55), (2, 0.0))
    assert MixedPrecisionConfig(frac_4bit=1.0).tier_fractions() == ((8, 0.0), (4, 1.0), (2, 0.0))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"frac_8bit": 0.5, "frac_4bit": 0.2}, "sum to 1"),
        ({"frac_8bit": -0.1, "frac_4bit": 1.1}, "frac_8bit"),
        ({"frac_4bit": 1.0, "avg_bits": 4.0}, "mutually exclusive"),
        ({"avg_bits": 9.0}, "avg_bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": "32"}, "group_size"),
        ({"flush_bits": 3}, "flush_bits"),
        ({"key_mode": "head"}, "key_mode"),
        ({"flush_key_mode": "head"}, "flush_key_mode"),
        ({"protected_bits": 12}, "protected_bits"),
        ({"protected_bits": 8.0}, "protected_bits"),
        ({"bits": 4}, "bits"),
        ({**PAPER_TIERS, "budget_by_layer": {4: 1.5}}, r"budget_by_layer: layer 4 multiplies .* use at most 1.429"),
        ({**PAPER_TIERS, "budget_by_layer": {0: -0.5}}, "budget_by_layer: layer 0 has multiplier -0.5"),
        ({**PAPER_TIERS, "budget_by_layer": {0: float("nan")}}, "budget_by_layer: layer 0 has multiplier nan"),
        ({**PAPER_TIERS, "budget_by_layer": {-1: 0.5}}, "layer -1 is negative"),
        ({**PAPER_TIERS, "budget_by_layer": {"early": 0.5}}, "layer 'early' is not a layer index"),
        ({**PAPER_TIERS, "budget_by_layer": [0.5]}, "budget_by_layer"),
    ],
)
def test_bad_config_is_refused_naming_the_field(params: dict, match: str, registry: ComponentRegistry) -> None:
    with pytest.raises(ValidationError, match=match):
        MixedPrecisionQuantizer(**params)
    with pytest.raises(ComponentError, match=match):
        registry.create("quantizer", "mixed_precision", params)


@pytest.mark.parametrize("bits", [0, 1, 3, 16])
def test_uniform_refuses_bits_outside_2_4_8(bits: int, registry: ComponentRegistry) -> None:
    with pytest.raises(ComponentError, match=r"quantizer\.bits"):
        registry.create("quantizer", "uniform", {"bits": bits})


def test_registry_builds_both_quantizers(registry: ComponentRegistry) -> None:
    q = registry.create("quantizer", "mixed_precision", {**PAPER_TIERS, "residual_length": 64, "key_mode": "token"})
    assert isinstance(q, MixedPrecisionQuantizer) and q.residual_length == 64 and q.config.key_mode == "token"
    assert q.tier_fractions == ((8, 0.1), (4, 0.2), (2, 0.4))
    u = registry.create("quantizer", "uniform", {"bits": 8})
    assert isinstance(u, UniformQuantizer) and u.tier_fractions == ((8, 1.0),)
    spec = registry.get("quantizer", "mixed_precision")
    assert spec.config_model is MixedPrecisionConfig and spec.description


@pytest.mark.parametrize(
    ("shape", "group_size", "match"),
    [((1, 2, 40, 24), 16, "d=24 .*group_size=16"), ((1, 2, 40, 6), 2, "d=6 .*divisible by 4")],
)
def test_head_dim_incompatible_with_groups_or_packing(shape: tuple[int, ...], group_size: int, match: str) -> None:
    keys = torch.randn(shape)
    positions = torch.arange(shape[2])[None]
    # A 2-bit tier, so that packing's divisibility rule is in play.
    fractions = {"frac_8bit": 0.1, "frac_4bit": 0.35, "frac_2bit": 0.15, "frac_drop": 0.4}
    quantizer = MixedPrecisionQuantizer(group_size=group_size, residual_length=4, **fractions)
    with pytest.raises(ValueError, match=match):
        quantizer.compress(keys, keys, positions, None, positions < 1)


def test_bad_layer_inputs_are_refused() -> None:
    keys, values, positions, scores = _layer(1, 2, 40, 16)
    quantizer = MixedPrecisionQuantizer(group_size=8)
    protected = positions < 2
    with pytest.raises(ValueError, match="keys/values"):
        quantizer.compress(keys, values[:, :1], positions, scores, protected)
    with pytest.raises(ValueError, match="positions"):
        quantizer.compress(keys, values, positions.float(), scores, protected)
    with pytest.raises(ValueError, match="protected"):
        quantizer.compress(keys, values, positions, scores, protected.int())
    with pytest.raises(ValueError, match="scores"):
        quantizer.compress(keys, values, positions, scores[:, :1], protected)


def test_stored_residual_owns_its_memory_in_the_storage_dtype() -> None:
    keys, values, positions, scores = _layer(1, 1, 100, 32, dtype=torch.float16)
    layer = MixedPrecisionQuantizer(residual_length=16).compress(keys, values, positions, scores, positions < 4)
    for t in (layer.residual_keys, layer.residual_values):
        # Its storage is its own: no view into the gathered tokens of every part.
        assert t.untyped_storage().nbytes() == tensor_bytes(t)


def test_budget_by_layer_scales_the_stored_fractions_from_each_first_layer_on() -> None:
    config = MixedPrecisionConfig(**PAPER_TIERS, budget_by_layer={"2": 0.5, 5: 1.4})  # a JSON-style key too
    assert config.budget_by_layer == {2: 0.5, 5: 1.4}
    assert [config.budget_at(layer) for layer in range(7)] == [1.0, 1.0, 0.5, 0.5, 0.5, 1.4, 1.4]


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_a_layers_quantizer_stores_what_one_with_its_scaled_fractions_stores(backend: str) -> None:
    keys, values, positions, scores = _layer(1, 2, 400, 64, seed=3)
    protected = positions < 4
    base = MixedPrecisionQuantizer(**PAPER_TIERS, residual_length=16, backend=backend, budget_by_layer={1: 0.5, 3: 1.2})
    assert isinstance(base, LayerwiseQuantizer)
    assert base.for_layer(0) is base and base.for_layer(3) is base.for_layer(7), "one copy per multiplier"
    for layer, factor in ((1, 0.5), (3, 1.2)):
        scaled = {k: v * factor for k, v in PAPER_TIERS.items() if k != "frac_drop"}
        scaled["frac_drop"] = 1.0 - sum(scaled.values())
        reference = MixedPrecisionQuantizer(**scaled, residual_length=16, backend=backend)
        got = base.for_layer(layer).compress(keys, values, positions, scores, protected)
        want = reference.compress(keys, values, positions, scores, protected)
        assert got.tokens_by_bits == want.tokens_by_bits
        assert all(torch.equal(a, b) for a, b in zip(_all_stored_tensors(got), _all_stored_tensors(want)))
    assert base.for_layer(1).compress(keys, values, positions, scores, protected).n_tokens < base.compress(
        keys, values, positions, scores, protected
    ).n_tokens


def test_budget_by_layer_naming_a_missing_layer_is_refused_by_the_model_check() -> None:
    quantizer = MixedPrecisionQuantizer(**PAPER_TIERS, budget_by_layer={0: 0.5, 30: 1.2})
    with pytest.raises(ValueError, match=r"budget_by_layer names layer\(s\) \[30\], but the model has 30 layers"):
        quantizer.check_model(num_layers=30, head_dim=64)
    quantizer.check_model(num_layers=31, head_dim=64)
