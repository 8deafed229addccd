"""What prefill compression costs, and where: scorer and quantizer time inside a real prefill and
in a tight loop, and the torch ops one layer's quantizer runs.

One process, the prompts of ``bench_decode.py`` (LongBench multi_news contexts, the question as
prompt window). ``full`` and a compressed preset alternate ``--repeats`` times; for the run with
the preset's best TTFT, the compressor's own per-layer timings (``LayerResult.timings_s``) are
summed over the layers. Then the observations of ``--layers`` are captured and the scorer and the
quantizer are timed alone on them (best of ``--loop-repeats``): the gap between the two readings is
what cold caches inside a prefill add. ``--profile`` also lists the torch ops of one quantizer call::

    .venv/bin/python bench/compress_cost.py --length 1000 --repeats 5 --profile
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from bench_decode import DEFAULT_DATA, run_once, real_text_prompts
from kvcore.config import CompressionConfig
from kvcore.loading import load_model, load_tokenizer, resolve_model
from kvcore.types import LayerObservation


def _timed_compressor(model: Any, sums: Counter, captured: dict[int, LayerObservation], layers: set[int]) -> None:
    """Wrap this model's compressor (the instance, not the class) to add up its timings."""
    compressor = model.compressor
    inner = type(compressor).compress_layer_kv_cache

    def compress(obs: LayerObservation) -> Any:
        result = inner(compressor, obs)
        sums.update(result.timings_s)
        if obs.layer_idx in layers:
            captured[obs.layer_idx] = obs
        return result

    compressor.compress_layer_kv_cache = compress


def _best_ms(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--length", type=int, default=1000, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 20], help="layers timed alone")
    parser.add_argument("--loop-repeats", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="list the torch ops of one quantizer call")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.loop_repeats < 1 or args.length < 64:
        parser.error("--repeats and --loop-repeats must be >= 1, --length >= 64")

    path = resolve_model(args.model)
    model = load_model(path)
    ids, window = real_text_prompts(load_tokenizer(path), [args.length], args.data)[args.length]
    n_layers = model.config.num_hidden_layers
    if not all(0 <= layer < n_layers for layer in args.layers):
        parser.error(f"--layers must lie in [0, {n_layers})")

    best: dict[str, tuple[float, Counter]] = {}
    for rep in range(args.repeats + 1):  # the first round warms up and is not counted
        for name in ("full", args.preset):
            sums: Counter = Counter()
            ttft = _run(model, name, ids, window, sums, {}, set())
            if rep and ttft < best.get(name, (float("inf"),))[0]:
                best[name] = (ttft, sums)
    (t_full, _), (t_comp, sums) = best["full"], best[args.preset]
    print(f"{args.length} tokens, best of {args.repeats}: TTFT full {t_full:.3f} s, {args.preset} {t_comp:.3f} s "
          f"({t_comp / t_full:.2f}x); inside that prefill: scoring {sums['score_s']:.3f} s, "
          f"split + packing {sums['quantize_s']:.3f} s")

    captured: dict[int, LayerObservation] = {}
    _run(model, args.preset, ids, window, Counter(), captured, set(args.layers))
    compressor = model.compressor
    total = 0.0
    for layer in args.layers:
        obs = captured[layer]
        scores = compressor.scorer.score(obs)
        score_ms = _best_ms(lambda: compressor.scorer.score(obs), args.loop_repeats)
        quant_ms = _best_ms(
            lambda: compressor.quantizer.compress(obs.keys, obs.values, obs.positions, scores, obs.protected_mask),
            args.loop_repeats,
        )
        total += score_ms + quant_ms
        print(f"layer {layer} alone, best of {args.loop_repeats}: scoring {score_ms:.2f} ms, split + packing {quant_ms:.2f} ms")
    print(f"x {n_layers} layers at the mean of those: {total / len(args.layers) * n_layers / 1000:.3f} s per prefill")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        obs = captured[args.layers[-1]]
        scores = compressor.scorer.score(obs)
        calls = 10
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                compressor.quantizer.compress(obs.keys, obs.values, obs.positions, scores, obs.protected_mask)
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        print(f"torch ops per quantizer call (layer {args.layers[-1]}), most frequent first:")
        for e in sorted(ops, key=lambda e: -e.count)[:15]:
            print(f"  {e.key:28} {e.count / calls:5.1f}  {e.self_cpu_time_total / calls / 1000:.3f} ms")
    return 0


def _run(model: Any, name: str, ids: torch.Tensor, window: torch.Tensor, sums: Counter, captured: dict, layers: set[int]) -> float:
    """One TTFT of ``name`` through ``bench_decode.run_once``, the compressor's timings added to ``sums``."""
    original = model.set_compression

    def set_and_wrap(config: CompressionConfig) -> None:
        original(config)
        if model.compressor is not None:
            _timed_compressor(model, sums, captured, layers)

    model.set_compression = set_and_wrap
    try:
        return run_once(model, CompressionConfig.from_preset(name), ids, window, 1)["ttft_s"]
    finally:
        del model.set_compression


if __name__ == "__main__":
    sys.exit(main())
