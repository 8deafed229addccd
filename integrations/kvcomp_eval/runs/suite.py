"""What a benchmark runs: the suite (one probe or LongBench tasks) and its prepared examples."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvcomp_eval.data.longbench import LONGBENCH_E_TASKS, LONGBENCH_TASKS, PreparedExample, unknown_tasks_message
from kvcomp_eval.data.probes import PROBES, ProbeExample
from kvcore.config import format_validation_error

DEFAULT_LENGTHS = (500, 1000)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)


# -- the suite ------------------------------------------------------------------------------------
def normalised_dir(path: str | Path) -> str:
    """``path`` absolute, ``~`` expanded and ``..`` folded (``/a/main/../data`` is ``/a/data``): one
    spelling per folder, whichever folder the command ran from. Symlinks are left as they are."""
    return os.path.normpath(Path(path).expanduser().absolute())


class BenchSuite(BaseModel):
    """What the benchmark runs: one synthetic probe, or LongBench tasks.

    ``limit``/``offset`` pick examples (probes: of the whole sweep, ordered so that any prefix
    covers every (length, depth) cell; LongBench: per task, after ``offset`` rows); they and
    ``n_per_cell`` are not part of the suite's identity, so a later run may add examples.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: str = Field(pattern="^(probe|longbench)$")
    tasks: tuple[str, ...] = Field(min_length=1)
    """The probe name (one) or the LongBench task names."""
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    """Probe prompt lengths, tokens."""
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    """Probe depths: fraction of the filler before the fact, in [0, 1]."""
    n_per_cell: int | None = Field(default=None, ge=1)
    """Probe examples per (length, depth); ``None``: enough for ``offset + limit``, else 1."""
    seed: int = 0
    haystack_dir: str | None = None
    data_dir: str | None = None
    """Folder of LongBench ``<task>.jsonl``; ``None`` reads the hub."""
    longbench_e: bool = False
    limit: int | None = Field(default=None, ge=1)
    offset: int = Field(default=0, ge=0)
    max_prompt_tokens: int | None = Field(default=None, ge=16)
    """LongBench: prompts longer than this are cut in the middle (default: the model's limit)."""
    min_prompt_tokens: int | None = Field(default=None, ge=1)
    """LongBench: skip rows whose prompt (template applied, after any cut) is shorter; ``limit``
    then counts the rows kept, from ``offset`` on. Like ``limit``, not part of the identity."""

    @field_validator("lengths")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(n < 1 for n in v):
            raise ValueError(f"lengths must be positive token counts, got {list(v)}")
        return v

    @field_validator("depths")
    @classmethod
    def _unit(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not (math.isfinite(d) and 0.0 <= d <= 1.0) for d in v):
            raise ValueError(f"depths must lie in [0, 1], got {list(v)}")
        return v

    @model_validator(mode="after")
    def _known(self) -> "BenchSuite":
        if self.kind == "probe":
            if len(self.tasks) != 1 or self.tasks[0] not in PROBES:
                raise ValueError(f"a probe suite runs one probe of {', '.join(PROBES)}; got {list(self.tasks)}")
        else:
            unknown = [t for t in self.tasks if t not in LONGBENCH_TASKS]
            if unknown:
                raise ValueError(unknown_tasks_message(unknown))
            if len(set(self.tasks)) != len(self.tasks):
                raise ValueError(f"LongBench tasks repeat: {list(self.tasks)}")
        if self.kind == "probe" and self.min_prompt_tokens is not None:
            raise ValueError("min_prompt_tokens selects LongBench rows; probes take their lengths from --lengths")
        if None not in (self.min_prompt_tokens, self.max_prompt_tokens) and self.min_prompt_tokens > self.max_prompt_tokens:  # type: ignore[operator]
            raise ValueError(
                f"min_prompt_tokens {self.min_prompt_tokens} exceeds max_prompt_tokens {self.max_prompt_tokens}: no row could be kept"
            )
        return self

    @classmethod
    def parse(cls, spec: str, **options: Any) -> "BenchSuite":
        """``passkey`` | ``multi_needle`` | ``multi_value`` | ``variable_tracking`` |
        ``longbench`` (the 13 LongBench-E tasks) | ``longbench:TASK[,TASK...]``, plus options."""
        spec = spec.strip()
        if spec in PROBES:
            kind, tasks = "probe", (spec,)
        elif spec == "longbench" or spec.startswith("longbench:"):
            names = spec.partition(":")[2]
            tasks = tuple(t.strip() for t in names.split(",") if t.strip()) if names else LONGBENCH_E_TASKS
            if not tasks:
                raise ValueError(f"suite {spec!r} names no LongBench task; e.g. longbench:qasper,hotpotqa")
            kind = "longbench"
        else:
            raise ValueError(
                f"unknown suite {spec!r}; suites: {', '.join(PROBES)}, longbench, longbench:TASK[,TASK...]"
            )
        data = {k: v for k, v in options.items() if v is not None}
        for key in ("lengths", "depths"):
            if key in data:
                data[key] = tuple(data[key])
        for key in ("haystack_dir", "data_dir"):
            if key in data:  # absolute, so a rerun from another folder is recognised as the same run
                data[key] = normalised_dir(data[key])
        try:
            return cls(kind=kind, tasks=tasks, **data)
        except ValidationError as exc:
            raise ValueError(f"suite {spec!r} is invalid:\n{format_validation_error(exc)}") from exc

    @property
    def label(self) -> str:
        """``passkey`` or ``longbench:qasper,hotpotqa``: the suite column of every row."""
        return self.tasks[0] if self.kind == "probe" else "longbench:" + ",".join(self.tasks)

    def identity(self) -> dict[str, Any]:
        """What defines an example's content; a run folder holds rows of one identity only."""
        if self.kind == "probe":
            keys = ("kind", "tasks", "lengths", "depths", "seed", "haystack_dir")
        else:
            keys = ("kind", "tasks", "data_dir", "longbench_e", "max_prompt_tokens")
        data = self.model_dump(mode="json")
        return {k: data[k] for k in keys}

    def check_inputs(self) -> None:
        """Refuse missing folders/files before the model is loaded."""
        if self.haystack_dir is not None and not Path(self.haystack_dir).is_dir():
            raise FileNotFoundError(f"--haystack-dir {self.haystack_dir} is not a folder")
        if self.kind == "longbench" and self.data_dir is not None:
            folder = Path(self.data_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"LongBench data folder not found: {folder}")
            suffix = "_e" if self.longbench_e else ""
            missing = [t for t in self.tasks if not (folder / f"{t}{suffix}.jsonl").is_file()]
            if missing:
                raise FileNotFoundError(
                    f"LongBench data folder {folder} lacks " + ", ".join(f"{t}{suffix}.jsonl" for t in missing)
                )


