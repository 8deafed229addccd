"""The benchmark's report: ``summary.md`` and PNG plots, rebuilt from ``results.jsonl`` alone.

``run.json`` (written next to the results) adds the command, machine, date and the configs'
contents to the header when it is there; every number comes from the result rows.
Per config name only the rows of its current contents count (the hash in ``run.json``, else
the hash of its last row): rows of an older version of a config stay in the file but are
left out of the tables, and the summary says how many.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from kvcomp_eval.runs.plots import write_plots
from kvcomp_eval.runs.stats import ConfigStats, aggregate, config_order, current_rows, mean_or_nan
from kvcomp_eval.runs.store import REFERENCE, RESULTS_FILE, ResultsStore

SUMMARY_FILE = "summary.md"
CSV_FILE = "results.csv"


def _fmt(value: float | None, spec: str) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return format(value, spec)


_COLUMNS = (
    "config", "n", "score", "KV/fp16", "avg bits", "TTFT s", "TTFT/full",
    "KL@8", "KL@1", "prefix", "exact", "ROUGE-L", "decode tok/s",
)


def _table(stats: Sequence[ConfigStats], kl_steps: int) -> list[str]:
    header = [c if c != "KL@8" else f"KL@{kl_steps}" for c in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in stats:
        cells = [
            f"`{s.config}`", str(s.n), _fmt(s.score, ".3f"), _fmt(s.kv_fraction, ".3f"), _fmt(s.avg_bits, ".2f"),
            _fmt(s.ttft_s, ".3f"), _fmt(s.ttft_ratio, ".2f"), _fmt(s.kl_mean, ".4f"), _fmt(s.kl_first, ".4f"),
            _fmt(s.prefix_agreement, ".3f"), _fmt(s.exact_match, ".2f"), _fmt(s.rouge_l_ref, ".3f"),
            _fmt(s.decode_tokens_per_s, ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _by_length_table(rows: Sequence[Mapping[str, Any]], order: Sequence[str], field: str, spec: str) -> list[str]:
    lengths = sorted({r["length"] for r in rows if r.get("length") is not None})
    header = ["config"] + [f"{n} tok" for n in lengths]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in order:
        cells = [f"`{name}`"]
        for n in lengths:
            vals = [float(r[field]) for r in rows if r["config"] == name and r.get("length") == n]
            cells.append(_fmt(mean_or_nan(vals), spec) if vals else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_LEGEND = """\
