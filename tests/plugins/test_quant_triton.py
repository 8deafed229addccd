"""The Triton kernels agree with the torch reference bit for bit (CPU: TRITON_INTERPRET=1).

The interpreter is slow, so every shape here is tiny. ``tests/conftest.py`` switches the
interpreter on before triton is first imported when no GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore.decode_attention import DensePart
from kvcomp_plugins.quantizers import MixedPrecisionQuantizer, packing

pytestmark = pytest.mark.triton

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    pytest.importorskip("triton")
    from kvcomp_plugins.quantizers import triton_kernels

    if not torch.cuda.is_available() and not triton_kernels.INTERPRETED:
        pytest.skip("no GPU and triton was imported without TRITON_INTERPRET=1")
    return triton_kernels


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _assert_same(x: torch.Tensor, bits: int, group_size: int, axis: str, kernels: ModuleType) -> None:
    ref = packing.quantize_pack(x, bits, group_size, axis)  # type: ignore[arg-type]
    got = kernels.quantize_pack(x, bits, group_size, axis)
    assert torch.equal(got.packed, ref.packed)
    assert torch.equal(got.scale.view(torch.int16), ref.scale.view(torch.int16))
    assert torch.equal(got.zero.view(torch.int16), ref.zero.view(torch.int16))
    assert (got.bits, got.group_size, got.axis, got.shape) == (ref.bits, ref.group_size, ref.axis, ref.shape)
    for dtype in DTYPES:
        assert torch.equal(kernels.unpack_dequantize(ref, dtype), packing.unpack_dequantize(ref, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kernels_match_reference(bits: int, axis: str, dtype: torch.dtype, kernels: ModuleType) -> None:
    gen = torch.Generator().manual_seed(bits * 10 + len(axis))
    x = (torch.randn(1, 2, 16, 64, generator=gen) * 3).to(dtype).to(_device())
    x[0, 0, 3] = 1.25  # a constant token row
    x[0, 1, :, 5] = -2.0  # a constant channel
    _assert_same(x, bits, 32, axis, kernels)


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_ragged_shapes_match_reference(axis: str, kernels: ModuleType) -> None:
    # d = 48 is not a power of two (masked lanes); n = 13 leaves a partial token group.
    x = torch.randn(2, 1, 13, 48, generator=torch.Generator().manual_seed(7)).to(_device())
    _assert_same(x, 2, 16, axis, kernels)
    _assert_same(x, 4, 8 if axis == "token" else 5, axis, kernels)


@settings(max_examples=25, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    axis=st.sampled_from(["token", "channel"]),
    n=st.integers(1, 9),
    exponent=st.sampled_from([-140, -130, -40, -24, -20, -16, -10, -4, 0, 4]),
    offset=st.sampled_from([0.0, -1e-6, 250.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_edge_magnitudes_match_reference(
    bits: int, axis: str, n: int, exponent: int, offset: float, seed: int, kernels: ModuleType
) -> None:
    # Tiny spans hit fp16 subnormal scales and the zero crossing of the directed rounding.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, n, 16, generator=gen) * 2.0**exponent + offset
    _assert_same(x.to(_device()), bits, 8, axis, kernels)


def test_quantizer_triton_backend_stores_the_same_bytes(kernels: ModuleType, assert_backends_store_the_same_bytes) -> None:
    assert_backends_store_the_same_bytes("triton", _device())


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_backends_without_interpreter() -> None:
    """Without TRITON_INTERPRET, 'auto' stays on torch and never imports triton; 'triton' is refused."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = _run_python(
        """
        import sys, torch
        from kvcomp_plugins.quantizers import MixedPrecisionQuantizer, backends
        x = torch.randn(1, 1, 8, 16)
        q = MixedPrecisionQuantizer(residual_length=2, group_size=8)
        q.compress(x, x, torch.arange(8)[None], None, torch.zeros(1, 8, dtype=torch.bool))
        assert "triton" not in sys.modules, "auto on CPU imported triton"
        try:
            backends.quantize_pack(x, 4, 8, "token", backend="triton")
        except RuntimeError as exc:
            print("REFUSED:", exc)
        """,
        env,
    )
    assert result.returncode == 0, result.stderr
    assert "REFUSED:" in result.stdout and "TRITON_INTERPRET=1" in result.stdout


