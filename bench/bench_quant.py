"""Throughput of quantise+pack and unpack+dequantise against a plain copy of the same tensor.

Usage::

    python bench/bench_quant.py [--shape 1 3 4096 64] [--repeats 30] [--group-size 32]

Times the torch reference on the tensor's device (CPU by default) and, when a GPU is present,
the Triton kernels too. Each cell is the best of ``--repeats`` runs (the machine may be shared,
and the minimum is the least disturbed run). GB/s counts the bytes of the dense fp16 tensor
(input of quantise, output of dequantise); ``x clone`` is the time relative to
``torch.clone`` of that tensor timed in the same run.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from kvcomp_plugins.quantizers import backends


def best_time_s(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Smallest wall time of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def run(shape: tuple[int, int, int, int], group_size: int, repeats: int, device: torch.device) -> list[str]:
    """Markdown table rows: one per (backend, bits, axis, operation)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.float16).to(device)
    gb = x.nbytes / 1e9
    clone_s = best_time_s(lambda: x.clone(), repeats, device)
    rows = [f"| torch.clone | 16 | - | copy | {clone_s * 1e3:.3f} | {gb / clone_s:.2f} | 1.0 |"]
    names = ["torch"] + (["triton"] if device.type == "cuda" and backends.triton_available() else [])
    for backend in names:
        for bits in (2, 4, 8):
            for axis in ("token", "channel"):
                q = backends.quantize_pack(x, bits, group_size, axis, backend)  # type: ignore[arg-type]
                ops = {
                    "quantise+pack": lambda: backends.quantize_pack(x, bits, group_size, axis, backend),  # type: ignore[arg-type]
                    "unpack+dequantise": lambda: backends.unpack_dequantize(q, torch.float16, backend),  # type: ignore[arg-type]
                }
                for op, fn in ops.items():
                    t = best_time_s(fn, repeats, device)
                    rows.append(
                        f"| {backend} | {bits} | {axis} | {op} | {t * 1e3:.3f} | {gb / t:.2f} | {t / clone_s:.1f} |"
                    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 3, 4096, 64], metavar=("B", "H_KV", "N", "D"))
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = tuple(args.shape)
    print(f"shape {list(shape)} fp16 ({torch.Size(shape).numel() * 2 / 2**20:.2f} MiB), group {args.group_size}, "
          f"device {device}, torch threads {torch.get_num_threads()}, best of {args.repeats}\n")
    print("| backend | bits | axis | operation | ms | GB/s (fp16 bytes) | x clone |")
    print("|---|---|---|---|---|---|---|")
    for row in run(shape, args.group_size, args.repeats, device):  # type: ignore[arg-type]
        print(row)


if __name__ == "__main__":
    main()
