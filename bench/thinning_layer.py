"""What running a thinning layer's output projection and MLP on the kept tokens only saves.

In one process, alternating, best of ``--repeats``: ``full``, then each propagating config twice,
once as kvcomp runs it (``kvcore.model._thinning_layer``) and once with that layer run whole and
the stream gathered after it (how it ran before). Ratios are against ``full`` of the same run::

    .venv/bin/python bench/thinning_layer.py --length 4000 --repeats 4 --configs fast my_schedule.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import kvcore.model as model_module
from bench_decode import DEFAULT_DATA, real_text_prompts, resolve_configs, run_once
from kvcore.config import CompressionConfig
from kvcore.loading import load_model, load_tokenizer, resolve_model

_THINNING = model_module._thinning_layer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", nargs="+", default=["fast"], help="presets or config files that propagate")
    parser.add_argument("--length", type=int, default=4000, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.length < 64:
        parser.error("--repeats must be >= 1 and --length >= 64")
    try:
        configs = {"full": CompressionConfig(), **resolve_configs(args.configs, baseline=False)}
    except ValueError as exc:
        parser.error(str(exc))
    if "full" in args.configs:
        parser.error("'full' is always the baseline; list the propagating configs only")
    path = resolve_model(args.model)
    model = load_model(path)
    ids, window = real_text_prompts(load_tokenizer(path), [args.length], args.data)[args.length]
    variants = {"thinned": _THINNING, "whole": model_module._whole_layer_then_thin}
    runs: dict[str, list[float]] = {}
    try:
        for rep in range(args.repeats + 1):  # the first round warms up and is not counted
            for name, config in configs.items():
                for variant, layer_fn in variants.items() if name != "full" else [("", _THINNING)]:
                    model_module._thinning_layer = layer_fn
                    ttft = run_once(model, config, ids, window, 0)["ttft_s"]
                    if rep:
                        runs.setdefault(f"{name} {variant}".strip(), []).append(ttft)
    finally:
        model_module._thinning_layer = _THINNING
    full = runs.pop("full")
    print(f"{args.length} tokens, best of {args.repeats}: full {min(full):.3f} s")
    print("| config | layer | TTFT s | / full | / full, median of pairs |\n|---|---|---|---|---|")
    for key, times in runs.items():
        name, variant = key.rsplit(" ", 1)
        pairs = statistics.median(t / f for t, f in zip(times, full))
        print(f"| {name} | {variant} | {min(times):.3f} | {min(times) / min(full):.3f} | {pairs:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