Columns: `n` examples; `score` mean task score (probes: share of the hidden answers found;
LongBench: the task's official metric), 0–1; `KV/fp16` stored KV bytes divided by the bytes of
an fp16 cache of the same tokens (real `nbytes`; `full` keeps the model's own cache, fp32 on CPU,
hence 2.0); `avg bits` = 16 × KV/fp16; `TTFT s` mean time to first token; `TTFT/full` summed
TTFT over the summed TTFT of `full` on the same prompts; `KL@K` mean KL(full ‖ config) in nats
over the first K positions of the reference's own output fed to both caches (teacher forcing);
`KL@1` the first position alone (≈0 for pure quantisation: the prefill's last logits come from
full-precision attention; later positions read the compressed cache); `prefix` share of the
reference's generated tokens reproduced before the first difference; `exact` share of prompts
whose whole generation equals the reference's; `ROUGE-L` of the output against the reference
output; `decode tok/s` mean decoding speed."""


def render_summary(
    rows: Sequence[Mapping[str, Any]], run_info: Mapping[str, Any], left_out: int = 0, plots: Sequence[Path] = ()
) -> str:
    """The Markdown report."""
    order = config_order(rows, run_info)
    suite_info = run_info.get("suite", {})
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    runs = run_info.get("runs", [])
    last = runs[-1] if runs else {}
    kl_steps = run_info.get("identity", {}).get("generation", {}).get("kl_steps") or max(
        (len(r.get("kl_per_step", [])) for r in rows), default=8
    )
    title = {"ablate": "kvcomp ablation", "run": "kvcomp main experiment"}.get(run_info.get("experiment", ""), "kvcomp benchmark")
    lines = [f"# {title}: {', '.join(suites) or 'no rows'}", ""]
    if last.get("command"):
        lines.append(f"- command: `{last['command']}`")
    if run_info.get("model"):
        lines.append(f"- model: `{run_info['model']}`")
    machine = last.get("machine")
    if machine:
        gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
        lines.append(
            f"- machine: {machine.get('platform')}, {machine.get('cpu_count')} CPUs ({machine.get('processor')}), "
            f"Python {machine.get('python')}, torch {machine.get('torch')}, transformers {machine.get('transformers')}, "
            f"device `{machine.get('device')}`{gpu}"
        )
    if last.get("started_at"):
        lines.append(f"- date: {last['started_at']} (this run); {len(runs)} run(s) wrote into this folder")
    if suite_info:
        if suite_info.get("kind") == "probe":
            lines.append(
                f"- suite: probe `{suite_info['tasks'][0]}`, lengths {suite_info['lengths']} tokens, depths "
                f"{suite_info['depths']}, seed {suite_info['seed']}"
                + (f", haystack {suite_info['haystack_dir']}" if suite_info.get("haystack_dir") else "")
            )
        else:
            src = suite_info.get("data_dir") or "the hub (THUDM/LongBench)"
            lines.append(f"- suite: LongBench {', '.join(suite_info.get('tasks', []))} from {src}")
    gen = run_info.get("identity", {}).get("generation", {})
    if gen:
        lines.append(
            f"- generation: greedy, max new tokens {gen.get('max_new_tokens') or 'the task default'}, "
            f"question span {'given to the scorer' if gen.get('use_question_span') else 'not given (last W tokens)'}"
        )
    if REFERENCE in order:
        added = any(r.get("reference_added") for r in runs)
        lines.append(
            f"- reference: `{REFERENCE}` (the uncompressed model) ran first on every prompt"
            + (" — added by the benchmark, it was not asked for." if added else ".")
        )
    if left_out:
        lines.append(f"- {left_out} older row(s) of configs whose contents changed since are kept in {RESULTS_FILE} but left out here.")
    for note in run_info.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        lines += [f"## {task}", ""]
        lines += _table(aggregate(task_rows, order), kl_steps)
        lines.append("")
        if any(r.get("length") is not None for r in task_rows) and suite_info.get("kind", "probe") == "probe":
            lines += ["Score by requested prompt length:", ""]
            lines += _by_length_table(task_rows, order, "score", ".3f")
            lines += ["", f"KL@{kl_steps} by requested prompt length:", ""]
            lines += _by_length_table(task_rows, order, "kl_mean", ".4f")
            lines.append("")
    if len(tasks) > 1:
        pooled = aggregate(rows, order)
        macro = {
            name: mean_or_nan([s.score for t in tasks for s in aggregate([r for r in rows if r["task"] == t], [name])])
            for name in order
        }
        pooled = [ConfigStats(**{**asdict(s), "score": macro[s.config]}) for s in pooled]
        lines += ["## All tasks", "", "Score = mean of the task means; other columns pooled over all rows.", ""]
        lines += _table(pooled, kl_steps)
        lines.append("")
    lines += [_LEGEND, ""]

    variants = run_info.get("variants", {})
    if variants:
        lines += ["## Ablation variants", "", "| variant | derived from the base | KV bytes matched |", "|---|---|---|"]
        for name, v in variants.items():
            match = v.get("bytes_match") or "–"
            lines.append(f"| `{name}` | {v.get('derivation', '')} | {match} |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    configs = run_info.get("configs", {})
    if configs:
        lines += ["## Configs", ""]
        for name in order:
            if name not in configs:
                continue
            body = dict(configs[name]["config"])
            body.pop("description", None)
            desc = str(configs[name]["config"].get("description", "")).strip()
            lines += [f"### `{name}` (hash {configs[name]['hash']})", ""]
            if desc:
                lines += [desc, ""]
            lines += ["```yaml", yaml.safe_dump(body, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """The rows as CSV (one column per field; lists as JSON text), for spreadsheets and pandas."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    tmp.replace(path)
    return path


def write_report(out_dir: str | Path) -> list[Path]:
    """Write ``summary.md``, ``results.csv`` (current rows) and the plots from ``out_dir/results.jsonl``;
    returns the summary and plot paths (summary first)."""
    out_dir = Path(out_dir)
    store = ResultsStore(out_dir)
    results = store.results_path
    if not store.has_results():
        raise FileNotFoundError(f"{results} does not exist: nothing to report")
    run_info = store.run_info()
    rows, left_out = current_rows(store.rows(), run_info)
    if not rows:
        raise ValueError(f"{results} holds no result rows yet")
    order = config_order(rows, run_info)
    write_csv(out_dir / CSV_FILE, rows)
    plots = write_plots(out_dir, rows, order, run_info)
    summary = out_dir / SUMMARY_FILE
    text = render_summary(rows, run_info, left_out, plots)
    tmp = summary.with_name(summary.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(summary)
    return [summary, *plots]
