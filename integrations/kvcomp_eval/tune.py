"""Hyperparameter search over compression configs with Optuna (``kvcomp tune``).

Every trial is a real :class:`~kvcore.config.CompressionConfig`: a base preset plus the
trial's overrides (:meth:`CompressionConfig.with_overrides`), validated against the component
registry and the model before anything runs. A config that fails validation is pruned and the
reason kept (``prune_reason``).

Objectives (smaller is better):

- **quality**: fidelity to the uncompressed model under teacher forcing. The uncompressed
  model runs once per tuning prompt; its greedy tokens are fed back through each trial's
  compressed cache (:meth:`KVCompPipeline.continuation_logprobs`) and the mean
  KL(P_ref || P_trial) over the first ``kl_steps`` positions is taken, plus
  ``task_weight`` times the task answers lost against the uncompressed model (probes only).
- **cost**: KV fraction, the stored KV bytes over the fp16 bytes of the same tokens, read
  from :class:`~kvcore.types.GenerationResult` (real ``nbytes``).

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

import csv
import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from kvcomp_eval.fidelity import next_token_kl, prefix_agreement
from kvcore.config import CompressionConfig, format_validation_error, preset_names
from kvcore.loading import DEFAULT_MODEL

if TYPE_CHECKING:
    import optuna

    from kvcore.pipeline import KVCompPipeline

__all__ = [
    "SAMPLERS",
    "PROBE_SUITES",
    "TUNING_PROBE_SEED",
    "LONGBENCH_TUNING_ROWS",
    "GROUP_SIZES",
    "TuneError",
    "TuneSettings",
    "SearchSpace",
    "TuningPrompt",
    "Reference",
    "TrialMeasurement",
    "FidelityObjective",
    "TuneSummary",
    "build_prompts",
    "build_trial_config",
    "make_sampler",
    "open_storage",
    "check_report_split",
    "run_tuning",
]

SAMPLERS: tuple[str, ...] = ("random", "tpe", "cmaes", "nsga2")
"""Optuna samplers by name: RandomSampler, TPESampler, CmaEsSampler, NSGAIISampler."""

PROBE_SUITES: tuple[str, ...] = ("passkey", "multi_needle")
"""Synthetic probe suites; ``longbench:<task>`` selects a LongBench task instead."""

TUNING_PROBE_SEED = 1_000_000
"""Seed of every tuning probe prompt. Report probes use seeds below it (0 by default), so the
numbers, keys and filler positions of tuning prompts never appear in a report."""

LONGBENCH_TUNING_ROWS = 100
"""LongBench rows ``[0, 100)`` of a task form the tuning pool; reports use rows from 100 on."""

GROUP_SIZES: tuple[int, ...] = (16, 32, 64)
"""Quantisation group sizes searched (powers of two; each must divide the model's head_dim)."""

KL_CAP_NATS = 1e3
"""KL values are capped here so a trial that zeroes a reference token stays a finite, very bad value."""


class TuneError(ValueError):
    """Bad tuning input: settings, storage URL, data split or a study that does not match."""


# -- settings ---------------------------------------------------------------------------------------
class TuneSettings(BaseModel):
    """What ``kvcomp tune`` runs. Build with :meth:`create` for readable errors.

    Attributes mirror the command's options; ``out_dir`` receives every output file and, unless
    ``storage`` is given, the study database ``sqlite:///<out_dir>/study.db``.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    sampler: Literal["random", "tpe", "cmaes", "nsga2"] = "tpe"
    trials: int = Field(20, ge=1, description="trials to run in this invocation (a resumed study continues)")
    out_dir: Path
    storage: str | None = Field(None, min_length=1, description="any Optuna storage URL; None: sqlite in out_dir")
    study_name: str = Field("kvcomp-tune", min_length=1)
    suite: str = "passkey"
    lengths: tuple[int, ...] = Field((500,), min_length=1, description="prompt lengths in tokens")
    limit: int = Field(4, ge=1, description="prompts per length (probes) or LongBench rows")
    offset: int = Field(0, ge=0, description="first probe index / LongBench row")
    data_dir: Path | None = Field(None, description="LongBench JSONL folder, or a *.txt haystack folder for probes")
    model: str = DEFAULT_MODEL
    base_preset: str = "default"
    max_kv_fraction: float = Field(0.25, gt=0.0, le=2.0, allow_inf_nan=False)
    penalty: float = Field(10.0, ge=0.0, allow_inf_nan=False, description="nats per unit of KV fraction over the cap")
    task_weight: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="weight of the lost task score")
    kl_steps: int = Field(8, ge=1, le=256, description="teacher-forced positions the KL is averaged over")
    objectives: Literal["single", "multi"] | None = None
    """``None``: ``multi`` for nsga2, ``single`` otherwise."""
    seed: int = Field(0, ge=0)
    startup_trials: int = Field(5, ge=1, description="random trials before TPE / CMA-ES model the results")
    population_size: int = Field(8, ge=2, description="NSGA-II population per generation")
    progress: bool = True

    @classmethod
    def create(cls, **values: Any) -> "TuneSettings":
        """Validate ``values``; a bad one raises :class:`TuneError` naming the field and what is accepted."""
        for key in ("out_dir", "data_dir"):
            if isinstance(values.get(key), str):
                values[key] = Path(values[key])
        if isinstance(values.get("lengths"), list):
            values["lengths"] = tuple(values["lengths"])
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise TuneError(f"invalid tuning settings:\n{format_validation_error(exc)}") from exc

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, lengths: tuple[int, ...]) -> tuple[int, ...]:
        bad = [n for n in lengths if n < 16]
        if bad:
            raise ValueError(f"lengths must be prompt sizes of at least 16 tokens, got {bad}")
        if len(set(lengths)) != len(lengths):
            raise ValueError(f"lengths repeat a value: {list(lengths)}")
        return lengths

    @field_validator("suite")
    @classmethod
    def _suite(cls, suite: str) -> str:
        if suite in PROBE_SUITES:
            return suite
        if suite.startswith("longbench:"):
            from kvcomp_eval.longbench import LONGBENCH_TASKS

            task = suite.split(":", 1)[1]
            if task not in LONGBENCH_TASKS:
                raise ValueError(f"unknown LongBench task {task!r}; known tasks: {', '.join(LONGBENCH_TASKS)}")
            return suite
        raise ValueError(
            f"unknown suite {suite!r}; use {', '.join(PROBE_SUITES)} or longbench:<task> (e.g. longbench:multi_news)"
        )

    @field_validator("base_preset")
    @classmethod
    def _preset(cls, name: str) -> str:
        if name not in preset_names():
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
        return name

    @model_validator(mode="after")
    def _combinations(self) -> "TuneSettings":
        if self.sampler == "cmaes" and self.objectives == "multi":
            raise ValueError("the cmaes sampler optimises one objective; use nsga2 or tpe for objectives='multi'")
        if self.longbench_task is not None and self.offset + self.limit > LONGBENCH_TUNING_ROWS:
            raise ValueError(
                f"LongBench rows [{self.offset}, {self.offset + self.limit}) reach beyond the tuning pool "
                f"[0, {LONGBENCH_TUNING_ROWS}); rows from {LONGBENCH_TUNING_ROWS} on are kept for reports"
            )
        return self

    @property
    def longbench_task(self) -> str | None:
        """The LongBench task of a ``longbench:<task>`` suite, else ``None``."""
        return self.suite.split(":", 1)[1] if self.suite.startswith("longbench:") else None

    @property
    def multi_objective(self) -> bool:
        return (self.objectives or ("multi" if self.sampler == "nsga2" else "single")) == "multi"

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.out_dir.expanduser().resolve() / 'study.db'}"

    def split(self) -> dict[str, Any]:
        """The examples this study tunes on (recorded in ``split.json`` and in the study)."""
        if self.longbench_task is not None:
            return {
                "suite": self.suite,
                "task": self.longbench_task,
                "rows": [self.offset, self.offset + self.limit],
                "lengths": list(self.lengths),
                "report_rule": f"reports use rows >= {LONGBENCH_TUNING_ROWS}",
            }
        return {
            "suite": self.suite,
            "probe": self.suite,
            "probe_seed": TUNING_PROBE_SEED,
            "indices": [self.offset, self.offset + self.limit],
            "lengths": list(self.lengths),
            "report_rule": f"reports use probe seeds < {TUNING_PROBE_SEED}",
        }

    def objective_spec(self) -> dict[str, Any]:
        """What defines the objective values; every worker of one study must agree on it."""
        return {
            "objectives": "multi" if self.multi_objective else "single",
            "base_preset": self.base_preset,
            "kl_steps": self.kl_steps,
            "task_weight": self.task_weight,
            "max_kv_fraction": self.max_kv_fraction,
            "penalty": self.penalty,
        }


# -- search space -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    """The parameters a trial samples and how they become config overrides.

    - ``alpha``, ``beta``, ``gamma`` in [0, 1]: the prompt-guided scorer's weights (it
      normalises them to sum 1).
    - Tier fractions by stick breaking, so they always sum to 1: ``kept_fraction`` in
      [``min_kept_fraction``, 1] of the candidate tokens is stored (the rest dropped); of those
      ``share_8bit`` go to 8 bit, and of the remainder ``share_4bit`` to 4 bit, the rest to 2 bit.
    - ``group_size = 2 ** group_size_log2`` over :data:`GROUP_SIZES` (an int parameter, so
      CMA-ES models it too); sizes that do not divide ``head_dim`` are pruned.
    - ``residual_length`` in ``residual_range`` (log scale).
    - ``propagation`` in {none, selective}; for selective: ``propagation_layer`` (first layer
      after which tokens are thinned), ``keep_ratio_1`` and ``keep_ratio_2_share`` give
      ``{layer: r1, layer2: r1 * share}`` with ``layer2`` halfway to the last layer, so the
      ratios never increase. Models with fewer than 3 layers get no propagation.
    """

    num_layers: int
    head_dim: int
    group_sizes: tuple[int, ...] = GROUP_SIZES
    residual_range: tuple[int, int] = (16, 128)
    keep_ratio_range: tuple[float, float] = (0.2, 1.0)
    min_kept_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.head_dim < 1:
            raise ValueError(f"num_layers and head_dim must be >= 1, got {self.num_layers}, {self.head_dim}")
        logs = [math.log2(g) for g in self.group_sizes]
        if not self.group_sizes or any(not x.is_integer() for x in logs) or logs != list(
            range(int(logs[0]), int(logs[0]) + len(logs))
        ):
            raise ValueError(f"group_sizes must be consecutive powers of two, got {self.group_sizes}")

    @property
    def propagation_layers(self) -> tuple[int, int] | None:
        """Range ``[lo, hi]`` of the first propagation layer, or ``None`` when the model is too shallow."""
        lo, hi = max(1, self.num_layers // 8), self.num_layers - 2
        return (lo, hi) if self.num_layers >= 3 and lo <= hi else None

    def describe(self) -> dict[str, Any]:
        return {
            "group_sizes": list(self.group_sizes),
            "residual_range": list(self.residual_range),
            "keep_ratio_range": list(self.keep_ratio_range),
            "min_kept_fraction": self.min_kept_fraction,
            "propagation_layers": list(self.propagation_layers) if self.propagation_layers else None,
        }

    def suggest(self, trial: "optuna.trial.BaseTrial") -> dict[str, Any]:
        """Sample one point; returns dotted config overrides (``{"scorer.alpha": 0.4, ...}``)."""
        alpha = trial.suggest_float("alpha", 0.0, 1.0)
        beta = trial.suggest_float("beta", 0.0, 1.0)
        gamma = trial.suggest_float("gamma", 0.0, 1.0)
        kept = trial.suggest_float("kept_fraction", self.min_kept_fraction, 1.0)
        share8 = trial.suggest_float("share_8bit", 0.0, 1.0)
        share4 = trial.suggest_float("share_4bit", 0.0, 1.0)
        lo = int(math.log2(self.group_sizes[0]))
        group_size = 2 ** trial.suggest_int("group_size_log2", lo, lo + len(self.group_sizes) - 1)
        residual = trial.suggest_int("residual_length", *self.residual_range, log=True)
        overrides: dict[str, Any] = {
            "scorer.name": "prompt_guided",
            "scorer.alpha": round(alpha, 4),
            "scorer.beta": round(beta, 4),
            "scorer.gamma": round(gamma, 4),
            "quantizer.name": "mixed_precision",
            **{f"quantizer.{k}": v for k, v in tier_fractions(kept, share8, share4).items()},
            "quantizer.group_size": group_size,
            "quantizer.residual_length": residual,
        }
        layers = self.propagation_layers
        mode = trial.suggest_categorical("propagation", ["none", "selective"]) if layers else "none"
        if mode == "none":
            overrides["propagator"] = "none"
        else:
            assert layers is not None
            first = trial.suggest_int("propagation_layer", *layers)
            r1 = trial.suggest_float("keep_ratio_1", *self.keep_ratio_range)
            share = trial.suggest_float("keep_ratio_2_share", *self.keep_ratio_range)
            second = first + max(1, (self.num_layers - 1 - first) // 2)
            schedule = {first: round(r1, 4)}
            if second <= self.num_layers - 2:
                schedule[second] = round(min(r1 * share, schedule[first]), 4)
            overrides["propagator.name"] = "selective"
            overrides["propagator.keep_ratio_by_layer"] = schedule
        return overrides


def tier_fractions(kept: float, share8: float, share4: float) -> dict[str, float]:
    """Stick breaking: ``kept`` of the candidates stored; of those ``share8`` at 8 bit, then ``share4`` of the rest at 4 bit.

    Returns ``frac_8bit``, ``frac_4bit``, ``frac_2bit``, ``frac_drop`` rounded to 4 decimals and
    summing to 1 (the drop fraction takes the rounding remainder).
    """
    f8 = round(kept * share8, 4)
    f4 = round(kept * (1.0 - share8) * share4, 4)
    stored = {"frac_8bit": f8, "frac_4bit": f4, "frac_2bit": round(max(0.0, kept - f8 - f4), 4)}
    excess = round(sum(stored.values()) - 1.0, 4)
    if excess > 0:  # two fractions rounded up past 1: take the excess from the largest tier
        top = max(stored, key=lambda k: stored[k])
        stored[top] = round(stored[top] - excess, 4)
    return {**stored, "frac_drop": round(max(0.0, 1.0 - sum(stored.values())), 4)}


def build_trial_config(
    base: CompressionConfig, overrides: dict[str, Any], *, num_layers: int, head_dim: int
) -> CompressionConfig:
    """``base`` plus ``overrides``, validated against the registry and the model's shape.

    Raises:
        ValueError: (``ConfigError``/``ComponentError`` included) naming what is invalid.
    """
    config = base.with_overrides(overrides).resolved()
    quant = config.quantizer
    group = quant.params.get("group_size")
    if quant.name != "none" and isinstance(group, int) and head_dim % group:
        raise ValueError(f"quantizer.group_size={group} does not divide the model's head_dim={head_dim}")
    schedule = config.propagator.params.get("keep_ratio_by_layer") or {}
    too_deep = [int(layer) for layer in schedule if int(layer) >= num_layers]
    if too_deep:
        raise ValueError(f"propagator.keep_ratio_by_layer names layer(s) {too_deep}; the model has {num_layers} layers")
    return config


# -- prompts, references, measurements ---------------------------------------------------------------
@dataclass(frozen=True)
class TuningPrompt:
    """One tuning prompt.

    Attributes:
        key: stable name, e.g. ``passkey/500/3``.
        text: complete model input.
        question_span: character range ``[start, end)`` of the question, or ``None``.
        max_new_tokens: tokens generated per trial (task answer and cost).
        score: maps the generated text to a task score in [0, 1]; ``None`` where none is computed.
    """

    key: str
    text: str
    question_span: tuple[int, int] | None
    max_new_tokens: int
    score: Callable[[str], float] | None = None


def build_prompts(settings: TuneSettings, tokenizer: Any, max_prompt_tokens: int | None = None) -> list[TuningPrompt]:
    """The tuning prompts of ``settings``: ``limit`` per length, from the tuning side of the split.

    Probes use seed :data:`TUNING_PROBE_SEED`, indices ``offset .. offset + limit - 1`` and
    depths spread evenly over (0, 1). LongBench reads rows ``offset .. offset + limit - 1``
    (within :data:`LONGBENCH_TUNING_ROWS`) and cuts each to every length in the middle;
    LongBench prompts get no task score (their answers need hundreds of generated tokens).
    """
    from kvcomp_eval.probes import DEFAULT_MAX_NEW_TOKENS, Filler, build_probe

    if max_prompt_tokens is not None:
        too_long = [n for n in settings.lengths if n + settings.kl_steps > max_prompt_tokens]
        if too_long:
            raise TuneError(
                f"lengths {too_long} plus {settings.kl_steps} generated tokens exceed the model's "
                f"{max_prompt_tokens} positions"
            )
    prompts: list[TuningPrompt] = []
    task = settings.longbench_task
    if task is not None:
        from kvcomp_eval.longbench import LongBenchDataLoader, prepare_prompt

        loader = LongBenchDataLoader(settings.data_dir, offset=settings.offset, limit=settings.limit)
        examples = loader.load(task)
        if len(examples) < settings.limit:
            raise TuneError(
                f"LongBench task {task!r} has {len(examples)} rows from row {settings.offset}; --limit asks for {settings.limit}"
            )
        for length in settings.lengths:
            for ex in examples:
                p = prepare_prompt(ex, task, tokenizer, length)
                prompts.append(TuningPrompt(f"{task}/{length}/{ex.index}", p.text, p.question_span, settings.kl_steps))
        return prompts
    filler = Filler.from_dir(settings.data_dir) if settings.data_dir is not None else None
    n_new = max(settings.kl_steps, DEFAULT_MAX_NEW_TOKENS[settings.suite])
    for length in settings.lengths:
        for i in range(settings.limit):
            index = settings.offset + i
            probe = build_probe(
                settings.suite,
                tokenizer,
                length,
                (i + 0.5) / settings.limit,
                index=index,
                seed=TUNING_PROBE_SEED,
                filler=filler,
            )
            prompts.append(TuningPrompt(f"{settings.suite}/{length}/{index}", probe.prompt, probe.question_span, n_new, probe.score))
    return prompts


@dataclass(frozen=True)
class Reference:
    """The uncompressed model on one prompt.

    Attributes:
        tokens: its first ``T <= kl_steps`` greedy tokens (fewer when it stops at EOS).
        logprobs: ``[T, V]`` float32 log-probabilities after the prompt and after each of ``tokens[:-1]``.
        generated: every token of its greedy generation (``max_new_tokens`` at most).
        score: its task score, or ``None``.
    """

    tokens: list[int]
    logprobs: Tensor
    generated: list[int]
    score: float | None


@dataclass(frozen=True)
class TrialMeasurement:
    """What one config did on the tuning prompts.

    Attributes:
        kl: mean over prompts of the mean teacher-forced KL(P_ref || P_trial), nats.
        agreement: mean share of the reference's generated tokens reproduced before the first difference.
        kv_fraction: stored KV bytes / fp16 bytes of the same tokens, summed over prompts.
        task_score: mean task score, or ``None`` where the suite has none.
        task_loss: mean over prompts of ``max(0, reference score - trial score)``, or ``None``.
        quality: ``kl + task_weight * task_loss`` (the fidelity objective).
        kl_per_prompt: the per-prompt KL values.
    """

    kl: float
    agreement: float
    kv_fraction: float
    task_score: float | None
    task_loss: float | None
    quality: float
    kl_per_prompt: list[float]


class FidelityObjective:
    """Measures configs against the uncompressed model's references on fixed prompts.

    Parameters
    ----------
    pipeline:
        The pipeline; :meth:`measure` switches its config.
    prompts, references:
        Same length and order (see :func:`compute_references`).
    task_weight:
        Weight of the lost task score in ``quality``.
    """

    def __init__(
        self,
        pipeline: "KVCompPipeline",
        prompts: Sequence[TuningPrompt],
        references: Sequence[Reference],
        task_weight: float = 1.0,
    ) -> None:
        if len(prompts) != len(references) or not prompts:
            raise ValueError(f"need one reference per prompt, got {len(prompts)} prompts and {len(references)} references")
        self.pipeline = pipeline
        self.prompts = list(prompts)
        self.references = list(references)
        self.task_weight = task_weight

    def measure(self, config: CompressionConfig) -> TrialMeasurement:
        """Run ``config`` on every prompt (the pipeline keeps it afterwards)."""
        self.pipeline.set_config(config)
        kls: list[float] = []
        agreements: list[float] = []
        scores: list[float] = []
        losses: list[float] = []
        kv_bytes = fp16_bytes = 0
        for prompt, ref in zip(self.prompts, self.references):
            logprobs = self.pipeline.continuation_logprobs(prompt.text, ref.tokens[:-1], question_span=prompt.question_span)
            kl = next_token_kl(ref.logprobs, logprobs).mean().item()
            kls.append(min(kl, KL_CAP_NATS) if math.isfinite(kl) else KL_CAP_NATS)
            result = self.pipeline.generate(
                prompt.text, question_span=prompt.question_span, max_new_tokens=prompt.max_new_tokens
            )
            kv_bytes += result.kv_bytes
            fp16_bytes += result.kv_bytes_fp16_full
            agreements.append(prefix_agreement(ref.generated, result.token_ids))
            if prompt.score is not None and ref.score is not None:
                score = prompt.score(result.text)
                scores.append(score)
                losses.append(max(0.0, ref.score - score))
        kl_mean = sum(kls) / len(kls)
        task_loss = sum(losses) / len(losses) if losses else None
        return TrialMeasurement(
            kl=kl_mean,
            agreement=sum(agreements) / len(agreements),
            kv_fraction=kv_bytes / fp16_bytes,
            task_score=sum(scores) / len(scores) if scores else None,
            task_loss=task_loss,
            quality=kl_mean + self.task_weight * (task_loss or 0.0),
            kl_per_prompt=kls,
        )


def compute_references(
    pipeline: "KVCompPipeline", prompts: Sequence[TuningPrompt], kl_steps: int, progress: bool = False
) -> list[Reference]:
    """Run the uncompressed model (``full`` preset) once per prompt."""
    pipeline.set_config(CompressionConfig.from_preset("full"))
    refs = []
    for prompt in tqdm(prompts, desc="reference", unit="prompt", disable=not progress, leave=False):
        result = pipeline.generate(prompt.text, question_span=prompt.question_span, max_new_tokens=prompt.max_new_tokens)
        tokens = result.token_ids[:kl_steps]
        logprobs = pipeline.continuation_logprobs(prompt.text, tokens[:-1], question_span=prompt.question_span)
        score = prompt.score(result.text) if prompt.score is not None else None
        refs.append(Reference(tokens=tokens, logprobs=logprobs, generated=list(result.token_ids), score=score))
    return refs


def load_or_compute_references(
    pipeline: "KVCompPipeline",
    prompts: Sequence[TuningPrompt],
    kl_steps: int,
    cache_file: Path,
    model_identity: dict[str, Any],
    progress: bool = False,
) -> list[Reference]:
    """References from ``cache_file`` when it was made for the same model, prompts and steps; else computed and saved."""
    fingerprint = _digest(
        {
            "model": model_identity,
            "kl_steps": kl_steps,
            "prompts": [[p.key, p.text, p.question_span, p.max_new_tokens] for p in prompts],
        }
    )
    if cache_file.is_file():
        try:
            stored = torch.load(cache_file, weights_only=True)
        except Exception:  # an unreadable cache is recomputed, never trusted
            stored = None
        if isinstance(stored, dict) and stored.get("fingerprint") == fingerprint:
            return [
                Reference(tokens=list(r["tokens"]), logprobs=r["logprobs"], generated=list(r["generated"]), score=r["score"])
                for r in stored["references"]
            ]
    refs = compute_references(pipeline, prompts, kl_steps, progress)
    payload = {
        "fingerprint": fingerprint,
        "references": [
            {"tokens": r.tokens, "logprobs": r.logprobs, "generated": r.generated, "score": r.score} for r in refs
        ],
    }
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, cache_file)
    return refs


# -- Optuna plumbing --------------------------------------------------------------------------------
def make_sampler(
    name: str, *, seed: int, startup_trials: int = 5, population_size: int = 8
) -> "optuna.samplers.BaseSampler":
    """An Optuna sampler by name (see :data:`SAMPLERS`), seeded.

    ``tpe`` is the multivariate TPE with grouped (conditional) parameters; ``cmaes`` models the
    float and int parameters and samples the categorical ``propagation`` (and the parameters
    that exist only with it, when not in every trial) with a seeded random sampler.
    """
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True, group=True)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401  # Optuna imports it lazily; fail here with the fix instead
        except ImportError as exc:
            raise TuneError("--sampler cmaes needs the 'cmaes' package: pip install 'kvcomp[tune]'") from exc
        return optuna.samplers.CmaEsSampler(
            seed=seed,
            n_startup_trials=startup_trials,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
            warn_independent_sampling=False,
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
    raise TuneError(f"unknown sampler {name!r}; samplers: {', '.join(SAMPLERS)}")


def open_storage(url: str) -> "optuna.storages.BaseStorage":
    """Open an Optuna storage URL (SQLite, PostgreSQL, MySQL: any SQLAlchemy URL Optuna takes).

    Database storages get a heartbeat, so a trial whose worker was killed is marked failed
    (after two minutes) instead of staying ``RUNNING`` for ever.
    """
    import optuna

    if not isinstance(url, str) or "://" not in url:
        raise TuneError(
            f"storage {url!r} is not a database URL; use e.g. sqlite:///tune/study.db or "
            "postgresql://user:password@host:5432/dbname"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=120)
    except Exception as exc:  # SQLAlchemy raises many types (bad dialect, unreachable host, bad path)
        raise TuneError(f"cannot open the Optuna storage {url!r}: {type(exc).__name__}: {exc}") from exc


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(pipeline: "KVCompPipeline") -> dict[str, Any]:
    """Shape and weights fingerprint of the loaded model (paths left out, so workers on other machines agree)."""
    cfg = pipeline.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h = hashlib.sha256()
    for name, tensor in sorted(pipeline.model.state_dict().items())[:4]:
        h.update(name.encode())
        h.update(tensor.detach().float().flatten()[:256].cpu().numpy().tobytes())
    return {
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim,
        "vocab_size": cfg.vocab_size,
        "weights": h.hexdigest()[:16],
    }


def check_report_split(
    tune_dir: str | os.PathLike[str],
    *,
    longbench_rows: tuple[int, int] | None = None,
    task: str | None = None,
    probe_seed: int | None = None,
) -> None:
    """Refuse report examples that a tuning run in ``tune_dir`` used (or that the split reserves).

    Args:
        tune_dir: the ``--out`` folder of ``kvcomp tune`` (holds ``split.json``).
        longbench_rows: the report's LongBench rows ``[start, stop)`` of ``task``.
        task: the report's LongBench task.
        probe_seed: the report's probe seed.

    Raises:
        TuneError: when the report range overlaps the tuning split or the tuning pool.
    """
    path = Path(tune_dir) / "split.json"
    if not path.is_file():
        raise TuneError(f"{path} not found: not a kvcomp tune output folder")
    split = json.loads(path.read_text(encoding="utf-8"))
    if longbench_rows is not None:
        start, stop = longbench_rows
        if start < LONGBENCH_TUNING_ROWS:
            raise TuneError(
                f"report rows [{start}, {stop}) overlap the tuning pool [0, {LONGBENCH_TUNING_ROWS}); start at row {LONGBENCH_TUNING_ROWS}"
            )
        if split.get("task") == task and "rows" in split:
            a, b = split["rows"]
            if start < b and a < stop:
                raise TuneError(f"report rows [{start}, {stop}) of {task} overlap the tuned rows [{a}, {b})")
    if probe_seed is not None and (probe_seed >= TUNING_PROBE_SEED or probe_seed == split.get("probe_seed")):
        raise TuneError(f"report probe seed {probe_seed} is in the tuning range (>= {TUNING_PROBE_SEED})")


def _record_split(out_dir: Path, split: dict[str, Any]) -> None:
    """Write ``split.json``, or refuse when the folder already holds a study tuned on other data."""
    path = out_dir / "split.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != split:
            raise TuneError(
                f"{out_dir} holds a study tuned on {json.dumps(old)}; this run asks for {json.dumps(split)}. "
                "Mixing examples would make the trials incomparable: use another --out or the same data"
            )
        return
    _atomic_write(path, json.dumps(split, indent=2) + "\n")


def _check_study_spec(study: "optuna.Study", spec: dict[str, Any]) -> None:
    """Attach ``spec`` to a new study; refuse one that was made with a different objective or data."""
    old = study.user_attrs.get("kvcomp_spec")
    if old is None:
        study.set_user_attr("kvcomp_spec", spec)
        return
    old = json.loads(json.dumps(old))
    new = json.loads(json.dumps(spec))
    if old != new:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        diffs = "; ".join(f"{k}: study has {old.get(k)!r}, this run {new.get(k)!r}" for k in keys)
        raise TuneError(
            f"study {study.study_name!r} was made with other settings ({diffs}); "
            "resume it with the same settings or pick another --study-name"
        )


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
        f"tokens + {settings.task_weight} x task score lost; KV fraction = stored KV bytes / fp16 bytes. "
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
        f"KL {a['kl']:.4f} nats over the first {settings.kl_steps} tokens, KV {a['kv_fraction']:.3f} of fp16{task}."
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


# -- the run ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuneSummary:
    """The outcome of :func:`run_tuning`.

    Attributes:
        study_name: the Optuna study.
        storage_url: where it lives.
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
    objective = FidelityObjective(pipe, prompts, references, settings.task_weight)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["minimize", "minimize"] if settings.multi_objective else ["minimize"]
    try:
        study = optuna.create_study(
            storage=storage, study_name=settings.study_name, directions=directions, load_if_exists=True
        )
    except Exception as exc:
        raise TuneError(f"cannot create or load study {settings.study_name!r} in {settings.storage_url}: {exc}") from exc
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
        storage_url=settings.storage_url,
        trial_numbers=ran,
        best_trial=best.number if best is not None else None,
        best_values=list(best.values) if best is not None else None,
        pareto_trials=[t.number for t in study.best_trials] if settings.multi_objective and complete else None,
        out_dir=out,
    )
