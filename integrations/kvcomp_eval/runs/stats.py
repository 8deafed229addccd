"""Per-config means over result rows: what the summary tables and the plots show."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvcomp_eval.runs.store import REFERENCE


@dataclass(frozen=True)
class ConfigStats:
    """One config's means over the rows of one task (or all tasks).

    Attributes:
        config: config name.
        n: examples.
        score: mean task score in [0, 1].
        kv_fraction: mean stored KV bytes / bytes of an fp16 cache of the same tokens.
        avg_bits: mean bits per stored K/V element (16 x kv_fraction).
        ttft_s: mean time to first token, seconds.
        ttft_ratio: this config's summed TTFT / the reference's on the same examples (None if
            no reference rows).
        kl_mean: mean over examples of KL(full || config) averaged over the first K teacher-forced
            positions, nats.
        kl_first: the same at the first position only.
        prefix_agreement: mean share of the reference's generated tokens reproduced before the
            first difference.
        exact_match: share of examples whose generated tokens equal the reference's.
        rouge_l_ref: mean ROUGE-L F1 of the output against the reference's output.
        decode_tokens_per_s: mean decoding speed.
        peak_rss_bytes: largest peak memory seen (process RSS on CPU, CUDA peak on GPU).
        prompt_tokens: mean prompt length.
    """

    config: str
    n: int
    score: float
    kv_fraction: float
    avg_bits: float
    ttft_s: float
    ttft_ratio: float | None
    kl_mean: float
    kl_first: float
    prefix_agreement: float
    exact_match: float
    rouge_l_ref: float
    decode_tokens_per_s: float
    peak_rss_bytes: int
    prompt_tokens: float


def current_rows(rows: Sequence[Mapping[str, Any]], run_info: Mapping[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Rows of each config's current contents, and how many older rows were left out."""
    current: dict[str, str] = {n: v["hash"] for n, v in run_info.get("configs", {}).items()}
    for row in rows:
        if row["config"] not in run_info.get("configs", {}):
            current[row["config"]] = row["config_hash"]  # the last row of an unknown config wins
    kept = [dict(r) for r in rows if current.get(r["config"]) == r["config_hash"]]
    return kept, len(rows) - len(kept)


def config_order(rows: Sequence[Mapping[str, Any]], run_info: Mapping[str, Any]) -> list[str]:
    """Config names with rows: the reference first, then ``run.json``'s order, then the rest as seen."""
    names = [n for n in run_info.get("configs", {})]
    names += [r["config"] for r in rows if r["config"] not in names]
    names = list(dict.fromkeys(names))
    present = {r["config"] for r in rows}
    names = [n for n in names if n in present]
    return ([REFERENCE] if REFERENCE in names else []) + [n for n in names if n != REFERENCE]


def mean_or_nan(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else float("nan")


def aggregate(rows: Sequence[Mapping[str, Any]], order: Sequence[str]) -> list[ConfigStats]:
    """Per config (in ``order``) means over ``rows``."""
    ref_ttft = {r["example_id"]: float(r["ttft_s"]) for r in rows if r["config"] == REFERENCE}
    out = []
    for name in order:
        mine = [r for r in rows if r["config"] == name]
        if not mine:
            continue
        paired = [r for r in mine if r["example_id"] in ref_ttft]
        ratio = None
        if paired:
            ref_sum = sum(ref_ttft[r["example_id"]] for r in paired)
            ratio = sum(float(r["ttft_s"]) for r in paired) / ref_sum if ref_sum > 0 else None
        out.append(
            ConfigStats(
                config=name,
                n=len(mine),
                score=mean_or_nan([float(r["score"]) for r in mine]),
                kv_fraction=mean_or_nan([float(r["kv_fraction"]) for r in mine]),
                avg_bits=mean_or_nan([float(r["avg_bits"]) for r in mine]),
                ttft_s=mean_or_nan([float(r["ttft_s"]) for r in mine]),
                ttft_ratio=ratio,
                kl_mean=mean_or_nan([float(r["kl_mean"]) for r in mine]),
                kl_first=mean_or_nan([float(r["kl_first"]) for r in mine]),
                prefix_agreement=mean_or_nan([float(r["prefix_agreement"]) for r in mine]),
                exact_match=mean_or_nan([float(bool(r["exact_match"])) for r in mine]),
                rouge_l_ref=mean_or_nan([float(r["rouge_l_ref"]) for r in mine]),
                decode_tokens_per_s=mean_or_nan([float(r["decode_tokens_per_s"]) for r in mine]),
                peak_rss_bytes=max(int(r["peak_rss_bytes"]) for r in mine),
                prompt_tokens=mean_or_nan([float(r["prompt_tokens"]) for r in mine]),
            )
        )
    return out
