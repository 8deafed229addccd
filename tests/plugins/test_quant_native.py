"""The CPU kernels (C, built on first use) store the torch reference's bytes bit for bit, and the
backend choice falls back to torch, with a warning, where they cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcomp_plugins.quantizers import backends, native, packing
from kvcomp_plugins.quantizers import tiers as tiers_module

if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
    pytest.skip("no C compiler on this machine: the CPU kernels cannot be built", allow_module_level=True)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def test_the_kernels_build_here():
    assert native.available() and native.quantize_available()


def _assert_same(x: torch.Tensor, bits: int, group_size: int, axis: str) -> None:
    ref = packing.quantize_pack(x, bits, group_size, axis)  # type: ignore[arg-type]
    got = native.quantize_pack(x, bits, group_size, axis)  # type: ignore[arg-type]
    assert torch.equal(got.packed, ref.packed)
    assert torch.equal(got.scale.view(torch.int16), ref.scale.view(torch.int16))
    assert torch.equal(got.zero.view(torch.int16), ref.zero.view(torch.int16))
    assert (got.bits, got.group_size, got.axis, got.shape) == (ref.bits, ref.group_size, ref.axis, ref.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantise_matches_reference(bits: int, axis: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(bits * 10 + len(axis))
    x = (torch.randn(2, 3, 70, 64, generator=gen) * torch.linspace(0.5, 8.0, 64)).to(dtype)
    x[0, 0, 3] = 1.25  # a constant token row
    x[0, 1, :, 5] = -2.0  # a constant channel
    _assert_same(x, bits, 32, axis)


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_ragged_shapes_match_reference(axis: str) -> None:
    x = torch.randn(2, 1, 13, 48, generator=torch.Generator().manual_seed(7))  # a partial token group
    _assert_same(x, 2, 16, axis)
    _assert_same(x, 4, 8 if axis == "token" else 5, axis)
    _assert_same(x[:, :, :0], 8, 16, axis)  # no tokens at all


@settings(max_examples=200, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    axis=st.sampled_from(["token", "channel"]),
    n=st.integers(1, 9),
    exponent=st.sampled_from([-140, -130, -40, -24, -20, -16, -10, -4, 0, 4, 12]),
    offset=st.sampled_from([0.0, -1e-6, 250.0, -3000.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_edge_magnitudes_match_reference(bits: int, axis: str, n: int, exponent: int, offset: float, seed: int) -> None:
    # Tiny spans hit fp16 subnormal scales and the zero crossing of the directed rounding.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, n, 16, generator=gen) * 2.0**exponent + offset
    _assert_same(x, bits, 8, axis)


def test_auto_quantises_in_c_on_a_cpu_and_stores_the_torch_bytes(assert_backends_store_the_same_bytes) -> None:
    assert backends.select_backend("auto", torch.device("cpu")) is native
    assert_backends_store_the_same_bytes("native")
    assert_backends_store_the_same_bytes("auto")


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_without_the_kernels_auto_falls_back_to_torch_and_native_is_refused_by_name(tmp_path) -> None:
    code = """
        import warnings, torch
        from kvcomp_plugins.quantizers import backends, native, packing
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert backends.select_backend("auto", torch.device("cpu")) is packing
        print("warned:", [str(w.message).splitlines()[0] for w in caught])
        try:
            backends.select_backend("native", torch.device("cpu"))
        except RuntimeError as exc:
            print("refused:", exc)
    """
    off = _run_python(code, KVCOMP_NATIVE="0", KVCOMP_CACHE_DIR=str(tmp_path / "a"))
    assert off.returncode == 0, off.stderr
    assert "warned: []" in off.stdout and "refused: backend='native'" in off.stdout
    broken = _run_python(code, CC=str(tmp_path / "no-such-compiler"), KVCOMP_CACHE_DIR=str(tmp_path / "b"))
    assert broken.returncode == 0, broken.stderr
    assert "could not be built" in broken.stdout and "refused: backend='native'" in broken.stdout


def test_a_build_is_kept_and_reused(tmp_path) -> None:
    code = "from kvcomp_plugins.quantizers import native; print(native.library()._name)"
    first = _run_python(code, KVCOMP_CACHE_DIR=str(tmp_path))
    second = _run_python(code, KVCOMP_CACHE_DIR=str(tmp_path))
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout and first.stdout.strip().startswith(str(tmp_path))
    assert len(list(tmp_path.glob("kernels-*.so"))) == 1


def _splits_agree(positions, scores, protected, heads, residual_length, tiers) -> None:
    ref = tiers_module.split_tokens(positions, scores, protected, heads, residual_length, tiers)
    got = native.split_tokens(positions, scores, protected, heads, residual_length, tiers)
    assert torch.equal(got.residual_idx, ref.residual_idx)
    assert got.tier_bits == ref.tier_bits and got.dropped_per_head == ref.dropped_per_head
    for a, b in zip(got.tier_idx, ref.tier_idx):
        assert torch.equal(a, b)
    for a, b in zip(got.tier_positions, ref.tier_positions):
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 80),
    heads=st.integers(1, 3),
    rows=st.integers(1, 2),
    residual_length=st.integers(0, 12),
    fractions=st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5]), min_size=3, max_size=3),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_c_token_split_is_the_torch_split(n, heads, rows, residual_length, fractions, ties, seed) -> None:
    # Ties (a few distinct values), NaN and padding scores, left padding and protected slots: the
    # ranking rules (real first, score descending, later slot first) must give the same tiers.
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, heads, n, generator=gen)
    if ties:
        scores = (scores * 3).floor() / 3
    scores[..., :: 7] = float("nan")
    pad = int(torch.randint(0, max(1, n // 4), (1,), generator=gen))
    positions = (torch.arange(n) - pad).repeat(rows, 1)
    positions[positions < 0] = -1
    protected = (torch.rand(n, generator=gen) < 0.1).repeat(rows, 1) & (positions >= 0)
    tiers = [(8, fractions[0]), (4, fractions[1]), (2, fractions[2])]
    _splits_agree(positions, scores, protected, heads, residual_length, tiers)
    _splits_agree(positions, None, protected, heads, residual_length, tiers)


def test_the_c_token_split_refuses_rows_that_differ() -> None:
    positions = torch.arange(10).repeat(2, 1)
    positions[1] = torch.arange(10).flip(0)
    with pytest.raises(ValueError, match="share positions"):
        native.split_tokens(positions, None, torch.zeros(2, 10, dtype=torch.bool), 1, 2, [(8, 0.5)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiers_quantised_through_indices_match_the_gathered_reference(dtype: torch.dtype) -> None:
    # K/V as the attention leaves them: [B, N, H_kv, d] in memory, read through [B, H_kv, k] slots.
    gen = torch.Generator().manual_seed(11)
    keys = (torch.randn(2, 50, 3, 64, generator=gen) * 4).to(dtype).transpose(1, 2)
    values = torch.randn(2, 50, 3, 64, generator=gen).to(dtype).transpose(1, 2)
    idx = [torch.randint(0, 50, (2, 3, k), generator=gen).sort(dim=-1).values for k in (7, 33, 0)]
    got = native.quantize_tiers(keys, values, idx, [8, 4, 2], 16, "channel")
    for (k, v), slots, bits in zip(got, idx, [8, 4, 2]):
        expand = slots.unsqueeze(-1).expand(-1, -1, -1, 64)
        ref_k, ref_v = packing.quantize_pack_many(
            [(keys.gather(2, expand), bits, 16, "channel"), (values.gather(2, expand), bits, 16, "token")]
        )
        for a, b in ((k, ref_k), (v, ref_v)):
            assert torch.equal(a.packed, b.packed) and a.shape == b.shape
            assert torch.equal(a.scale.view(torch.int16), b.scale.view(torch.int16))
            assert torch.equal(a.zero.view(torch.int16), b.zero.view(torch.int16))


def test_a_prefill_layer_is_split_and_packed_in_c_with_the_torch_bytes(monkeypatch) -> None:
    from kvcomp_plugins.quantizers import MixedPrecisionQuantizer

    calls = []
    split = native.split_tokens
    monkeypatch.setattr(native, "split_tokens", lambda *a, **k: calls.append(1) or split(*a, **k))
    gen = torch.Generator().manual_seed(5)
    keys, values = torch.randn(2, 1, 90, 2, 64, generator=gen).transpose(2, 3)
    positions = torch.arange(90).repeat(1, 1)
    protected = positions < 4
    scores = torch.rand(1, 2, 90, generator=gen)
    layers = [
        MixedPrecisionQuantizer(backend=name, group_size=64, residual_length=8).compress(keys, values, positions, scores, protected)
        for name in ("torch", "auto")
    ]
    assert calls == [1], "on a CPU, backend 'auto' split the layer in C"
    ref, got = layers
    assert [t.bits for t in ref.tiers] == [t.bits for t in got.tiers]
    for a, b in zip(ref.tiers, got.tiers):
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys.packed, b.keys.packed) and torch.equal(a.values.packed, b.values.packed)
    assert torch.equal(ref.residual_keys, got.residual_keys) and torch.equal(ref.residual_positions, got.residual_positions)
    assert ref.dropped_tokens == got.dropped_tokens and ref.kv_bytes == got.kv_bytes
