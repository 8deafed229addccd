"""Plot passkey accuracy against KV bytes for kvcomp and every peer from a passkey_peers JSONL.

    .venv/bin/python bench/peers/pareto.py docs/data/passkey_peers.jsonl --out docs/img/passkey_pareto.png

Each point is one method: mean accuracy over all prompts and lengths vs mean KV bytes relative
to an fp16 cache (the uncompressed kvcomp row stores fp32 on CPU and is drawn at 1.0, its fp16
equivalent, so it sits with the other full caches).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_points(path: Path) -> dict[str, tuple[float, float, str]]:
    """``label -> (kv fraction, accuracy, side)`` averaged over rows."""
    acc: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("side") not in ("peer", "kvcomp"):
            continue
        frac = min(row["kv_bytes"] / row["kv_bytes_fp16_full"], 1.0)
        acc[row["label"]].append((frac, float(row["score"]), row["side"]))
    return {
        label: (sum(f for f, _, _ in v) / len(v), sum(s for _, s, _ in v) / len(v), v[0][2])
        for label, v in acc.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    points = load_points(args.results)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, (frac, score, side) in sorted(points.items()):
        ours = side == "kvcomp"
        ax.scatter(frac, score, s=90 if ours else 40, marker="*" if ours else "o", color="tab:red" if ours else "tab:blue")
        ax.annotate(label, (frac, score), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KV bytes / fp16 cache of the same tokens")
    ax.set_ylabel("passkey accuracy (500 and 1000 tokens)")
    ax.set_title("SmolLM2-135M passkey: kvcomp (red stars) vs kvpress and QuantizedCache")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    for label, (frac, score, side) in sorted(points.items(), key=lambda kv: kv[1][0]):
        print(f"| {label} | {side} | {frac:.3f} | {score:.2f} |")


if __name__ == "__main__":
    main()
