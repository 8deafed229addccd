"""Experiment timing (not part of kvcomp): one layer's prefill attention at SmolLM2-135M's shape (9
query heads, 3 KV heads, d 64), random tensors, best of 5 in one process: causal SDPA over every
token, fast_local/local_xp.py's pattern (64 sinks + 512 before each row) and columns_xp.py's
pattern (the same plus 128 chosen positions per KV head), the last 128 rows attending to all.

    .venv/bin/python docs/data/fast_columns/columns_time.py [tokens]
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fast_local"))
from columns_xp import column_attention  # noqa: E402
from local_xp import local_attention  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
torch.manual_seed(0)
q, k, v = torch.randn(1, 9, N, 64), torch.randn(1, 3, N, 64), torch.randn(1, 3, N, 64)


def best(f, repeats=5):
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


print(f"{N} tokens, ms per layer: causal attention {best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)):.1f}")
print(f"  local (64 + 512), chunks of 256: {best(lambda: local_attention(q, k, v, None, N - 128, 512, 64, 256)):.1f}")
for window, c, chunk in [(512, 128, 256), (512, 128, 128), (256, 128, 256)]:
    ms = best(lambda: column_attention(q, k, v, None, N - 128, window, c, 64, chunk))
    print(f"  columns (64 + {window} + {c} per KV head), chunks of {chunk}: {ms:.1f}")
