"""One layer's decode attention, alone: kvcomp's packed tiers against SDPA over the dense cache.

A decode step of a compressed layer reads packed tiers (:mod:`kvcomp_plugins.quantizers.attend`,
its C and Triton twins); an uncompressed layer is one SDPA call over its fp16/bf16 keys and
values. This script times just that call for one layer shaped as ``default`` stores it, so a slow
decode step can be pinned on the attention kernels (or cleared of them) without a model:

- ``sdpa``: ``scaled_dot_product_attention`` of the step's query heads over ``n`` dense tokens
  (grouped-query, as ``full`` decodes);
- ``kvcomp``: the quantizer's decode attention (``backend="auto"``: Triton on CUDA, the C kernel
  or torch on a CPU) over the same ``n`` prompt tokens as ``default`` keeps them: 10% at 8 bit
  and 55% at 4 bit (keys per channel in groups of 64 tokens, values per token in groups of 64
  channels), 35% dropped, and a full-precision part of ``--dense`` tokens (sinks, question,
  residual) read from a preallocated store, as the cache holds it;
- ``kvcomp-torch``: the torch reference path on the same tiers (for scale).

Each cell: ``--calls`` calls back to back, one sync at the end, per call; best of ``--repeats``
rounds, implementations alternating. ``host`` is the time to issue the calls (before the final
sync): equal to the wall time on a CPU; on a GPU, host close to wall means the call is bound by
launches, not by the device. ``max |diff|`` compares ``kvcomp`` with ``kvcomp-torch``::

    python bench/bench_attend.py --device cuda --lengths 4096 32768 --batch 1 8
    .venv/bin/python bench/bench_attend.py --lengths 1024 4096 --kv-heads 3 --group 3 --head-dim 64  # SmolLM2 on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcore.decode_attention import DensePart
from kvcore.types import KVTier
from kvcomp_plugins.quantizers import attend, backends

GROUP = 64
"""Quantisation group: 64 tokens per key channel, 64 channels per value token (``default``)."""
SPLIT = ((8, 0.10), (4, 0.55))
"""``default``'s tiers: (bits, share of the prompt's tokens); the remaining 35% are dropped."""


def build_layer(b: int, h: int, n: int, d: int, n_dense: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> tuple[list[KVTier], DensePart, Tensor, Tensor]:
    """A ``default``-like layer of ``n`` prompt tokens: its tiers, its dense part (a view of a
    store with free slots behind it) and the dense ``[B, H_kv, n, d]`` keys and values ``full``
    would hold for the same tokens."""
    gen = torch.Generator().manual_seed(seed)
    keys = (torch.randn(b, h, n, d, generator=gen) * torch.linspace(0.5, 4.0, d)).to(dtype).to(device)
    values = torch.randn(b, h, n, d, generator=gen).to(dtype).to(device)
    tiers, start = [], 0
    for bits, share in SPLIT:
        m = max(1, round(share * n))
        sl = slice(start, start + m)
        positions = torch.arange(start, start + m, dtype=torch.int32, device=device).expand(b, h, m).contiguous()
        tiers.append(KVTier(bits, positions, backends.quantize_pack(keys[:, :, sl].contiguous(), bits, GROUP, "channel"),
                            backends.quantize_pack(values[:, :, sl].contiguous(), bits, GROUP, "token")))
        start += m
    store_k = torch.zeros(b, h, n_dense + 64, d, dtype=dtype, device=device)
    store_v = torch.zeros_like(store_k)
    store_k[:, :, :n_dense], store_v[:, :, :n_dense] = keys[:, :, -n_dense:], values[:, :, -n_dense:]
    return tiers, DensePart(store_k[:, :, :n_dense], store_v[:, :, :n_dense]), keys, values


def time_calls(fn: Callable[[], object], calls: int, device: torch.device) -> tuple[float, float]:
    """(wall, host) seconds per call of ``calls`` back-to-back calls of ``fn``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    sync()
    return (time.perf_counter() - start) / calls, host / calls


def measure(b: int, n: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """One row per implementation at ``n`` prompt tokens and batch ``b``."""
    h, g, d = args.kv_heads, args.group, args.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiers, dense, keys, values = build_layer(b, h, n, d, args.dense, dtype, device)
    scale = d ** -0.5
    query = torch.randn(b, h * g, 1, d, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    rows = (query.float() * scale).reshape(b, h, g, d)  # the query heads of one KV head folded together
    scratch = attend.Scratch()
    impls: dict[str, Callable[[], Tensor]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(query, keys, values, enable_gqa=True),
        "kvcomp": lambda: backends.attend_layer(rows, tiers, dense, None, "auto", scratch),
        "kvcomp-torch": lambda: backends.attend_layer(rows, tiers, dense, None, "torch", scratch),
    }
    diff = (impls["kvcomp"]() - impls["kvcomp-torch"]()).abs().max().item()
    for fn in impls.values():
        fn()  # warm-up: compiles the Triton kernels, grows the scratch buffers
    best = {name: (float("inf"), float("inf")) for name in impls}
    for _ in range(args.repeats):
        for name, fn in impls.items():
            best[name] = min(best[name], time_calls(fn, args.calls, device))
    kv_tiers = sum(t.nbytes for t in tiers) + dense.keys.nbytes + dense.values.nbytes
    rows_out = []
    for name, (wall, host) in best.items():
        rows_out.append({"tokens": n, "batch": b, "impl": name, "wall_us": wall * 1e6, "host_us": host * 1e6,
                         "vs_sdpa": wall / best["sdpa"][0],
                         "kv_bytes": keys.nbytes + values.nbytes if name == "sdpa" else kv_tiers,
                         "max_abs_diff": None if name == "sdpa" else diff})
    return rows_out


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| tokens | batch | impl | us per layer | host us | / sdpa | KV MiB | max abs diff (vs kvcomp-torch) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        out.append(f"| {r['tokens']} | {r['batch']} | {r['impl']} | {r['wall_us']:.1f} | {r['host_us']:.1f} | "
                   f"{r['vs_sdpa']:.2f} | {r['kv_bytes'] / 2**20:.2f} | {diff} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096], help="prompt tokens in the layer")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (Llama-3-8B: 8)")
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head (Llama-3-8B: 4)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dense", type=int, default=None,
                        help="full-precision tokens (sinks, question, residual; default 80, at most the dropped "
                             "35%% of the shortest length)")
    parser.add_argument("--calls", type=int, default=50, help="calls per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the best counts")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if min(args.lengths) < 16:
        parser.error("every --lengths must be >= 16")
    if min(args.batch) < 1 or args.kv_heads < 1 or args.group < 1 or args.calls < 1 or args.repeats < 1:
        parser.error("--batch, --kv-heads, --group, --calls and --repeats must be >= 1")
    if args.head_dim < GROUP or args.head_dim % GROUP:
        parser.error(f"--head-dim must be a multiple of {GROUP} (values are quantised in groups of {GROUP} channels)")
    room = int(0.35 * min(args.lengths))  # the tiers take 65% of the tokens
    if args.dense is None:
        args.dense = min(80, room)
    if not 1 <= args.dense <= room:
        parser.error(f"--dense must be in 1..{room} (the 35% of the shortest length that the tiers leave)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available here")
    machine = {"torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"}
    print(json.dumps(machine), file=sys.stderr)
    rows = [r for n in args.lengths for b in args.batch for r in measure(b, n, args, device)]
    print("\n".join(table(rows)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
