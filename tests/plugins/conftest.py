"""Helpers shared by the quantizer backend tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvcomp_plugins.quantizers import MixedPrecisionQuantizer


def _assert_backends_store_the_same_bytes(backend: str, device: str = "cpu") -> None:
    """A padded two-row layer compressed by ``backend`` and by the torch reference: every tier's
    packed codes, scales, zeros and positions are equal, and so are the residual, the dropped
    count and the bytes counted."""
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 2, 2, 40, 32, generator=gen).to(torch.float16).to(device)
    positions = torch.arange(40, device=keys.device).repeat(2, 1)
    positions[1, :5] = -1
    protected = (positions >= 0) & (positions < 2)
    scores = torch.rand(2, 2, 40, generator=gen).to(keys.device)
    params = dict(frac_8bit=0.25, frac_4bit=0.25, frac_2bit=0.25, frac_drop=0.25, group_size=8, residual_length=6)
    layers = [
        MixedPrecisionQuantizer(backend=name, **params).compress(keys, values, positions, scores, protected)
        for name in ("torch", backend)
    ]
    assert [t.bits for t in layers[0].tiers] == [t.bits for t in layers[1].tiers] == [8, 4, 2]
    for ref, got in zip(layers[0].tiers, layers[1].tiers):
        for a, b in ((ref.keys, got.keys), (ref.values, got.values)):
            assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
        assert torch.equal(ref.positions, got.positions)
    ref, got = layers
    assert torch.equal(ref.residual_keys, got.residual_keys) and torch.equal(ref.residual_values, got.residual_values)
    assert torch.equal(ref.residual_positions, got.residual_positions)
    assert ref.dropped_tokens == got.dropped_tokens
    assert ref.kv_bytes == got.kv_bytes


@pytest.fixture
def assert_backends_store_the_same_bytes() -> Callable[..., None]:
    return _assert_backends_store_the_same_bytes
