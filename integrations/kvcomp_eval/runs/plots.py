"""PNG plots of benchmark rows (matplotlib's Agg renderer; no display needed).

- ``score_vs_kv.png``: mean task score against the mean KV bytes fraction, one point per config
  (and task);
- ``fidelity_vs_kv.png``: KL(full ‖ config) and prefix agreement against the KV bytes fraction;
- ``ttft_vs_length.png``: time to first token against prompt length, one line per config;
- ``ablation.png`` (ablation runs only): score, KL, prefix agreement and KV fraction per variant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from kvcomp_eval.runs.stats import ConfigStats, aggregate

__all__ = ["write_plots"]

_MARKERS = "osD^v<>pP*Xh"


def _colours(order: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(order) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(order)}


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)  # Figure.savefig renders with Agg without touching pyplot's backend
    return path


def _by_task(rows: Sequence[Mapping[str, Any]], order: Sequence[str]) -> dict[str, list[ConfigStats]]:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    return {t: aggregate([r for r in rows if r["task"] == t], order) for t in tasks}


def plot_score_vs_kv(rows: Sequence[Mapping[str, Any]], order: Sequence[str], path: Path) -> Path:
    colours = _colours(order)
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for t_i, (task, stats) in enumerate(_by_task(rows, order).items()):
        for s in stats:
            ax.scatter(s.kv_fraction, s.score, color=colours[s.config], marker=_MARKERS[t_i % len(_MARKERS)], s=50,
                       label=s.config if t_i == 0 else None)
            ax.annotate(s.config, (s.kv_fraction, s.score), textcoords="offset points", xytext=(4, 4), fontsize=7)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    ax.set_xlabel("KV bytes / fp16 cache bytes")
    ax.set_ylabel("mean score")
    ax.set_title("Score vs KV bytes" + (f" ({tasks[0]})" if len(tasks) == 1 else " (marker = task)"))
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_fidelity_vs_kv(rows: Sequence[Mapping[str, Any]], order: Sequence[str], path: Path, kl_steps: int) -> Path:
    colours = _colours(order)
    stats = aggregate(rows, order)
    many = len(stats) > 8
    fig = Figure(figsize=(13 if many else 10, 4.6 if many else 4.2))
    ax_kl, ax_pre = fig.subplots(1, 2)
    for s in stats:
        # Peers (``peer:`` configs) hollow, kvcomp's configs filled: the two families at a glance.
        style = {"s": 50, "edgecolors": colours[s.config], "label": s.config,
                 "facecolors": "none" if s.config.startswith("peer:") else colours[s.config]}
        for ax, y in ((ax_kl, s.kl_mean), (ax_pre, s.prefix_agreement)):
            ax.scatter(s.kv_fraction, y, **style)
            ax.annotate(s.config.removeprefix("peer:"), (s.kv_fraction, y), textcoords="offset points", xytext=(4, 4), fontsize=6 if many else 7)
    # symlog: the reference sits at exactly 0 and compressed configs span decades.
    ax_kl.set_yscale("symlog", linthresh=1e-4)
    ax_kl.set_xlabel("KV bytes / fp16 cache bytes")
    ax_kl.set_ylabel(f"KL(full || config), mean over {kl_steps} steps (nats)")
    ax_kl.set_title("Next-token KL to the uncompressed model")
    ax_pre.set_xlabel("KV bytes / fp16 cache bytes")
    ax_pre.set_ylabel("prefix agreement with full")
    ax_pre.set_ylim(-0.05, 1.05)
    ax_pre.set_title("Greedy output agreement")
    for ax in (ax_kl, ax_pre):
        ax.grid(alpha=0.3)
    if many:
        ax_pre.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        ax_pre.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_ttft_vs_length(rows: Sequence[Mapping[str, Any]], order: Sequence[str], path: Path) -> Path:
    colours = _colours(order)
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for name in order:
        mine = [r for r in rows if r["config"] == name]
        if not mine:
            continue
        xs = [int(r["prompt_tokens"]) for r in mine]
        ys = [float(r["ttft_s"]) for r in mine]
        ax.scatter(xs, ys, color=colours[name], s=12, alpha=0.5)
        # Mean per requested length (probes) or per distinct prompt length (LongBench).
        groups: dict[int, list[tuple[int, float]]] = {}
        for r in mine:
            groups.setdefault(int(r.get("length") or r["prompt_tokens"]), []).append((int(r["prompt_tokens"]), float(r["ttft_s"])))
        pts = sorted((sum(p for p, _ in g) / len(g), sum(t for _, t in g) / len(g)) for g in groups.values())
        ax.plot([p for p, _ in pts], [t for _, t in pts], color=colours[name], marker="o", label=name)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("TTFT vs prompt length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_ablation(rows: Sequence[Mapping[str, Any]], order: Sequence[str], path: Path, kl_steps: int) -> Path:
    stats = aggregate(rows, order)
    names = [s.config for s in stats]
    panels = (
        ("score", "mean score", [s.score for s in stats]),
        ("kl", f"KL@{kl_steps} (nats)", [s.kl_mean for s in stats]),
        ("prefix", "prefix agreement", [s.prefix_agreement for s in stats]),
        ("kv", "KV / fp16", [s.kv_fraction for s in stats]),
    )
    fig = Figure(figsize=(12, 0.45 * len(names) + 1.8))
    axes = fig.subplots(1, len(panels), sharey=True)
    colours = _colours(order)
    for ax, (kind, label, values) in zip(axes, panels):
        ax.barh(range(len(names)), values, color=[colours[n] for n in names])
        if kind in ("score", "prefix"):
            ax.set_xlim(0, 1.15)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        for i, v in enumerate(values):
            if v == v:
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Ablation: each variant next to the base and the uncompressed model", fontsize=10)
    return _save(fig, path)


def write_plots(
    out_dir: Path, rows: Sequence[Mapping[str, Any]], order: Sequence[str], run_info: Mapping[str, Any]
) -> list[Path]:
    """Write every plot for ``rows`` into ``out_dir``; returns the files."""
    kl_steps = int(run_info.get("identity", {}).get("generation", {}).get("kl_steps") or 8)
    files = [
        plot_score_vs_kv(rows, order, out_dir / "score_vs_kv.png"),
        plot_fidelity_vs_kv(rows, order, out_dir / "fidelity_vs_kv.png", kl_steps),
        plot_ttft_vs_length(rows, order, out_dir / "ttft_vs_length.png"),
    ]
    if run_info.get("variants"):
        files.append(plot_ablation(rows, order, out_dir / "ablation.png", kl_steps))
    return files
