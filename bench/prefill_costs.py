"""Where an uncompressed prefill spends its time, and two ways of computing less without dropping tokens.

Usage::

    python bench/prefill_costs.py [--tokens 4000] [--repeats 3]

On the embedded model and one random-token prompt of ``--tokens`` tokens:

1. the share of ``full``'s prefill time per torch op (torch profiler, one warm run);
2. int8 dynamic weights (``weights: int8``) against fp32, best of ``--repeats`` alternating runs,
   and the KL of the last token's next-token distribution to fp32;
3. one layer's causal SDPA against sliding-window attention (4 sinks plus the last ``w`` keys,
   in 512-query chunks through SDPA with a mask), best of ``--repeats``, at the model's head
   shape.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kvcore.pipeline import KVCompPipeline
from kvcore.weights import quantize_linear_weights


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def sliding_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, chunk: int = 512, sinks: int = 4):
    """Causal attention of ``q [1, H, n, d]`` over the sinks and the last ``window`` keys."""
    n = q.shape[2]
    outs = []
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        first = max(sinks, start - window)
        key_pos = torch.cat([torch.arange(min(sinks, first)), torch.arange(first, end)])
        mask = key_pos[None, :] <= torch.arange(start, end)[:, None]
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, key_pos], v[:, :, key_pos], attn_mask=mask, enable_gqa=True))
    return torch.cat(outs, dim=2)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.tokens < 2 or args.repeats < 1:
        parser.error("--tokens must be >= 2 and --repeats >= 1")
    fp32 = KVCompPipeline.from_pretrained(config="full").model
    int8 = KVCompPipeline.from_pretrained(config="full").model
    quantize_linear_weights(int8, "int8")
    ids = torch.randint(100, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    fp32(ids, logits_to_keep=1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fp32(ids, logits_to_keep=1)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    print(f"full prefill, {args.tokens} tokens, share of self CPU time:")
    for event in ops[:5]:
        print(f"  {event.key:50s} {event.self_cpu_time_total / total:6.1%}")

    times = {"fp32": float("inf"), "int8": float("inf")}
    for _ in range(args.repeats):  # alternating, best of
        for name, model in (("fp32", fp32), ("int8", int8)):
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            times[name] = min(times[name], time.perf_counter() - start)
    ref = torch.log_softmax(fp32(ids, logits_to_keep=1).logits[0, -1].float(), -1)
    low = torch.log_softmax(int8(ids, logits_to_keep=1).logits[0, -1].float(), -1)
    kl = float((ref.exp() * (ref - low)).sum())
    print(f"int8 weights: prefill {times['int8'] / times['fp32']:.2f}x fp32, last-token KL {kl:.3f}")

    cfg = fp32.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, cfg.num_attention_heads, args.tokens, head_dim, generator=gen)
    k = torch.randn(1, cfg.num_key_value_heads, args.tokens, head_dim, generator=gen)
    v = torch.randn(1, cfg.num_key_value_heads, args.tokens, head_dim, generator=gen)
    causal = best_of(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), args.repeats)
    print(f"one layer's attention: causal SDPA {causal * 1e3:.0f} ms", end="")
    for window in (512, 1024, 2048):
        print(f", window {window}: {best_of(lambda: sliding_window(q, k, v, window), args.repeats) * 1e3:.0f} ms", end="")
    print()


if __name__ == "__main__":
    main()
