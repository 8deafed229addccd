"""Experiment timing (not part of kvcomp): one layer's prefill attention at SmolLM2-135M's shape (9
query heads, 3 KV heads, d 64), random tensors, best of 5 in one process: causal SDPA over every
token, fast_local/local_xp.py's pattern (64 sinks + 512 before each row) and columns_xp.py's
pattern (the same plus 128 chosen positions per KV head), the last 128 rows attending to all.

    .venv/bin/python docs/data/fast_columns/columns_time.py [tokens]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fast_local"))
from columns_xp import column_attention  # noqa: E402
from local_time import N, best, causal, k, local, q, v  # noqa: E402  (same tensors, same best-of-5)

print(f"{N} tokens, ms per layer: causal attention {best(causal):.1f}")
print(f"  local (64 + 512), chunks of 256: {best(lambda: local(512, 256)):.1f}")
for window, c, chunk in [(512, 128, 256), (512, 128, 128), (256, 128, 256)]:
    ms = best(lambda: column_attention(q, k, v, None, N - 128, window, c, 64, chunk))
    print(f"  columns (64 + {window} + {c} per KV head), chunks of {chunk}: {ms:.1f}")
