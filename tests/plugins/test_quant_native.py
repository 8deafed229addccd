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
    assert len(list(tmp_path.glob("native_attend-*.so"))) == 1
