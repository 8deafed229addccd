"""Hyperparameter search over compression configs with Optuna (``kvcomp tune``).

Every trial is a real :class:`~kvcore.config.CompressionConfig`: a base preset plus the
trial's overrides (:meth:`CompressionConfig.with_overrides`), validated against the component
registry and the model before anything runs. A config that fails validation is pruned and the
reason kept (``prune_reason``).

Objectives (smaller is better):

- **quality**: fidelity to the uncompressed model under teacher forcing. The uncompressed
  model runs once per tuning prompt; its greedy tokens are fed back through each trial's
  compressed cache (:meth:`KVCompPipeline.continuation_logprobs`) and the mean
  KL(P_ref || P_trial) over the first ``kl_steps`` positions is taken per prompt and
  combined over prompts by ``kl_aggregate`` (mean, trimmed mean or median), plus
  ``task_weight`` times the task answers lost against the uncompressed model (probes only).
- **cost**: KV fraction, the stored KV bytes over the fp16 bytes of the same tokens, read
  from :class:`~kvcore.types.GenerationResult` (real ``nbytes``), averaged over the prompts.

Both are taken by :mod:`kvcomp_eval.runs.scoring`, the code ``kvcomp bench`` writes its rows
with: per prompt, a trial's KL, agreement and KV fraction are that row's ``kl_mean``,
``prefix_agreement`` and ``kv_fraction``.

Single-objective samplers (``random``, ``tpe``, ``cmaes``) minimise
``quality + penalty * max(0, kv_fraction - max_kv_fraction)``; multi-objective runs
(``nsga2``; ``random``/``tpe`` with ``objectives="multi"``) minimise ``(quality, kv_fraction)``
and report the Pareto front.

Data split: tuning never reads what final reports use. Probe prompts are built with seed
:data:`TUNING_PROBE_SEED` (reports use small seeds, :class:`ProbeEvaluator` defaults to 0);
LongBench tuning rows lie in ``[0, LONGBENCH_TUNING_ROWS)`` of a task, reports use the rows
from there on. The split is recorded in ``DIR/split.json`` and in the study;
:func:`check_report_split` refuses a report range that overlaps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from kvcore.config import CompressionConfig

if TYPE_CHECKING:
    import optuna

    from kvcore.pipeline import KVCompPipeline
from kvcomp_eval.tune.objective import FidelityObjective, build_prompts, load_or_compute_references
from kvcomp_eval.tune.outputs import write_outputs
from kvcomp_eval.tune.settings import TuneError, TuneSettings
from kvcomp_eval.tune.space import SearchSpace, build_trial_config
from kvcomp_eval.tune.study import _check_study_spec, _record_split, make_sampler, model_identity, open_storage, redact_url


# -- the run ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuneSummary:
    """The outcome of :func:`run_tuning`.

    Attributes:
        study_name: the Optuna study.
        storage_url: where it lives (password hidden).
        trial_numbers: numbers of the trials this call ran.
        best_trial: number of the trial written to ``best.yaml`` (``None`` when no trial completed).
        best_values: its objective values.
        pareto_trials: trial numbers of the Pareto front (multi-objective), else ``None``.
        out_dir: the output folder.
    """

    study_name: str
    storage_url: str
    trial_numbers: list[int]
    best_trial: int | None
    best_values: list[float] | None
    pareto_trials: list[int] | None
    out_dir: Path


def run_tuning(settings: TuneSettings, pipeline: "KVCompPipeline | None" = None) -> TuneSummary:
    """Create or resume the study and run ``settings.trials`` more trials.

    Everything is validated before the model loads; outputs are rewritten after every trial,
    so an interrupted run leaves complete files and a later call with the same storage and
    study name continues the trial numbering.
    """
    import optuna
    from optuna.trial import TrialState

    from kvcore.pipeline import KVCompPipeline

    out = settings.out_dir
    if out.exists() and not out.is_dir():
        raise TuneError(f"--out {out} exists and is not a folder")
    if settings.data_dir is not None and not settings.data_dir.is_dir():
        raise TuneError(f"--data-dir {settings.data_dir} is not a folder")
    task = settings.longbench_task
    if task is not None and settings.data_dir is not None and not (settings.data_dir / f"{task}.jsonl").is_file():
        raise TuneError(f"LongBench file for task {task!r} not found: {settings.data_dir / (task + '.jsonl')}")
    base = CompressionConfig.from_preset(settings.base_preset)
    split = settings.split()
    if (out / "split.json").is_file():
        _record_split(out, split)  # refuses a different split before anything else happens
    if settings.storage is not None:
        storage = open_storage(settings.storage)
        out.mkdir(parents=True, exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        storage = open_storage(settings.storage_url)
    _record_split(out, split)

    pipe = pipeline if pipeline is not None else KVCompPipeline.from_pretrained(settings.model, "full")
    cfg = pipe.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    space = SearchSpace(num_layers=cfg.num_hidden_layers, head_dim=head_dim)
    identity = model_identity(pipe)
    prompts = build_prompts(settings, pipe.tokenizer, pipe.max_prompt_tokens)
    references = load_or_compute_references(
        pipe, prompts, settings.kl_steps, out / "reference.pt", identity, settings.progress
    )
    objective = FidelityObjective(pipe, prompts, references, settings.task_weight, settings.kl_aggregate)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["minimize", "minimize"] if settings.multi_objective else ["minimize"]
    try:
        study = optuna.create_study(
            storage=storage, study_name=settings.study_name, directions=directions, load_if_exists=True
        )
    except Exception as exc:
        raise TuneError(f"cannot create or load study {settings.study_name!r} in {redact_url(settings.storage_url)}: {exc}") from exc
    if [d.name.lower() for d in study.directions] != directions:
        raise TuneError(
            f"study {settings.study_name!r} has {len(study.directions)} objective(s); this run asks for "
            f"{len(directions)} (objectives={'multi' if settings.multi_objective else 'single'})"
        )
    spec = {**settings.objective_spec(), "split": split, "model": identity, "search_space": space.describe()}
    _check_study_spec(study, spec)
    # A resumed study must not replay the samples of the first run: the seed moves on with the
    # number of trials already there (deterministic for a given history).
    n_before = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(
        settings.sampler,
        seed=settings.seed + n_before,
        startup_trials=settings.startup_trials,
        population_size=settings.population_size,
    )

    def run_trial(trial: "optuna.Trial") -> float | tuple[float, float]:
        overrides = space.suggest(trial)
        overrides["description"] = f"trial {trial.number}"
        try:
            config = build_trial_config(base, overrides, num_layers=space.num_layers, head_dim=space.head_dim)
            pipe.set_config(config)  # the model's own checks (layers, shapes) before any prefill
        except ValueError as exc:
            trial.set_user_attr("prune_reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from exc
        trial.set_user_attr("config", config.to_dict())
        try:
            m = objective.measure(config)
        except ValueError as exc:  # refused at run time (e.g. a shape only the prompt reveals)
            trial.set_user_attr("prune_reason", f"refused while running: {exc}")
            raise optuna.TrialPruned(str(exc)) from exc
        penalty = settings.penalty * max(0.0, m.kv_fraction - settings.max_kv_fraction)
        for name, value in (
            ("quality", m.quality), ("kl", m.kl), ("agreement", m.agreement), ("task_score", m.task_score),
            ("task_loss", m.task_loss), ("kv_fraction", m.kv_fraction), ("penalty", penalty),
        ):
            trial.set_user_attr(name, value)
        trial.set_user_attr("kl_per_prompt", m.kl_per_prompt)
        if settings.multi_objective:
            return m.quality, m.kv_fraction
        return m.quality + penalty

    ran: list[int] = []
    with tqdm(total=settings.trials, desc=f"tune {settings.sampler}", unit="trial", disable=not settings.progress) as bar:

        def after_trial(study: "optuna.Study", trial: "optuna.trial.FrozenTrial") -> None:
            ran.append(trial.number)
            best = write_outputs(study, settings)
            if best is not None:
                bar.set_postfix_str(f"best #{best.number} " + " ".join(f"{v:.4g}" for v in best.values), refresh=False)
            bar.update(1)

        try:
            study.optimize(run_trial, n_trials=settings.trials, callbacks=[after_trial], catch=())
        finally:  # an interrupted or failed trial still leaves the files up to date
            best = write_outputs(study, settings)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return TuneSummary(
        study_name=study.study_name,
        storage_url=redact_url(settings.storage_url),
        trial_numbers=ran,
        best_trial=best.number if best is not None else None,
        best_values=list(best.values) if best is not None else None,
        pareto_trials=[t.number for t in study.best_trials] if settings.multi_objective and complete else None,
        out_dir=out,
    )
