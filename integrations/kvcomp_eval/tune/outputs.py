"""What a tuning run writes: ``trials.csv``, ``pareto.md`` and ``best.yaml``."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvcore.config import CompressionConfig

if TYPE_CHECKING:
    import optuna

    pass
from kvcomp_eval.tune.settings import TuneSettings


# -- outputs ----------------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    # A reader (or an interrupted run) sees the old file or the new one, never half of one.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _schedule_text(config: dict[str, Any] | None) -> str:
    if not config:
        return ""
    prop = config.get("propagator") or {}
    schedule = prop.get("keep_ratio_by_layer")
    if prop.get("name") == "none" or not schedule:
        return "none"
    return " ".join(f"{k}:{v}" for k, v in sorted(schedule.items(), key=lambda kv: int(kv[0])))


_CONFIG_COLUMNS = (
    ("alpha", "scorer"), ("beta", "scorer"), ("gamma", "scorer"),
    ("frac_8bit", "quantizer"), ("frac_4bit", "quantizer"), ("frac_2bit", "quantizer"), ("frac_drop", "quantizer"),
    ("group_size", "quantizer"), ("residual_length", "quantizer"),
)
_MEASURE_COLUMNS = ("quality", "kl", "agreement", "task_score", "task_loss", "kv_fraction", "penalty")


def trial_rows(trials: Sequence["optuna.trial.FrozenTrial"]) -> list[dict[str, Any]]:
    """One flat row per trial: state, objectives, measurements, the config's searched fields, raw params."""
    param_names = sorted({name for t in trials for name in t.params})
    rows = []
    for t in trials:
        attrs = t.user_attrs
        config = attrs.get("config")
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        values = list(t.values) if t.values is not None else []
        row["objective_0"] = values[0] if values else ""
        row["objective_1"] = values[1] if len(values) > 1 else ""
        for name in _MEASURE_COLUMNS:
            row[name] = attrs.get(name, "")
        for name, section in _CONFIG_COLUMNS:
            row[name] = (config or {}).get(section, {}).get(name, "")
        row["propagation"] = _schedule_text(config)
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else ""
        row["duration_s"] = round(duration, 3) if duration != "" else ""
        row["prune_reason"] = attrs.get("prune_reason", "")
        for name in param_names:
            row[f"param_{name}"] = t.params.get(name, "")
        rows.append(row)
    return rows


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def penalised(quality: float, kv_fraction: float, settings: TuneSettings) -> float:
    """The single-objective value: ``quality + penalty * max(0, kv_fraction - max_kv_fraction)``."""
    return quality + settings.penalty * max(0.0, kv_fraction - settings.max_kv_fraction)


def select_best(study: "optuna.Study", settings: TuneSettings) -> "optuna.trial.FrozenTrial | None":
    """The trial whose config goes to ``best.yaml``.

    Single objective: Optuna's best trial. Multi-objective: of the Pareto front, the trial with
    the lowest single-objective value (quality plus the over-budget penalty), so a config within
    ``max_kv_fraction`` wins whenever the front has one.
    """
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    if not settings.multi_objective:
        return study.best_trial
    front = study.best_trials
    return min(front, key=lambda t: (penalised(t.values[0], t.values[1], settings), t.number))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pareto_markdown(study: "optuna.Study", settings: TuneSettings, chosen: "optuna.trial.FrozenTrial | None") -> str:
    front = sorted(study.best_trials, key=lambda t: (t.values[1], t.values[0]))
    lines = [
        f"# Pareto front of study `{study.study_name}`",
        "",
        f"Objectives, both minimised: quality = KL(ref || trial) over the first {settings.kl_steps} teacher-forced "
        f"tokens ({settings.kl_aggregate} over prompts) + {settings.task_weight} x task score lost; KV fraction = stored KV bytes / fp16 bytes. "
        f"best.yaml is the front's trial with the lowest quality + {settings.penalty} x max(0, KV fraction - "
        f"{settings.max_kv_fraction}) (marked *).",
        "",
        "| trial | quality | KL | agreement | task score | KV fraction | alpha | beta | gamma | 8/4/2/drop | G | R | propagation |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in front:
        a, c = t.user_attrs, t.user_attrs.get("config", {})
        q = c.get("quantizer", {})
        s = c.get("scorer", {})
        fracs = "/".join(_fmt(q.get(k), 3) for k in ("frac_8bit", "frac_4bit", "frac_2bit", "frac_drop"))
        mark = "*" if chosen is not None and t.number == chosen.number else ""
        lines.append(
            f"| {t.number}{mark} | {_fmt(t.values[0])} | {_fmt(a.get('kl'))} | {_fmt(a.get('agreement'), 2)} | "
            f"{_fmt(a.get('task_score'), 2)} | {_fmt(t.values[1])} | {_fmt(s.get('alpha'), 3)} | {_fmt(s.get('beta'), 3)} | "
            f"{_fmt(s.get('gamma'), 3)} | {fracs} | {q.get('group_size', '-')} | {q.get('residual_length', '-')} | "
            f"{_schedule_text(c)} |"
        )
    return "\n".join(lines) + "\n"


def _best_yaml(trial: "optuna.trial.FrozenTrial", settings: TuneSettings, study_name: str) -> str:
    a = trial.user_attrs
    task = f", task score {a['task_score']:.2f}" if isinstance(a.get("task_score"), float) else ""
    description = (
        f"kvcomp tune: study {study_name}, trial {trial.number} ({settings.sampler}, suite {settings.suite}): "
        f"KL {a['kl']:.4f} nats over the first {settings.kl_steps} tokens ({settings.kl_aggregate} over prompts), KV {a['kv_fraction']:.3f} of fp16{task}."
    )
    config = CompressionConfig.from_dict({**a["config"], "description": description}, source=f"trial {trial.number}")
    return config.resolved().to_yaml()


def write_outputs(study: "optuna.Study", settings: TuneSettings) -> "optuna.trial.FrozenTrial | None":
    """(Re)write ``trials.csv``, ``best.yaml``, ``pareto.md`` (multi-objective) and ``summary.json``; returns the best trial."""
    out = settings.out_dir
    trials = study.get_trials(deepcopy=False)
    _atomic_write(out / "trials.csv", _csv_text(trial_rows(trials)))
    best = select_best(study, settings)
    if best is not None:
        _atomic_write(out / "best.yaml", _best_yaml(best, settings, study.study_name))
        if settings.multi_objective:
            _atomic_write(out / "pareto.md", _pareto_markdown(study, settings, best))
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    summary = {
        "study_name": study.study_name,
        "sampler": settings.sampler,
        "objectives": "multi" if settings.multi_objective else "single",
        "n_trials": len(trials),
        "states": states,
        "best_trial": best.number if best is not None else None,
        "best_values": list(best.values) if best is not None else None,
        "best_measurement": {k: best.user_attrs.get(k) for k in _MEASURE_COLUMNS} if best is not None else None,
        "pareto_trials": [t.number for t in study.best_trials] if settings.multi_objective and best is not None else None,
    }
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return best
