"""LongBench v1: task lists, official prompts, data loading, prompt building and the evaluator.

The prompt templates and per-task generation lengths are the official ones (package data
``data/dataset2prompt.json`` and ``data/dataset2maxlen.json``, MIT, THUDM/LongBench). The
prompt rules follow LongBench's reference prediction script:

- the template is filled with the example's ``context`` and ``input``;
- a prompt longer than the model's cap is cut in the *middle*, in tokens: the first half and
  the last half of the token budget are kept, so the instruction at the start and the
  question at the end both survive;
- the tokenizer's chat template is applied except for the few-shot and code tasks
  (:data:`NO_CHAT_TEMPLATE_TASKS`), and only when the tokenizer has one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedTokenizerBase

from kvcomp_eval.metrics import TASK_METRIC_NAMES, score_prediction
from kvcomp_eval.metrics_summary import generation_metrics
from kvcomp_eval.protocols import TextGenerator, generate_rows, require_text_generator
from kvcomp_eval.tokenization import DataCollator, count_prompt_tokens
from kvcore.types import GenerationResult

__all__ = [
    "LONGBENCH_TASKS",
    "LONGBENCH_E_TASKS",
    "NO_CHAT_TEMPLATE_TASKS",
    "DATASET2PROMPT",
    "DATASET2MAXLEN",
    "HUB_DATASET",
    "LongBenchExample",
    "LongBenchPrompt",
    "LongBenchDataLoader",
    "PreparedExample",
    "LongBenchEvalConfig",
    "LongBenchEvaluator",
    "DataCollator",
    "prepare_prompt",
    "build_prompt",
    "summarize_scores",
    "summarize_scores_by_length",
    "LENGTH_BUCKETS",
]

HUB_DATASET = "THUDM/LongBench"
"""Hugging Face hub id of the LongBench v1 data."""

LONGBENCH_TASKS: tuple[str, ...] = tuple(TASK_METRIC_NAMES)
"""All 21 LongBench v1 tasks."""

LONGBENCH_E_TASKS: tuple[str, ...] = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
"""The 13 English tasks of LongBench-E, the default evaluation set."""

NO_CHAT_TEMPLATE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
"""Tasks whose prompt is a raw continuation (few-shot examples or code), never chat-wrapped."""

_CODE_TASKS = frozenset({"lcc", "repobench-p"})


def _load_package_json(name: str) -> dict[str, Any]:
    with resources.files("kvcomp_eval").joinpath("data", name).open("r", encoding="utf-8") as fh:
        return json.load(fh)


DATASET2PROMPT: dict[str, str] = _load_package_json("dataset2prompt.json")
"""Official prompt template per task, with ``{context}`` and ``{input}`` fields."""

DATASET2MAXLEN: dict[str, int] = _load_package_json("dataset2maxlen.json")
"""Official maximum number of generated tokens per task."""

_missing = set(LONGBENCH_TASKS) - set(DATASET2PROMPT) | set(LONGBENCH_TASKS) - set(DATASET2MAXLEN)
if _missing:  # pragma: no cover - guards the shipped data files
    raise RuntimeError(f"LongBench package data lacks tasks: {sorted(_missing)}")


def _check_task(task: str) -> None:
    if task not in DATASET2PROMPT:
        raise ValueError(f"unknown LongBench task {task!r}; known tasks: {', '.join(LONGBENCH_TASKS)}")


@dataclass(frozen=True)
class LongBenchExample:
    """One LongBench row.

    Attributes:
        task: task name.
        index: row number in the task's data (0-based, counted from the first row, not from ``offset``).
        input: the question or instruction (may be empty, e.g. summarisation).
        context: the long document(s).
        answers: gold answers; scores take the best over them.
        all_classes: class names of the classification tasks, else ``None``.
        length: LongBench's length of the context in words, if given.
        id: LongBench's ``_id``, if given.
    """

    task: str
    index: int
    input: str
    context: str
    answers: tuple[str, ...]
    all_classes: tuple[str, ...] | None = None
    length: int | None = None
    id: str | None = None


def _example_from_row(task: str, index: int, row: Any, where: str) -> LongBenchExample:
    """Validate one raw row; ``where`` names the file and line for the error message."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("context", "input", "answers") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; a LongBench row needs context, input, answers")
    for key in ("context", "input"):
        if not isinstance(row[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    answers = row["answers"]
    if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers:
        raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r:.80}")
    if not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: every entry of 'answers' must be a string")
    classes = row.get("all_classes")
    if classes is not None and (
        isinstance(classes, str) or not isinstance(classes, Sequence) or not all(isinstance(c, str) for c in classes)
    ):
        raise ValueError(f"{where}: field 'all_classes' must be null or a list of strings")
    length = row.get("length")
    return LongBenchExample(
        task=task,
        index=index,
        input=row["input"],
        context=row["context"],
        answers=tuple(answers),
        all_classes=tuple(classes) if classes else None,
        length=int(length) if isinstance(length, (int, float)) and not isinstance(length, bool) else None,
        id=str(row["_id"]) if row.get("_id") is not None else None,
    )


class LongBenchDataLoader:
    """Reads LongBench tasks from a local folder of JSONL files or from the hub.

    Parameters
    ----------
    data_dir:
        Folder holding ``<task>.jsonl`` files in the LongBench schema (``input``, ``context``,
        ``answers``, optional ``all_classes``, ``length``, ``_id``). ``None`` reads
        ``THUDM/LongBench`` from the Hugging Face hub with :func:`datasets.load_dataset`.
    limit:
        Keep at most this many examples per task (after ``offset``); ``None`` keeps all.
    offset:
        Skip this many examples first, so tuning and the final report can use disjoint rows.
    longbench_e:
        Read the LongBench-E split of each task (``<task>_e.jsonl`` / hub config ``<task>_e``:
        the same tasks with lengths spread evenly over 0-4k, 4-8k and 8k+ words).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
        longbench_e: bool = False,
    ) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an int >= 0, got {offset!r}")
        if not isinstance(longbench_e, bool):
            raise ValueError(f"longbench_e must be a bool, got {longbench_e!r}")
        self.longbench_e = longbench_e
        self.data_dir = Path(data_dir) if data_dir is not None else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise FileNotFoundError(f"LongBench data folder not found: {self.data_dir}")
        self.limit = limit
        self.offset = offset

    def source_name(self, task: str) -> str:
        """File stem / hub config holding ``task``: ``task`` or ``task_e`` for LongBench-E."""
        _check_task(task)
        if self.longbench_e and task not in LONGBENCH_E_TASKS:
            raise ValueError(
                f"task {task!r} has no LongBench-E split; LongBench-E tasks: {', '.join(LONGBENCH_E_TASKS)}"
            )
        return f"{task}_e" if self.longbench_e else task

    def path_for(self, task: str) -> Path:
        """The JSONL file a task is read from (local folder only)."""
        name = self.source_name(task)
        if self.data_dir is None:
            raise ValueError("no data_dir: this loader reads from the hub")
        return self.data_dir / f"{name}.jsonl"

    def load(self, task: str) -> list[LongBenchExample]:
        """Every kept example of ``task``, in file order, validated."""
        self.source_name(task)
        rows = self._read_local(task) if self.data_dir is not None else self._read_hub(task)
        stop = None if self.limit is None else self.offset + self.limit
        return rows[self.offset : stop]

    def _read_local(self, task: str) -> list[LongBenchExample]:
        path = self.path_for(task)
        if not path.is_file():
            raise FileNotFoundError(f"LongBench file for task {task!r} not found: {path}")
        examples: list[LongBenchExample] = []
        with path.open("r", encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {line_no}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
                examples.append(_example_from_row(task, len(examples), row, where))
        if not examples:
            raise ValueError(f"{path}: no examples in the file")
        return examples

    def _read_hub(self, task: str) -> list[LongBenchExample]:
        from datasets import load_dataset

        name = self.source_name(task)
        try:
            data = load_dataset(HUB_DATASET, name, split="test")
        except Exception as exc:  # the hub's failures come in many types; add what to do instead
            raise RuntimeError(
                f"could not load {HUB_DATASET}/{name} from the hub ({type(exc).__name__}: {exc}); "
                f"download LongBench's data files and pass data_dir=<folder with {name}.jsonl>"
            ) from exc
        return [
            _example_from_row(task, i, row, f"{HUB_DATASET}/{name}, row {i}") for i, row in enumerate(data)
        ]


@dataclass(frozen=True)
class LongBenchPrompt:
    """A ready prompt.

    Attributes:
        text: complete model input (chat template applied where the task uses it).
        question_span: character offsets ``[start, end)`` of the question in ``text``, or ``None``.
        prompt_tokens: length of ``text`` in tokens (:func:`~kvcomp_eval.tokenization.encode_prompt`).
        truncated: whether the middle of the prompt was cut to fit.
    """

    text: str
    question_span: tuple[int, int] | None
    prompt_tokens: int
    truncated: bool


def _wrap(text: str, task: str, tokenizer: PreTrainedTokenizerBase) -> str:
    if task in NO_CHAT_TEMPLATE_TASKS or not getattr(tokenizer, "chat_template", None):
        return text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return str(rendered)


def _question_text(example: LongBenchExample, task: str) -> str | None:
    """What the question span should cover: the ``input``, else the instruction after the context."""
    if example.input.strip():
        return example.input
    if task in _CODE_TASKS:
        # "Next line of code:" says nothing about the code; the last-W window (the end of the
        # code) is the better guide.
        return None
    tail = DATASET2PROMPT[task].split("{context}")[-1].strip()
    return tail or None


def prepare_prompt(
    example: LongBenchExample,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
) -> LongBenchPrompt:
    """Fill the official template, cut the middle to fit, apply the chat template, find the question.

    Args:
        example: the LongBench row.
        task: task name (template, chat rule).
        tokenizer: the model's tokenizer; lengths are measured in its tokens.
        max_prompt_tokens: the final prompt (chat template included) has at most this many tokens.

    Returns:
        The prompt; ``question_span`` is the span of ``example.input`` in the final text, or of
        the instruction after the context when ``input`` is empty (``None`` for code completion
        and whenever the text is not found, e.g. cut by truncation).
    """
    _check_task(task)
    if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be a positive int, got {max_prompt_tokens!r}")
    filled = DATASET2PROMPT[task].format(context=example.context, input=example.input)
    ids = list(tokenizer(filled, add_special_tokens=False)["input_ids"])
    # Tokens the chat template and special tokens add around the content.
    overhead = count_prompt_tokens(tokenizer, _wrap("", task, tokenizer))
    budget = max_prompt_tokens - overhead
    if budget < 2:
        raise ValueError(
            f"max_prompt_tokens={max_prompt_tokens} leaves no room for content after {overhead} template tokens"
        )
    truncated = False
    text = filled
    while True:
        if len(ids) > budget:
            truncated = True
            head = budget // 2
            text = tokenizer.decode(ids[:head], skip_special_tokens=True) + tokenizer.decode(
                ids[len(ids) - (budget - head) :], skip_special_tokens=True
            )
        final = _wrap(text, task, tokenizer)
        n_tokens = count_prompt_tokens(tokenizer, final)
        if n_tokens <= max_prompt_tokens:
            break
        # Re-encoding joined text can merge or split tokens at the seams; shrink and retry.
        budget -= n_tokens - max_prompt_tokens
        if budget < 2:
            raise ValueError(
                f"could not fit task {task!r} example {example.index} into {max_prompt_tokens} tokens"
            )
    question = _question_text(example, task)
    span: tuple[int, int] | None = None
    if question is not None:
        start = final.rfind(question)
        if start >= 0:
            span = (start, start + len(question))
    return LongBenchPrompt(text=final, question_span=span, prompt_tokens=n_tokens, truncated=truncated)


def build_prompt(
    example: LongBenchExample,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
) -> tuple[str, tuple[int, int] | None]:
    """``(prompt_text, question_span)`` for one example; see :func:`prepare_prompt`."""
    prompt = prepare_prompt(example, task, tokenizer, max_prompt_tokens)
    return prompt.text, prompt.question_span


@dataclass(frozen=True)
class PreparedExample:
    """An example with its prompt, ready for any generator (compressed or reference)."""

    task: str
    example: LongBenchExample
    prompt: LongBenchPrompt
    max_new_tokens: int


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
    """Runs LongBench tasks through a :class:`~kvcomp_eval.protocols.TextGenerator`.

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
    (:func:`~kvcomp_eval.metrics_summary.generation_metrics`).
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
                yield PreparedExample(task=task, example=example, prompt=prompt, max_new_tokens=max_new)

    def run_prepared(self, prepared: PreparedExample, generator: TextGenerator | None = None) -> GenerationResult:
        """Generate for one prepared example (with this evaluator's generator unless one is given)."""
        gen = generator if generator is not None else self.generator
        span = prepared.prompt.question_span if self.config.use_question_span else None
        return gen.generate(prepared.prompt.text, question_span=span, max_new_tokens=prepared.max_new_tokens)

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
