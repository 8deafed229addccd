"""What a tuning run is given: :class:`TuneSettings`, its constants and :class:`TuneError`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvcore.config import format_validation_error, preset_names
from kvcore.loading import DEFAULT_MODEL

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

KL_AGGREGATES: tuple[str, ...] = ("mean", "trimmed", "median")
"""How the per-prompt KL values become a trial's KL: their mean; ``trimmed``, the mean without
the highest and the lowest :data:`KL_TRIM` of them; or their median."""

KL_TRIM = 0.1
"""Share cut from each end by the ``trimmed`` aggregate (2 of 20 prompts each side)."""


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
    kl_aggregate: Literal["mean", "trimmed", "median"] = "mean"
    """How per-prompt KL values are combined (:data:`KL_AGGREGATES`). ``mean`` is what reports
    print; ``trimmed`` keeps one outlying prompt of ~20 from deciding a comparison."""
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
            from kvcomp_eval.data.longbench import LONGBENCH_TASKS, unknown_tasks_message

            task = suite.split(":", 1)[1]
            if task not in LONGBENCH_TASKS:
                raise ValueError(unknown_tasks_message([task]))
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
            "kl_aggregate": self.kl_aggregate,
            "task_weight": self.task_weight,
            "max_kv_fraction": self.max_kv_fraction,
            "penalty": self.penalty,
        }
