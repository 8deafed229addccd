"""``kvcomp demo``: the main job on the embedded model, uncompressed vs compressed, side by side.

The prompt is built here (no data files): seeded filler sentences with one fact hidden at a
chosen depth and a question about it at the end, so the answer can be checked.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass

from kvcore.config import CompressionConfig

_SUBJECTS = ["The harbour master", "A travelling botanist", "The night librarian", "Our new neighbour",
             "The old clockmaker", "A young violinist", "The village baker", "The lighthouse keeper"]
_VERBS = ["wrote about", "talked for hours about", "kept a diary of", "drew a map of", "argued over",
          "sang a song about", "collected stories about", "carefully measured"]
_OBJECTS = ["the autumn tides", "a forgotten garden", "the price of wool", "the northern stars",
            "a broken bicycle", "the river's winter colour", "the morning trains", "an unfinished bridge"]
_ENDINGS = ["before sunrise.", "during the long rain.", "for the town newsletter.", "with great patience.",
            "while the kettle boiled.", "without telling anyone.", "in a small notebook.", "after the market closed."]


@dataclass(frozen=True)
class DemoPrompt:
    text: str
    question_span: tuple[int, int]
    answer: str


def build_prompt(n_sentences: int, depth: float = 0.4, seed: int = 0) -> DemoPrompt:
    """Filler of ``n_sentences`` sentences with a pass code at relative ``depth`` and a question."""
    rng = random.Random(seed)
    code = str(rng.randint(10000, 99999))
    sentences = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
        for _ in range(n_sentences)
    ]
    sentences.insert(int(depth * n_sentences), f"Remember this: the secret pass code is {code}.")
    question = "What is the secret pass code?"
    text = " ".join(sentences) + f"\n\n{question} The secret pass code is"
    start = text.index(question)
    return DemoPrompt(text=text, question_span=(start, start + len(question)), answer=code)


def agreement(reference: list[int], other: list[int]) -> float:
    """Fraction of the reference tokens reproduced before the first divergence."""
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


def run_demo(args: argparse.Namespace) -> int:
    from kvcore.pipeline import KVCompPipeline

    presets = args.presets or ["full", "default", "fast"]
    print(f"kvcomp demo: loading {args.model} ...", file=sys.stderr, flush=True)
    pipe = KVCompPipeline.from_pretrained(args.model, "full")
    rows = []
    for n_sentences in args.sentences:
        prompt = build_prompt(n_sentences, seed=args.seed)
        reference: list[int] | None = None
        for preset in presets:
            pipe.set_config(CompressionConfig.from_preset(preset))
            print(f"  {preset:>14} on ~{n_sentences} sentences ...", file=sys.stderr, flush=True)
            result = pipe.generate(prompt.text, question_span=prompt.question_span, max_new_tokens=args.max_new_tokens)
            reference = result.token_ids if reference is None else reference
            rows.append(
                [
                    preset,
                    str(result.prompt_tokens),
                    f"{result.kv_bytes / 2**20:.2f}",
                    f"{result.kv_bytes / result.kv_bytes_fp16_full:.3f}",
                    f"{result.ttft_s:.2f}",
                    "yes" if prompt.answer in result.text else "no",
                    f"{agreement(reference, result.token_ids):.2f}",
                    result.text.strip().replace("\n", " ")[:40],
                ]
            )
    header = ["preset", "prompt tokens", "KV MiB", "KV / fp16", "TTFT s", "answer found", "agreement", "output"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        "\nKV = real bytes stored (the full cache holds fp32 on CPU, hence 2x fp16); agreement = share of the "
        "full model's generated tokens reproduced before the first difference.",
        file=sys.stderr,
    )
    return 0


def add_demo_command(add_command) -> None:  # type: ignore[no-untyped-def]
    p = add_command("demo", "compress a generated long prompt on the embedded model: full vs compressed presets", run_demo)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--preset", dest="presets", action="append", help="preset to compare (repeatable; default: full, default, fast)")
    p.add_argument("--sentences", type=int, nargs="+", default=[60, 220], help="filler sentences per prompt (~12 tokens each)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
