"""Experiment wrapper (not part of kvcomp): sparse prefill attention with "columns" in some layers.

In compressed prefill, layers with index in [XP_COL_FROM, XP_COL_TO) (default [3, 9): before and
at `fast`'s first thinning, where every token is still in the stream) attend, for every row before
the prompt window, only to the first XP_SINKS tokens (64), the XP_COL_W tokens before the row
(512) and XP_COL_C more positions per KV head (128): those the prompt's last 64 queries attend to
most (softmax mass averaged over the KV head's query heads). The window and everything after it
attend to every key. Layers with fewer queries than keys (a thinned stream, the thinning layer's
kept rows) attend as usual. docs/data/fast_local/locality.py (with columns) measured the mass this pattern misses.

    python columns_xp.py bench ...      (the same arguments as `kvcomp bench`)
"""
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fast_local"))
from local_xp import patched_forward, run_bench  # noqa: E402

W = int(os.environ.get("XP_COL_W", "512"))
C = int(os.environ.get("XP_COL_C", "128"))
SINKS = int(os.environ.get("XP_SINKS", "64"))
FIRST = int(os.environ.get("XP_COL_FROM", "3"))
LAST = int(os.environ.get("XP_COL_TO", "9"))
CHUNK = int(os.environ.get("XP_CHUNK", "256"))
EST = 64


def pick_columns(q, k, scaling, c=C, sinks=SINKS, est=EST):
    """``[B, H_kv, c]`` positions (>= sinks) the last ``est`` queries attend to most, per KV head."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    rows = torch.arange(n - est, n)
    logits = torch.einsum("bhgrd,bhkd->bhgrk", q[:, :, rows].view(b, hkv, h // hkv, est, d), k) * scaling
    logits = logits.masked_fill(torch.arange(n)[None] > rows[:, None], float("-inf"))
    mass = logits.softmax(-1).mean((2, 3))  # [B, H_kv, n]
    mass[..., :sinks] = -1.0
    return mass.topk(min(c, n - sinks), -1).indices.sort(-1).values


def column_attention(q, k, v, scaling, tail_start, window=W, c=C, sinks=SINKS, chunk=CHUNK):
    """q [B, H, N, d], k/v [B, H_kv, N, d] -> [B, H, N, d]: rows before tail_start see the first
    `sinks` keys, the `window` keys before them and `c` chosen positions per KV head; later rows
    every key. A chosen position inside a row's window or the sinks is not counted twice."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    scaling = scaling if scaling is not None else d ** -0.5
    cols = pick_columns(q, k, scaling, c, sinks)  # [B, H_kv, c]
    idx = cols[..., None].expand(-1, -1, -1, d)
    kc, vc = k.gather(2, idx), v.gather(2, idx)
    outs = []
    for s in range(0, tail_start, chunk):
        e = min(s + chunk, tail_start)
        lo = max(sinks, s - window)
        kpos = torch.cat([torch.arange(min(sinks, lo)), torch.arange(lo, e)])
        qpos = torch.arange(s, e)
        near = (kpos[None] <= qpos[:, None]) & ((kpos[None] < sinks) | (kpos[None] >= qpos[:, None] - window))
        far = cols[:, :, None, :] < (qpos[:, None] - window)[None, None]  # [B, H_kv, rows, c]
        mask = torch.cat([near[None, None].expand(b, hkv, -1, -1), far], -1).repeat_interleave(g, 1)
        kk = torch.cat([k[:, :, kpos], kc], 2)
        vv = torch.cat([v[:, :, kpos], vc], 2)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], kk, vv, attn_mask=mask, scale=scaling,
                                                   enable_gqa=True))
    qpos = torch.arange(tail_start, n)
    m = torch.arange(n)[None] <= qpos[:, None]
    outs.append(F.scaled_dot_product_attention(q[:, :, tail_start:], k, v, attn_mask=m, scale=scaling,
                                               enable_gqa=True))
    return torch.cat(outs, 2)


if __name__ == "__main__":
    sys.exit(run_bench(patched_forward(column_attention, range(FIRST, LAST), SINKS + W + CHUNK + EST,
                                       tail=lambda window_idx, n: min(int(window_idx.min()), n - EST))))
