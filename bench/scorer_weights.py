"""Which prompt-guided weights find a hidden pass code at equal bytes?

Runs the embedded model on the demo's generated passkey prompts (4 needles at depths 0.4, 0.2,
0.7, 0.9) with the default quantizer and several (alpha, beta, gamma); prints what each found
and the bytes relative to an fp16 cache.

    .venv/bin/python bench/scorer_weights.py --sentences 60 150
"""

from __future__ import annotations

import argparse

from kvcore.config import CompressionConfig
from kvcore.demo import build_prompt
from kvcore.pipeline import KVCompPipeline

WEIGHTS = {
    "0.6/0.2/0.2 (plugin defaults)": (0.6, 0.2, 0.2),
    "0.8/0.1/0.1": (0.8, 0.1, 0.1),
    "0.9/0.0/0.1": (0.9, 0.0, 0.1),
    "1/0/0 (default preset)": (1.0, 0.0, 0.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sentences", type=int, nargs="+", default=[60, 150])
    args = parser.parse_args()
    pipe = KVCompPipeline.from_pretrained(args.model, "full")
    base = CompressionConfig.from_preset("default")
    print("| filler sentences | prompt tokens | weights α/β/γ | codes found | KV / fp16 |")
    print("|---|---|---|---|---|")
    for n in args.sentences:
        prompts = [build_prompt(n, depth=d, seed=s) for s, d in [(0, 0.4), (1, 0.2), (2, 0.7), (3, 0.9)]]
        for label, (a, b, g) in WEIGHTS.items():
            pipe.set_config(base.with_overrides({"scorer.alpha": a, "scorer.beta": b, "scorer.gamma": g}))
            found, frac, tokens = 0, 0.0, 0
            for p in prompts:
                r = pipe.generate(p.text, question_span=p.question_span, max_new_tokens=8)
                found += p.answer in r.text
                frac += r.kv_bytes / r.kv_bytes_fp16_full / len(prompts)
                tokens = r.prompt_tokens
            print(f"| {n} | ~{tokens} | {label} | {found}/{len(prompts)} | {frac:.3f} |", flush=True)


if __name__ == "__main__":
    main()
