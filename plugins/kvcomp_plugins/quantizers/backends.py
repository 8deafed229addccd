"""Picks the kernel implementation: the torch reference, the Triton kernels or the CPU kernels.

``"auto"`` uses Triton for CUDA tensors when triton imports, and the C kernels (:mod:`.native`:
quantise+pack and decode attention) for CPU tensors when they build, else torch; ``"triton"``
forces Triton (on a CPU tensor only under ``TRITON_INTERPRET=1``); ``"native"`` forces the C
kernels (CPU tensors only); ``"torch"`` forces the reference everywhere. Quantised bytes are the
same with every backend. Triton is imported lazily, on first use, so CPU-only users never pay for
it; the C kernels are compiled on first use.
"""

from __future__ import annotations

import functools
from types import ModuleType
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from kvcore.decode_attention import DensePart
from kvcore.types import KVTier, QuantizedTensor
from kvcomp_plugins.quantizers import attend, native, packing
from kvcomp_plugins.quantizers.packing import Axis

Backend = Literal["auto", "torch", "triton", "native"]
BACKENDS = ("auto", "torch", "triton", "native")


@functools.lru_cache(maxsize=1)
def _triton_module() -> ModuleType | None:
    """The Triton kernel module, or ``None`` if triton cannot be imported here."""
    try:
        from kvcomp_plugins.quantizers import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def triton_available() -> bool:
    """True if the Triton kernels can be imported here (they may still need a GPU to run)."""
    return _triton_module() is not None


def select_backend(backend: str, device: torch.device) -> ModuleType:
    """The module (:mod:`.packing`, :mod:`.triton_kernels` or :mod:`.native`) that quantises for
    ``backend`` on ``device``."""
    if backend == "torch":
        return packing
    if backend == "auto":
        if device.type == "cuda":
            return _triton_module() or packing
        if device.type == "cpu" and native.quantize_available():
            return native
        return packing
    if backend == "native":
        if device.type != "cpu":
            raise RuntimeError(f"backend='native' runs on CPU tensors (got one on {device}); use 'auto'")
        if not native.quantize_available():
            raise RuntimeError("backend='native' was requested but the CPU kernel is not available here "
                               "(see the warning it gave, or KVCOMP_NATIVE=0); use 'torch' or 'auto'")
        return native
    if backend == "triton":
        kernels = _triton_module()
        if kernels is None:
            raise RuntimeError("backend='triton' was requested but triton cannot be imported; use 'torch' or 'auto'")
        if device.type != "cuda" and not kernels.INTERPRETED:
            raise RuntimeError(
                f"backend='triton' needs a CUDA tensor (got one on {device}); on a CPU set "
                "TRITON_INTERPRET=1 before triton is first imported, or use backend='torch'/'auto'"
            )
        return kernels
    raise ValueError(f"backend={backend!r} is not supported; use one of {BACKENDS}")


def quantize_pack(x: Tensor, bits: int, group_size: int, axis: Axis, backend: Backend = "auto") -> QuantizedTensor:
    """Quantise and pack ``x`` ``[B, H_kv, n, d]`` with the selected backend (see :mod:`.packing`)."""
    packing.validate_quant_args(tuple(x.shape), bits, group_size, axis)
    return select_backend(backend, x.device).quantize_pack(x, bits, group_size, axis)


def quantize_pack_many(requests: list[packing.QuantRequest], backend: Backend = "auto") -> list[QuantizedTensor]:
    """:func:`quantize_pack` of several ``(x, bits, group_size, axis)`` requests, same bytes; the
    torch reference batches their statistics (the Triton kernels are one launch per tensor anyway)."""
    if not requests:
        return []
    for x, bits, group_size, axis in requests:
        packing.validate_quant_args(tuple(x.shape), bits, group_size, axis)
    module = select_backend(backend, requests[0][0].device)
    if module in (packing, native):
        return module.quantize_pack_many(requests)
    return [module.quantize_pack(*request) for request in requests]  # Triton: one launch per tensor anyway


def unpack_dequantize(q: QuantizedTensor, dtype: torch.dtype, backend: Backend = "auto") -> Tensor:
    """Dense ``[B, H_kv, n, d]`` of ``dtype`` from ``q`` with the selected backend."""
    return select_backend(backend, q.packed.device).unpack_dequantize(q, dtype)


def attend_layer(
    rows: Tensor,
    tiers: Sequence[KVTier],
    dense: DensePart,
    padding: Sequence[Tensor | None] | None,
    backend: Backend = "auto",
    scratch: attend.Scratch | None = None,
) -> Tensor:
    """Decode attention over packed ``tiers`` and the ``dense`` part (see :func:`.attend.attend_layer`)
    with the selected backend (Triton: :mod:`.triton_attend`, imported on first use; CPU:
    :mod:`.native`, built on first use)."""
    if backend == "native" or (backend == "auto" and native.supports(rows, dense) and native.available()):
        return native.attend_layer(rows, tiers, dense, padding, scratch)
    if select_backend(backend, rows.device) in (packing, native):
        return attend.attend_layer(rows, tiers, dense, padding, scratch)
    from kvcomp_plugins.quantizers import triton_attend

    return triton_attend.attend_layer(rows, tiers, dense, padding, scratch)