@dataclass(frozen=True)
class BenchExample:
    """One prompt of the suite, ready for every config.

    Attributes:
        example_id: stable id within the suite (probes: ``passkey-L500-d0.5-i0``; LongBench:
            ``qasper-12``, the row number in the task's data).
        task: probe or LongBench task name.
        prompt: complete model input.
        question_span: character range ``[start, end)`` given to the scorer, or ``None``.
        max_new_tokens: tokens to generate.
        prompt_tokens: length of the prompt in tokens.
        source: the :class:`ProbeExample` or :class:`PreparedExample` it came from.
        stop: strings that end generation (LongBench's few-shot tasks: a newline).
    """

    example_id: str
    task: str
    prompt: str
    question_span: tuple[int, int] | None
    max_new_tokens: int
    prompt_tokens: int
    source: ProbeExample | PreparedExample
    stop: tuple[str, ...] = ()

    @classmethod
    def from_probe(cls, probe: ProbeExample, *, max_new_tokens: int, use_question_span: bool = True) -> "BenchExample":
        """One probe prompt as the benchmark and the tuner run it."""
        return cls(
            example_id=f"{probe.probe}-L{probe.length}-d{probe.depth:g}-i{probe.index}",
            task=probe.probe,
            prompt=probe.prompt,
            question_span=probe.question_span if use_question_span else None,
            max_new_tokens=max_new_tokens,
            prompt_tokens=probe.prompt_tokens,
            source=probe,
        )

    @classmethod
    def from_longbench(cls, prepared: PreparedExample, *, use_question_span: bool = True) -> "BenchExample":
        """One prepared LongBench row (prompt built and cut) as the benchmark and the tuner run it."""
        return cls(
            example_id=f"{prepared.task}-{prepared.example.index}",
            task=prepared.task,
            prompt=prepared.prompt.text,
            question_span=prepared.prompt.question_span if use_question_span else None,
            max_new_tokens=prepared.max_new_tokens,
            prompt_tokens=prepared.prompt.prompt_tokens,
            source=prepared,
            stop=prepared.stop,
        )


def parse_number_list(text: str, kind: Callable[[str], Any], what: str) -> list[Any]:
    """``"500,1000"`` -> ``[500, 1000]``; names the bad item otherwise."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: expected a comma-separated list, got {text!r}")
    out = []
    for item in items:
        try:
            out.append(kind(item))
        except ValueError as exc:
            raise ValueError(f"{what}: {item!r} is not a {kind.__name__}") from exc
    return out
