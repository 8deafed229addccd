"""How often each config finds the pass code of ``kvcomp demo``'s prompts, over many seeds.

Usage::

    python bench/demo_passcodes.py [--configs full,fast,docs/data/fast_report/fast_prev.yaml] \
        [--sentences 50,60,70] [--seeds 0-15]

One demo prompt per (sentences, seed), the code at 0.4 of the depth as in ``kvcomp demo``;
each config generates 8 greedy tokens and counts a hit when the code appears in them. Prints
the hits per config and sentence count. Configs are presets or YAML/JSON files (named by
their stem), checked before the model loads.
"""

from __future__ import annotations

import argparse

from bench_decode import resolve_configs
from kvcore.demo import build_prompt
from kvcore.pipeline import KVCompPipeline


def _seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="full,fast,docs/data/fast_report/fast_prev.yaml")
    parser.add_argument("--sentences", default="50,60,70")
    parser.add_argument("--seeds", default="0-15", help="a seed or an inclusive range, e.g. 0-15")
    args = parser.parse_args()
    try:  # configs, sentence counts and seeds checked before the model loads
        configs = resolve_configs(args.configs.split(","), baseline=False)
        sentences = [int(n) for n in args.sentences.split(",")]
        seeds = _seeds(args.seeds)
    except ValueError as exc:
        parser.error(str(exc))
    pipe = KVCompPipeline.from_pretrained(config="full")
    hits = {(name, n): 0 for name in configs for n in sentences}
    for n in sentences:
        for seed in seeds:
            prompt = build_prompt(n, seed=seed)
            for name, config in configs.items():
                pipe.set_config(config)
                result = pipe.generate(prompt.text, question_span=prompt.question_span, max_new_tokens=8)
                hits[name, n] += prompt.answer in result.text
    print(f"| config | {' | '.join(f'{n} sentences' for n in sentences)} | all |")
    print(f"|---|{'---|' * (len(sentences) + 1)}")
    for name in configs:
        row = [hits[name, n] for n in sentences]
        cells = " | ".join(f"{h}/{len(seeds)}" for h in row)
        print(f"| {name} | {cells} | {sum(row)}/{len(seeds) * len(sentences)} |")


if __name__ == "__main__":
    main()
