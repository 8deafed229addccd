"""Experiment timing (not part of kvcomp): one layer's prefill attention, causal over every token
against the local pattern of local_xp.py, SmolLM2-135M's shape (9 query heads, 3 KV heads, d 64),
random tensors, best of 5 in one process; and the layer's MLP products for scale.

    .venv/bin/python docs/data/fast_local/local_time.py [tokens]
"""
import sys
import time

import torch
import torch.nn.functional as F

from local_xp import local_attention  # the function the KL runs used

N = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
H, HKV, D, SINKS, TAIL = 9, 3, 64, 64, 128
torch.manual_seed(0)
q, k, v = torch.randn(1, H, N, D), torch.randn(1, HKV, N, D), torch.randn(1, HKV, N, D)


def causal():
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def local(window, chunk):
    """local_xp.py's pattern: rows before the last TAIL see the first SINKS keys and the `window`
    before them; the last TAIL rows every earlier key."""
    return local_attention(q, k, v, None, N - TAIL, window, SINKS, chunk)


x, up = torch.randn(1, N, 576), torch.nn.Linear(576, 1536, bias=False)


def mlp_products():
    return up(x), up(x), up(x)


def best(f, repeats=5):
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


if __name__ == "__main__":
    print(f"{N} tokens, ms per layer: causal attention {best(causal):.1f}")
    for window, chunk in [(1024, 256), (512, 256), (256, 128)]:
        print(f"  local, window {window}, chunks of {chunk}: {best(lambda: local(window, chunk)):.1f}")
    print(f"  the MLP's three products (576 x 1536): {best(mlp_products):.1f}")
