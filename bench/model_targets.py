"""The embedded model's acceptance numbers, measured in one process on this machine.

1. ``lossless8`` fidelity: prompts of ~0.5k-2k tokens, 32 greedy tokens each; exact agreement with
   the uncompressed model, first-step KL and mean KL over 8 teacher-forced steps.
2. ``default`` at ~2k tokens: KV bytes vs an fp16 cache, with the same fidelity measures.
3. Time to first token at ~4k tokens (configurable): ``full`` vs ``quant-only``/``default`` (no
   propagation) and the propagation presets; the presets alternate and each is timed ``--repeats``
   times, the fastest run counts (the machine may be busy).

    .venv/bin/python bench/model_targets.py            # everything (~15 min on 2 CPU cores)
    .venv/bin/python bench/model_targets.py --skip-ttft
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

from kvcore.config import CompressionConfig
from kvcore.demo import build_prompt
from kvcore.pipeline import KVCompPipeline


def kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per row of log-prob rows ``[T, V]``."""
    return (ref.exp() * (ref - other)).sum(-1)


def fidelity(pipe: KVCompPipeline, preset: str, prompts, max_new_tokens: int) -> list[dict]:
    rows = []
    for p in prompts:
        pipe.set_config(CompressionConfig.from_preset("full"))
        ref = pipe.generate(p.text, question_span=p.question_span, max_new_tokens=max_new_tokens)
        ref_lp = pipe.continuation_logprobs(p.text, ref.token_ids[:8], question_span=p.question_span)
        pipe.set_config(CompressionConfig.from_preset(preset))
        got = pipe.generate(p.text, question_span=p.question_span, max_new_tokens=max_new_tokens)
        got_lp = pipe.continuation_logprobs(p.text, ref.token_ids[:8], question_span=p.question_span)
        step_kl = kl(ref_lp, got_lp)
        rows.append(
            {
                "tokens": got.prompt_tokens,
                "exact": got.token_ids == ref.token_ids,
                "kl_first": float(step_kl[0]),
                "kl_mean8": float(step_kl[1:].mean()),
                "kv_frac": got.kv_bytes / got.kv_bytes_fp16_full,
            }
        )
    return rows


def print_fidelity(title: str, rows: list[dict]) -> None:
    n = len(rows)
    print(f"\n### {title}\n")
    print("| prompt tokens | identical 32-token output | KL first token | mean KL, 8 teacher-forced steps | KV / fp16 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {'yes' if r['exact'] else 'no'} | {r['kl_first']:.5f} | {r['kl_mean8']:.5f} | {r['kv_frac']:.3f} |")
    print(
        f"| **all {n}** | **{sum(r['exact'] for r in rows)}/{n}** | **{sum(r['kl_first'] for r in rows) / n:.5f}** | "
        f"**{sum(r['kl_mean8'] for r in rows) / n:.5f}** | **{sum(r['kv_frac'] for r in rows) / n:.3f}** |",
        flush=True,
    )


def ttft(pipe: KVCompPipeline, presets: list[str], sentences: int, repeats: int) -> None:
    prompt = build_prompt(sentences, seed=7)
    best: dict[str, float] = {}
    tokens = 0
    for _ in range(repeats):
        for preset in presets:
            pipe.set_config(CompressionConfig.from_preset(preset))
            r = pipe.generate(prompt.text, question_span=prompt.question_span, max_new_tokens=1)
            best[preset] = min(best.get(preset, float("inf")), r.ttft_s)
            tokens = r.prompt_tokens
    print(f"\n### Time to first token, {tokens} prompt tokens (best of {repeats})\n")
    print("| preset | TTFT s | vs full |")
    print("|---|---|---|")
    for preset in presets:
        print(f"| {preset} | {best[preset]:.2f} | {best[preset] / best['full']:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="kvcomp acceptance numbers on the embedded model")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--ttft-sentences", type=int, default=300, help="~4k tokens with the default 300")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; {datetime.date.today().isoformat()}"
    )
    pipe = KVCompPipeline.from_pretrained(args.model, "full")
    if not args.skip_fidelity:
        lengths = [35, 50, 65, 80, 95, 110, 125, 140, 150, 150]  # filler sentences: ~0.5k to ~2.1k tokens
        prompts = [build_prompt(n, depth=0.1 + 0.08 * i, seed=100 + i) for i, n in enumerate(lengths)]
        print_fidelity("lossless8 vs full", fidelity(pipe, "lossless8", prompts, 32))
        long_prompts = [build_prompt(150, depth=d, seed=200 + i) for i, d in enumerate([0.2, 0.5, 0.8])]
        print_fidelity("default vs full at ~2k tokens", fidelity(pipe, "default", long_prompts, 32))
    if not args.skip_ttft:
        ttft(pipe, ["full", "quant-only", "default", "propagate-only", "fast"], args.ttft_sentences, args.repeats)


if __name__ == "__main__":
    main()
