"""``kvcomp tune``: hyperparameter search with Optuna (a ``kvcomp.commands`` plugin).

    kvcomp tune --sampler tpe --trials 8 --suite passkey --lengths 500 --limit 4 --out tune1

Writes ``tune1/trials.csv``, ``tune1/best.yaml`` (load it with ``--config``), ``tune1/pareto.md``
(multi-objective) and keeps the study in ``tune1/study.db`` unless ``--storage`` names another.
The heavy imports (Optuna, torch, the model) happen only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from kvcore.hookspecs import hookimpl

_SAMPLERS = ("random", "tpe", "cmaes", "nsga2")  # kvcomp_eval.tune.settings.SAMPLERS, without importing it here
_KL_AGGREGATES = ("mean", "trimmed", "median")  # kvcomp_eval.tune.settings.KL_AGGREGATES, likewise


def cmd_tune(args: argparse.Namespace) -> int:
    try:
        import optuna  # noqa: F401
    except ImportError as exc:
        raise ValueError("kvcomp tune needs Optuna: pip install 'kvcomp[tune]'") from exc
    from kvcomp_eval.tune.run import run_tuning
    from kvcomp_eval.tune.settings import TuneSettings

    settings = TuneSettings.create(
        sampler=args.sampler,
        trials=args.trials,
        out_dir=Path(args.out),
        storage=args.storage,
        study_name=args.study_name,
        suite=args.suite,
        lengths=tuple(args.lengths),
        limit=args.limit,
        offset=args.offset,
        data_dir=Path(args.data_dir) if args.data_dir is not None else None,
        model=args.model,
        base_preset=args.base_preset,
        max_kv_fraction=args.max_kv_fraction,
        penalty=args.penalty,
        task_weight=args.task_weight,
        kl_steps=args.kl_steps,
        kl_aggregate=args.kl_aggregate,
        objectives=args.objectives,
        seed=args.seed,
        startup_trials=args.startup_trials,
        population_size=args.population_size,
        progress=not args.no_progress,
    )
    summary = run_tuning(settings)
    record = {
        "study_name": summary.study_name,
        "storage": summary.storage_url,
        "trials_run": summary.trial_numbers,
        "best_trial": summary.best_trial,
        "best_values": summary.best_values,
        "pareto_trials": summary.pareto_trials,
        "out_dir": str(summary.out_dir),
    }
    if args.json:
        print(json.dumps(record))
        return 0
    out = summary.out_dir
    print(f"study {summary.study_name!r} in {summary.storage_url}: ran trials {summary.trial_numbers}")
    if summary.best_trial is None:
        print("no trial completed (see prune_reason in trials.csv)")
    else:
        values = ", ".join(f"{v:.4g}" for v in summary.best_values or [])
        print(f"best trial {summary.best_trial} ({values}) -> {out / 'best.yaml'}")
        if summary.pareto_trials is not None:
            print(f"Pareto front: trials {summary.pareto_trials} -> {out / 'pareto.md'}")
    print(f"every trial: {out / 'trials.csv'}", file=sys.stderr)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


@hookimpl
def register_commands(add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``tune``."""
    p = add_command(
        "tune",
        "search compression hyperparameters with Optuna (random, TPE, CMA-ES, NSGA-II) for fidelity vs KV bytes",
        cmd_tune,
    )
    p.add_argument("--sampler", choices=_SAMPLERS, default="tpe", help="Optuna sampler (default: tpe)")
    p.add_argument("--trials", type=_positive_int, default=20, help="trials to run now; a resumed study continues its numbering")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: trials.csv, best.yaml, pareto.md, study.db")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage URL shared by every worker, e.g. postgresql+psycopg://user:pw@host/db (default: sqlite:///DIR/study.db)",
    )
    p.add_argument("--study-name", default="kvcomp-tune", help="study to create or resume (default: kvcomp-tune)")
    p.add_argument(
        "--suite", default="passkey", help="passkey, multi_needle or longbench:<task>, e.g. longbench:multi_news (default: passkey)"
    )
    p.add_argument("--lengths", type=_positive_int, nargs="+", default=[500], metavar="TOKENS", help="prompt lengths (default: 500)")
    p.add_argument("--limit", type=_positive_int, default=4, help="prompts per length: probe examples or LongBench rows (default: 4)")
    p.add_argument(
        "--offset", type=int, default=0, help="first probe index or LongBench row; LongBench rows stay below 100 (default: 0)"
    )
    p.add_argument("--data-dir", metavar="DIR", help="LongBench JSONL folder (default: the hub), or *.txt filler for probes")
    p.add_argument("--model", default="smollm2-135m", help="model preset, folder, .gguf file or hub id (default: smollm2-135m)")
    p.add_argument("--base-preset", default="default", help="preset the trial overrides start from (default: default)")
    p.add_argument(
        "--max-kv-fraction",
        type=float,
        default=0.25,
        help="KV budget as a fraction of fp16 bytes; single-objective runs pay PENALTY per unit above it (default: 0.25)",
    )
    p.add_argument("--penalty", type=float, default=10.0, help="nats added per unit of KV fraction over the budget (default: 10)")
    p.add_argument("--task-weight", type=float, default=1.0, help="weight of the task score lost against the uncompressed model (default: 1)")
    p.add_argument("--kl-steps", type=_positive_int, default=8, help="teacher-forced tokens the KL is averaged over (default: 8)")
    p.add_argument(
        "--kl-aggregate",
        choices=_KL_AGGREGATES,
        default="mean",
        help="how the per-prompt KL values become a trial's KL: mean, trimmed (mean without the highest and "
        "lowest 10%%) or median (default: mean)",
    )
    p.add_argument(
        "--objectives", choices=["single", "multi"], default=None, help="default: multi for nsga2, single otherwise"
    )
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0); give each worker of a shared study its own")
    p.add_argument("--startup-trials", type=_positive_int, default=5, help="random trials before TPE/CMA-ES model the results (default: 5)")
    p.add_argument("--population-size", type=int, default=8, help="NSGA-II population per generation (default: 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
