#!/usr/bin/env python3
"""Passkey retrieval for the peers (kvpress presses, ``QuantizedCache``) and kvcomp on the same prompts.

Runs in kvcomp's environment: prompts come from :func:`kvcomp_eval.data.probes.build_probe` (the
repetitive grass/sky filler, chat template, answer prefix), the peers run in the peers'
environment through :class:`kvcomp_eval.peers.runner.PeerRunner`, kvcomp presets (optional) through
:class:`kvcore.pipeline.KVCompPipeline`. Every row is appended to ``--out`` (JSON lines) as it
finishes; a Markdown table (passkey accuracy per length, KV bytes relative to fp16) is printed
at the end and can be rebuilt from the file with ``--table-only``.

    .venv/bin/python bench/peers/passkey_peers.py --lengths 500 1000 --per-depth 1 \\
        --max-new-tokens 8 --filler classic --with-kvcomp full,default --out runs/peers/passkey.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvcomp_eval.peers.methods import PeerMethod, PeerPrompt
from kvcomp_eval.peers.runner import PeerRunner
from kvcomp_eval.data.probes import Filler, ProbeExample, build_probe

RATIOS = (0.25, 0.5, 0.75)


def peers_md_methods() -> list[PeerMethod]:
    """Every configuration of the passkey table in shared/PEERS.md, plus the uncompressed model."""
    methods = [PeerMethod("full")]
    for name in ("snapkv", "streaming_llm", "expected_attention", "knorm", "tova"):
        methods += [PeerMethod(name, {"compression_ratio": r}) for r in RATIOS]
        if name == "snapkv":
            methods += [PeerMethod(name, {"compression_ratio": r, "compress_question": True}) for r in RATIOS]
    methods += [PeerMethod("quantized_cache", {"backend": "quanto", "nbits": b}) for b in (2, 4)]
    methods += [PeerMethod("quantized_cache", {"backend": "hqq", "nbits": b}) for b in (2, 4, 8)]
    return methods


def quick_methods() -> list[PeerMethod]:
    """A smaller set: each press at 0.5 (Knorm/TOVA also 0.25), the quantised caches."""
    methods = [PeerMethod("full")]
    methods += [PeerMethod(n, {"compression_ratio": 0.5}) for n in ("snapkv", "streaming_llm", "expected_attention")]
    methods += [PeerMethod("snapkv", {"compression_ratio": 0.5, "compress_question": True})]
    methods += [PeerMethod(n, {"compression_ratio": r}) for n in ("knorm", "tova") for r in (0.25, 0.5)]
    methods += [PeerMethod("quantized_cache", {"backend": "quanto", "nbits": b}) for b in (2, 4)]
    methods += [PeerMethod("quantized_cache", {"backend": "hqq", "nbits": b}) for b in (2, 4, 8)]
    return methods


METHOD_SETS = {"peers-md": peers_md_methods, "quick": quick_methods, "none": list}
"""``none``: no peers, only the ``--with-kvcomp`` presets (to add kvcomp rows to an existing file)."""


CLASSIC_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
"""The filler of the classic passkey test (Landmark Attention, LongLoRA), as PEERS.md used it."""


def build_prompts(
    model: str, lengths: list[int], depths: list[float], per_depth: int, seed: int, filler: str = "classic"
) -> dict[str, ProbeExample]:
    from kvcore.loading import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model))
    sentences = Filler(CLASSIC_FILLER) if filler == "classic" else Filler.default()
    examples: dict[str, ProbeExample] = {}
    for length in lengths:
        for d, depth in enumerate(depths):
            for i in range(per_depth):
                # The probe's content depends on (seed, index) only: a distinct index per depth gives
                # each depth its own key, and every length the same keys at the same depths.
                index = d * per_depth + i
                ex = build_probe("passkey", tokenizer, length, depth, index=index, seed=seed, filler=sentences)
                examples[f"L{length}-d{depth:g}-i{index}"] = ex
    return examples


def _probe_fields(pid: str, ex: ProbeExample, prediction: str) -> dict[str, Any]:
    return {
        "prompt_id": pid,
        "length": ex.length,
        "depth": ex.depth,
        "answers": list(ex.answers),
        "score": ex.score(prediction),
    }


def run_peers(args: argparse.Namespace, examples: dict[str, ProbeExample], out: Any) -> None:
    methods = METHOD_SETS[args.methods]()
    if not methods:
        return
    runner = PeerRunner(model=args.model, threads=args.threads)
    prompts = [PeerPrompt(pid, ex.prompt, ex.question_span) for pid, ex in examples.items()]
    print(f"peers: {len(methods)} methods x {len(prompts)} prompts", file=sys.stderr, flush=True)
    for row in runner.iter_rows(prompts, methods, max_new_tokens=args.max_new_tokens):
        record = {"side": "peer", **row.to_dict(), **_probe_fields(row.id, examples[row.id], row.prediction)}
        out.write(json.dumps(record) + "\n")
        out.flush()
    if runner.versions:
        out.write(json.dumps({"side": "meta", "peer_versions": runner.versions}) + "\n")
        out.flush()


def run_kvcomp(args: argparse.Namespace, examples: dict[str, ProbeExample], out: Any) -> None:
    import torch

    from kvcomp_eval.metrics.summary import generation_metrics
    from kvcore.pipeline import KVCompPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    presets = [p for p in args.with_kvcomp.split(",") if p]
    pipe = KVCompPipeline.from_pretrained(args.model, config=presets[0])
    for preset in presets:
        from kvcore.config import load_config

        pipe.set_config(load_config(preset=preset))
        for pid, ex in examples.items():
            t0 = time.perf_counter()
            result = pipe.generate(ex.prompt, question_span=ex.question_span, max_new_tokens=args.max_new_tokens)
            record = {
                "side": "kvcomp",
                "id": pid,
                "method": f"kvcomp:{preset}",
                "label": f"kvcomp {preset}",
                "params": {"preset": preset},
                "prediction": result.text,
                "token_ids": result.token_ids,
                "prompt_tokens": result.prompt_tokens,
                **generation_metrics(result),
                "kv_fraction": result.kv_bytes / result.kv_bytes_fp16_full,
                **_probe_fields(pid, ex, result.text),
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(f"kvcomp {preset} {pid}: {time.perf_counter() - t0:.1f}s {result.text!r:.40}", file=sys.stderr, flush=True)


def table(rows: Iterable[dict[str, Any]]) -> str:
    """Markdown: method, KV fraction (prefill for peers, end of generation for kvcomp), accuracy per length."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    lengths: set[int] = set()
    for row in rows:
        if row.get("side") in ("peer", "kvcomp"):
            by_method[row["label"]].append(row)
            lengths.add(row["length"])
    cols = sorted(lengths)
    lines = [
        "| method | KV | " + " | ".join(f"acc @{n}" for n in cols) + " | n | mean prompt tokens | mean TTFT s |",
        "|---|---|" + "---|" * len(cols) + "---|---|---|",
    ]
    for label, items in by_method.items():
        kv = [r.get("kv_fraction_prefill", r["kv_fraction"]) for r in items]
        accs = []
        for n in cols:
            scores = [r["score"] for r in items if r["length"] == n]
            accs.append(f"{sum(scores) / len(scores):.2f} ({len(scores)})" if scores else "-")
        tokens = sum(r["prompt_tokens"] for r in items) / len(items)
        ttft = sum(r["ttft_s"] for r in items) / len(items)
        lines.append(f"| {label} | {sum(kv) / len(kv):.3f} | " + " | ".join(accs) + f" | {len(items)} | {tokens:.0f} | {ttft:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[500, 1000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--per-depth", type=int, default=1, help="prompts per (length, depth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--filler", choices=["classic", "probe"], default="classic",
                        help="classic: grass/sky/sun/here we go/there and back again; probe: kvcomp's default probe filler")
    parser.add_argument("--methods", choices=sorted(METHOD_SETS), default="quick")
    parser.add_argument("--with-kvcomp", default="", help="comma-separated kvcomp presets to run on the same prompts")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/peers/passkey.jsonl"))
    parser.add_argument("--table-only", action="store_true", help="print the table of an existing --out file")
    args = parser.parse_args(argv)
    # A plain SIGTERM would skip the finally blocks that end the runner subprocess.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if not args.table_only:
        examples = build_prompts(args.model, args.lengths, args.depths, args.per_depth, args.seed, args.filler)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as out:
            out.write(json.dumps({"side": "meta", "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
                                  "machine": platform.platform(), "processor": platform.processor()}) + "\n")
            run_peers(args, examples, out)
            if args.with_kvcomp:
                run_kvcomp(args, examples, out)
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