def test_the_decode_kernel_compiles_for_hopper_without_register_spills() -> None:
    """Triton compiles ahead of time, without a GPU, for sm_90 (H100/H200); the kernel binary's
    resource usage (``cuobjdump``, shipped with triton) must show no stack: a spilled kernel reads
    and writes local memory in its inner product and ran several times slower on an H200."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    result = _run_python(
        """
        import os, re, subprocess, sys, tempfile
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from kvcomp_plugins.quantizers import triton_attend as ta

        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if not os.access(tool, os.X_OK):
            print("NO-TOOL"); sys.exit(0)
        fn = ta._block_kernel
        pointers = ["rows_ptr", "m_ptr", "l_ptr", "acc_ptr"]
        for bits, token_axis in [(2, False), (4, False), (8, False), (4, True), (16, True)]:
            stored = "*bf16" if bits == 16 else None
            sig = {name: "*fp32" for name in pointers}
            sig.update({"kp_ptr": stored or "*u8", "vp_ptr": stored or "*u8", "valid_ptr": "*u8"})
            sig.update({k: stored or "*fp16" for k in ("ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr")})
            sig.update({k: "i32" for k in ("N", "KV_STRIDE", "P", "SLOT0", "R")})
            consts = dict(D=128, G=1 if bits == 16 else 64, BITS=bits, KEY_TOKEN_AXIS=token_axis, HAS_VALID=False,
                          BLOCK_R=16, BLOCK_T=ta.BLOCK_T)
            sig.update({k: "constexpr" for k in consts})
            sig = {name: sig[name] for name in fn.arg_names}
            src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": ta.NUM_WARPS})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"]); f.flush()
                usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            regs, stack = re.search(r"REG:(\\d+) STACK:(\\d+)", usage).groups()
            print("KERNEL", bits, token_axis, regs, stack)
        """,
        env,
    )
    assert result.returncode == 0, result.stderr
    if "NO-TOOL" in result.stdout:
        pytest.skip("triton ships no cuobjdump on this platform")
    kernels = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("KERNEL")]
    assert len(kernels) == 5, result.stdout
    assert all(stack == "0" for *_, stack in kernels), f"register spills (bits, token axis, regs, stack): {kernels}"


def test_decode_attention_on_the_triton_backend_matches_torch(kernels):
    """Tiers quantised by the Triton kernels (same bytes) attended by the Triton decode kernel
    equal the torch path's, up to float32 summation order."""
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    positions = torch.arange(40, dtype=torch.int32).expand(1, 2, 40).contiguous()
    rows = torch.randn(1, 2, 3, 16, generator=gen).to(_device())
    outs = []
    for backend in ("triton", "torch"):
        quantizer = MixedPrecisionQuantizer(backend=backend, group_size=8, residual_length=0)
        tier = quantizer.quantize_block(keys.to(_device()), values.to(_device()), positions.to(_device()))
        dense = DensePart(keys[:, :, :2].to(_device()), values[:, :, :2].to(_device()))
        outs.append(quantizer.attend(rows, [tier], dense))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def attend_kernel(kernels: ModuleType) -> ModuleType:
    from kvcomp_plugins.quantizers import triton_attend  # runnable wherever the quantise kernels are

    return triton_attend


def _on(q: object, device: str) -> object:
    """A copy of a dataclass of tensors (tier, quantised tensor) on ``device``."""
    import dataclasses

    return dataclasses.replace(q, **{f.name: getattr(q, f.name).to(device) for f in dataclasses.fields(q) if isinstance(getattr(q, f.name), torch.Tensor)})


@pytest.mark.parametrize("key_axis", ["channel", "token", "mixed"])
def test_decode_kernel_matches_the_torch_path_on_tiers_of_every_width(key_axis: str, attend_kernel: ModuleType) -> None:
    """Every tier width and key axis, padding, a full-precision part of several blocks, and one
    with a mask."""
    from kvcore.types import KVTier
    from kvcomp_plugins.quantizers import attend

    dev = _device()
    gen = torch.Generator().manual_seed(3)
    b, h, r, d, g = 2, 2, 3, 32, 8

    def tier(bits: int, n: int) -> KVTier:
        keys = torch.randn(b, h, n, d, generator=gen) * torch.linspace(0.5, 4.0, d)  # outlier-ish channels
        values = torch.randn(b, h, n, d, generator=gen)
        positions = torch.arange(n, dtype=torch.int32).expand(b, h, n).contiguous()
        axis = key_axis if key_axis != "mixed" else ("channel", "token")[n % 2]  # decoded tokens flushed per token
        k, v = packing.quantize_pack(keys, bits, g, axis), packing.quantize_pack(values, bits, g, "token")
        return KVTier(bits, positions.to(dev), _on(k, dev), _on(v, dev))  # type: ignore[arg-type]

    tiers = [tier(8, 11), tier(4, 70), tier(2, 5)]  # 70: two token blocks, the second partial
    padding = [torch.zeros(b, h, 1, t.n_tokens, dtype=torch.bool, device=dev) for t in tiers]
    padding[1][0, :, :, :64] = True  # row 0: the whole first block of the 4-bit tier is padding
    padding[2][1] = True  # row 1: nothing of the 2-bit tier is visible
    dense = DensePart(3 * torch.randn(b, h, 4, d, generator=gen).to(dev), torch.randn(b, h, 4, d, generator=gen).to(dev))
    rows = torch.randn(b, h, r, d, generator=gen).to(dev)
    outs = []
    for pad in (None, padding):
        outs.append(attend_kernel.attend_layer(rows, tiers, dense, pad))
        torch.testing.assert_close(outs[-1], attend.attend_layer(rows, tiers, dense, pad), rtol=1e-4, atol=1e-5)
    assert (outs[0] - outs[1]).abs().max() > 1e-3, "the padding is applied"
    # A full-precision part of several blocks, seen through a view with free slots behind it (as
    # the dense store hands it over), then the same part with a mask (the torch path, one slot).
    store_k, store_v = torch.randn(b, h, 150, d, generator=gen).to(dev), torch.randn(b, h, 150, d, generator=gen).to(dev)
    long_dense = DensePart(store_k[..., :130, :], store_v[..., :130, :])
    mask = torch.rand(b, h, r, 130, generator=gen).to(dev) > 0.3
    for part in (long_dense, DensePart(long_dense.keys, long_dense.values, mask)):
        torch.testing.assert_close(attend_kernel.attend_layer(rows, tiers, part, padding),
                                   attend.attend_layer(rows, tiers, part, padding), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="power of two >= 16"):
        attend_kernel.attend_layer(torch.zeros(1, 1, 1, 24), tiers, dense)

