"""The C kernels of the plugins (:file:`kernels.c`): built on first use, loaded through ctypes.

Why C: on a CPU, decode attention over packed tiers and the per-layer work of a compressed prefill
cost what their *op counts* cost. The torch references need dozens of small ops per layer (~50 per
decode step to unpack, dequantise and attend; ~150 to split a prefill layer into tiers and pack
it; ~35 to score a layer by window attention), which made the compressed cache slower than an
uncompressed one although it reads 4x fewer bytes. Each of those is one call here. The torch
references stay the specification: the packed bytes and the split are the same bit for bit, the
attention and the scores the same up to the order of float32 additions.

Building: the first call compiles the C file with the system C compiler (``$CC``, else ``cc``;
``-O3 -march=native -fno-trapping-math``, OpenMP when the compiler has it) into a cache folder
(``$KVCOMP_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvcomp``, else ``~/.cache/kvcomp``), keyed by
the source, the flags and this CPU's feature flags; later processes load it in milliseconds.
No compiler, or a failed build: one warning, and backend ``auto`` keeps the torch references
(``native`` asked for by name raises instead). ``KVCOMP_NATIVE=0`` turns the kernels off;
``KVCOMP_NATIVE_CFLAGS`` adds compiler flags (``-march=x86-64-v3`` to build for a cluster's
oldest CPU rather than this one, say).

Decode attention works on 16 floats at a time with AVX-512 and 8 with AVX2 (the byte unpacking
in intrinsics, the rest in GCC/clang vector extensions); other CPUs unpack with generic vector
shifts, or plain loops where the CPU has no per-lane shifts. The tests build those variants here
too (``-DKVC_PORTABLE``; ``-DKVC_NO_SHUFFLE`` for the sums of compilers older than GCC 12).

The callers' wrappers live beside their torch references: :mod:`kvcomp_plugins.quantizers.native`
(decode attention, token split, packing) and :mod:`kvcomp_plugins.scorers._common` (window
attention, pooling, min-max normalisation).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
MAX_HEAD_DIM = 512
"""``KVC_MAX_D`` in the C source: the kernel keeps one token's ``d`` floats in registers/stack."""
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"],
    ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp-simd"],
    ["-O3", "-fno-trapping-math"],
)
"""Tried in order: the first that compiles is used (not every compiler has OpenMP or -march).

``-fno-trapping-math`` lets the compiler turn the float selects of the softmax and clamp loops
into vector blends (with traps assumed possible, GCC keeps them as branches and the loops
scalar: 7x slower); no result changes, since nothing here reads floating-point exception flags.
No flag that reorders or approximates float arithmetic is used."""


class TierArgs(ctypes.Structure):
    """``kvc_tier`` of kernels.c: one packed tier read by decode attention."""

    _fields_ = [
        ("kp", ctypes.c_void_p), ("vp", ctypes.c_void_p), ("pad", ctypes.c_void_p),
        ("ks", ctypes.c_void_p), ("kz", ctypes.c_void_p), ("vs", ctypes.c_void_p), ("vz", ctypes.c_void_p),
        ("n", ctypes.c_int64), ("bits", ctypes.c_int32), ("key_token_axis", ctypes.c_int32),
    ]


class QuantArgs(ctypes.Structure):
    """``kvc_quant_request`` of kernels.c: one tensor to quantise, read through indices or not."""

    _fields_ = [
        ("x", ctypes.c_void_p), ("idx", ctypes.c_void_p),
        ("heads", ctypes.c_int64), ("stride_b", ctypes.c_int64), ("stride_h", ctypes.c_int64), ("stride_n", ctypes.c_int64),
        ("packed", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
        ("bh_count", ctypes.c_int64), ("n", ctypes.c_int64), ("bits", ctypes.c_int32), ("token_axis", ctypes.c_int32),
    ]


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("KVCOMP_CACHE_DIR"):
        return Path(os.environ["KVCOMP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvcomp"


def _cpu_flags() -> str:
    """This CPU's feature flags (``-march=native`` builds for them; another CPU needs its own build)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, extra_flags: Sequence[str] = ()) -> tuple[Path | None, str]:
    """Compile the kernels (or find them built); ``(path, "")`` or ``(None, why it failed)``.
    ``extra_flags`` go after each flag set (``KVCOMP_NATIVE_CFLAGS``; the tests build the
    decode kernel's portable variants with them)."""
    source = SOURCE.read_bytes()
    errors = []
    for base in _FLAG_SETS:
        flags = [*base, *extra_flags]
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(),
                                         platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
        target = cache_dir() / f"kernels-{key}.so"
        if target.is_file():
            return target, ""
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name, then rename: processes starting together (torchrun) never
        # load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, *flags, "-std=c11", "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            Path(tmp).unlink(missing_ok=True)
            errors.append(f"{' '.join(cmd)}: {exc}")
            continue
        if done.returncode == 0:
            os.replace(tmp, target)
            return target, ""
        Path(tmp).unlink(missing_ok=True)
        errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-500:]}")
    return None, "\n".join(errors)


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` where it is turned off or cannot be built (warned once)."""
    if os.environ.get("KVCOMP_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        warnings.warn("no C compiler found (set CC): the CPU kernels are off; compressing and decoding on a "
                      "compressed cache use the slower torch references", RuntimeWarning, stacklevel=2)
        return None
    path, why = _build(compiler, shlex.split(os.environ.get("KVCOMP_NATIVE_CFLAGS", "")))
    if path is None:
        warnings.warn(f"the CPU kernels could not be built, the torch references are used:\n{why}",
                      RuntimeWarning, stacklevel=2)
        return None
    return load(path)


def load(path: Path) -> ctypes.CDLL:
    """The kernels built at ``path``, their functions typed for ctypes."""
    lib = ctypes.CDLL(str(path))
    lib.kvc_attend.restype = ctypes.c_int
    lib.kvc_attend.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.POINTER(TierArgs), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int32,
    ]
    lib.kvc_quantize_many.restype = ctypes.c_int
    lib.kvc_quantize_many.argtypes = [ctypes.POINTER(QuantArgs), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32]
    lib.kvc_window_attention.restype = ctypes.c_int
    lib.kvc_window_attention.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32,
    ]
    lib.kvc_pool.restype = ctypes.c_int
    lib.kvc_pool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p]
    lib.kvc_minmax.restype = ctypes.c_int
    lib.kvc_minmax.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_void_p]
    lib.kvc_split.restype = ctypes.c_int
    lib.kvc_split.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_int32,
    ]
    return lib


def available() -> bool:
    """True if the kernels are built and loaded here (building them on the first call)."""
    return library() is not None
