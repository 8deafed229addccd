"""Experiment wrapper (not part of kvcomp): local attention in some layers of the prefill.

In compressed prefill, layers with index in [XP_LOCAL_FROM, XP_LOCAL_LAYERS) (default [0, 8): the
layers before `fast` thins) attend, for every token before the prompt window, only to the first
XP_SINKS tokens (default 64) and the XP_LOCAL_W tokens before it (default 512); the window and
everything after it attend to the whole prefix. A padded batch and the last layer attend as
usual. Columns stand for positions, so the layers chosen must come before any thinning (as in
both runs: layers 0-7 of `fast`, layers 12-29 of `default`, which does not thin).
Usage: python local_xp.py bench ...   (the same arguments as `kvcomp bench`)
"""
import os
import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvcore import attention as A

W = int(os.environ.get("XP_LOCAL_W", "512"))
SINKS = int(os.environ.get("XP_SINKS", "64"))
LAYERS = int(os.environ.get("XP_LOCAL_LAYERS", "8"))
FIRST = int(os.environ.get("XP_LOCAL_FROM", "0"))
CHUNK = int(os.environ.get("XP_CHUNK", "256"))


def local_attention(q, k, v, scaling, tail_start, window=W, sinks=SINKS, chunk=CHUNK):
    """q [B, H, N, d], k/v [B, H_kv, N, d] -> [B, H, N, d]: rows before tail_start see the first
    `sinks` keys and the `window` before them (in chunks of `chunk` rows), later rows every key."""
    n = q.shape[2]
    outs = []
    for s in range(0, tail_start, chunk):
        e = min(s + chunk, tail_start)
        lo = max(sinks, s - window)
        if lo > sinks:
            kpos = torch.cat([torch.arange(sinks), torch.arange(lo, e)])
            kk, vv = k[:, :, kpos], v[:, :, kpos]
        else:
            kpos = torch.arange(e)
            kk, vv = k[:, :, :e], v[:, :, :e]
        qpos = torch.arange(s, e)
        m = (kpos[None] <= qpos[:, None]) & ((kpos[None] < sinks) | (kpos[None] >= qpos[:, None] - window))
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], kk, vv, attn_mask=m, scale=scaling, enable_gqa=True))
    qpos = torch.arange(tail_start, n)
    m = torch.arange(n)[None] <= qpos[:, None]
    outs.append(F.scaled_dot_product_attention(q[:, :, tail_start:], k, v, attn_mask=m, scale=scaling, enable_gqa=True))
    return torch.cat(outs, 2)


def patched_forward(attention, layers: range, min_tokens: int, tail=lambda window_idx, n: int(window_idx.min())):
    """kvcomp's attention function with ``attention(q, k, v, scaling, tail_start)`` in compressed
    prefill for the layers in ``layers`` whose stream is unthinned and longer than ``min_tokens``
    (rows from ``tail(window_idx, n)`` on attend to every key); the prefill capture as kvcomp's."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, window_rows=None, **kw):
        capture = A._CAPTURE.get()
        n = query.shape[2]
        if (
            capture is not None and window_rows is None and attention_mask is None and module.layer_idx in layers
            and n == key.shape[2] and n > min_tokens
        ):
            capture.queries = query[:, :, capture.window_idx]
            capture.keys, capture.values = key, value
            out = attention(query, key, value, scaling, tail(capture.window_idx, n))
            return out.transpose(1, 2).contiguous(), None
        return A.kvcomp_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          window_rows=window_rows, **kw)

    return forward


def run_bench(forward) -> int:
    """``kvcomp`` with ``forward`` as its attention function (the thinning layer's included)."""
    AttentionInterface.register(A.ATTN_IMPLEMENTATION, forward)
    import kvcore.model as M  # the thinning layer calls the function directly

    M.kvcomp_attention_forward = forward
    from kvcore.cli import main

    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(run_bench(patched_forward(local_attention, range(FIRST, LAYERS), SINKS + W + CHUNK)))
