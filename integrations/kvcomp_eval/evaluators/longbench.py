"""``LongBenchEvaluator``: LongBench tasks through any text generator, scored with the official metrics."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvcomp_eval.data.longbench import (
    DATASET2MAXLEN,
    LONGBENCH_E_TASKS,
    LongBenchDataLoader,
    LongBenchExample,
    STOP_STRINGS,
    PreparedExample,
    _check_task,
    prepare_prompt,
)
from kvcomp_eval.evaluators.base import TextGenerator, generate_rows, require_text_generator
from kvcomp_eval.metrics.summary import generation_metrics
from kvcomp_eval.metrics.tasks import score_prediction
from kvcore.types import GenerationResult


class LongBenchEvalConfig(BaseModel):
    """What a LongBench evaluation runs."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    tasks: tuple[str, ...] = Field(default=LONGBENCH_E_TASKS, min_length=1)
    data_dir: Path | None = None
    """Folder of ``<task>.jsonl``; ``None`` reads the hub."""
    limit: int | None = Field(default=None, ge=1)
    """Examples per task (after ``offset``); ``None`` for all."""
    offset: int = Field(default=0, ge=0)
    """Examples skipped first per task."""
    use_question_span: bool = True
    """Pass the question's character span to the generator (else it uses the last W tokens)."""
    longbench_e: bool = False
    """Read the LongBench-E split (``<task>_e``) of each task."""
    max_new_tokens: int | None = Field(default=None, ge=1)
    """Cap on generated tokens below the official per-task number; ``None`` keeps the official one."""
    progress: bool = True
    """Show a progress bar."""

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        for task in tasks:
            _check_task(task)
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks contain duplicates: {list(tasks)}")
        return tasks


class LongBenchEvaluator:
    """Runs LongBench tasks through a :class:`~kvcomp_eval.evaluators.base.TextGenerator`.

    Parameters
    ----------
    generator:
        The model under test.
    tasks:
        Task names (a single name is accepted too); default the 13 LongBench-E tasks.
    data_dir, limit, offset, use_question_span, longbench_e, max_new_tokens, progress:
        See :class:`LongBenchEvalConfig`.

    Rows (one per example, JSON-ready) hold ``task``, ``_id``, ``index``, ``score``,
    ``prediction``, ``answers``, ``prompt_tokens``, ``truncated``, ``question_span``,
    ``length`` and the generation's cost fields
    (:func:`~kvcomp_eval.metrics.summary.generation_metrics`).
    """

    def __init__(
        self,
        generator: TextGenerator,
        tasks: Sequence[str] | str = LONGBENCH_E_TASKS,
        data_dir: str | os.PathLike[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        use_question_span: bool = True,
        longbench_e: bool = False,
        max_new_tokens: int | None = None,
        progress: bool = True,
    ) -> None:
        require_text_generator(generator)
        max_prompt = generator.max_prompt_tokens
        if isinstance(max_prompt, bool) or not isinstance(max_prompt, int) or max_prompt < 1:
            raise ValueError(f"generator.max_prompt_tokens must be a positive int, got {max_prompt!r}")
        self.config = LongBenchEvalConfig(
            tasks=(tasks,) if isinstance(tasks, str) else tuple(tasks),
            data_dir=Path(data_dir) if data_dir is not None else None,
            limit=limit,
            offset=offset,
            use_question_span=use_question_span,
            longbench_e=longbench_e,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        self.generator = generator
        self.loader = LongBenchDataLoader(
            self.config.data_dir, limit=limit, offset=offset, longbench_e=self.config.longbench_e
        )
        for task in self.config.tasks:  # LongBench-E has no split for some tasks: refuse now
            self.loader.source_name(task)
        self.rows: list[dict[str, Any]] = []

    def load(self) -> dict[str, list[LongBenchExample]]:
        """Read and validate every task before any generation starts."""
        return {task: self.loader.load(task) for task in self.config.tasks}

    def iter_prepared(self, data: Mapping[str, Sequence[LongBenchExample]] | None = None) -> Iterator[PreparedExample]:
        """Every example with its built prompt, task by task (all data validated up front)."""
        if data is None:
            data = self.load()
        tokenizer = self.generator.tokenizer
        for task, examples in data.items():
            max_new = DATASET2MAXLEN[task]
            if self.config.max_new_tokens is not None:
                max_new = min(max_new, self.config.max_new_tokens)
            for example in examples:
                prompt = prepare_prompt(example, task, tokenizer, self.generator.max_prompt_tokens)
                yield PreparedExample(
                    task=task, example=example, prompt=prompt, max_new_tokens=max_new, stop=STOP_STRINGS.get(task, ())
                )

    def run_prepared(self, prepared: PreparedExample, generator: TextGenerator | None = None) -> GenerationResult:
        """Generate for one prepared example (with this evaluator's generator unless one is given)."""
        gen = generator if generator is not None else self.generator
        span = prepared.prompt.question_span if self.config.use_question_span else None
        return gen.generate(
            prepared.prompt.text, question_span=span, max_new_tokens=prepared.max_new_tokens, stop=prepared.stop
        )

    def score_row(self, prepared: PreparedExample, result: GenerationResult) -> dict[str, Any]:
        """The result row of one example."""
        ex = prepared.example
        span = prepared.prompt.question_span if self.config.use_question_span else None
        return {
            "task": prepared.task,
            "_id": ex.id,
            "index": ex.index,
            "score": score_prediction(prepared.task, result.text, ex.answers, ex.all_classes),
            "prediction": result.text,
            "answers": list(ex.answers),
            "prompt_tokens": result.prompt_tokens,
            "truncated": prepared.prompt.truncated,
            "question_span": list(span) if span is not None else None,
            "length": ex.length,
            **generation_metrics(result),
        }

    def iter_examples(self) -> Iterator[dict[str, Any]]:
        """Generate and score example after example, yielding each row as soon as it is done."""
        data = self.load()
        yield from generate_rows(
            self.iter_prepared(data), sum(len(v) for v in data.values()), self.run_prepared, self.score_row,
            desc="LongBench", label=lambda p: p.task, progress=self.config.progress,
        )

    def evaluate(self) -> dict[str, float]:
        """Run everything; return the mean score per task (0..1). Rows are kept in :attr:`rows`."""
        self.rows = list(self.iter_examples())
        return summarize_scores(self.rows)


def summarize_scores(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean ``score`` per ``task`` of result rows, tasks in first-seen order."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        sums.setdefault(row["task"], []).append(float(row["score"]))
    return {task: sum(v) / len(v) for task, v in sums.items()}


LENGTH_BUCKETS: tuple[tuple[str, int | None], ...] = (("0-4k", 4000), ("4-8k", 8000), ("8k+", None))
"""LongBench-E's length groups: upper bound (exclusive) of the example's ``length`` in words."""


def summarize_scores_by_length(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean ``score`` per task and LongBench-E length group (rows without ``length`` are skipped)."""
    groups: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        length = row.get("length")
        if length is None:
            continue
        bucket = next(name for name, upper in LENGTH_BUCKETS if upper is None or length < upper)
        groups.setdefault(row["task"], {}).setdefault(bucket, []).append(float(row["score"]))
    return {
        task: {name: sum(b[name]) / len(b[name]) for name, _ in LENGTH_BUCKETS if name in b}
        for task, b in groups.items()
    }
