"""LongBench v1: task lists, official prompts, data loading and prompt building.

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

import contextlib
import difflib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from kvcore.text import count_prompt_tokens, truncate_middle_text
from kvcomp_eval.metrics.tasks import TASK_METRIC_NAMES

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

STOP_STRINGS: dict[str, tuple[str, ...]] = {task: ("\n",) for task in ("trec", "triviaqa", "samsum", "lsht")}
"""Strings that end generation, per task: the few-shot tasks stop at the first newline, as in
lm-eval's LongBench tasks (``until: ["\\n"]``); past it the model writes the next example's fields."""


def _load_package_json(name: str) -> dict[str, Any]:
    with resources.files("kvcomp_eval.data").joinpath(name).open("r", encoding="utf-8") as fh:
        return json.load(fh)


DATASET2PROMPT: dict[str, str] = _load_package_json("dataset2prompt.json")
"""Official prompt template per task, with ``{context}`` and ``{input}`` fields."""

DATASET2MAXLEN: dict[str, int] = _load_package_json("dataset2maxlen.json")
"""Official maximum number of generated tokens per task."""

_missing = set(LONGBENCH_TASKS) - set(DATASET2PROMPT) | set(LONGBENCH_TASKS) - set(DATASET2MAXLEN)
if _missing:  # pragma: no cover - guards the shipped data files
    raise RuntimeError(f"LongBench package data lacks tasks: {sorted(_missing)}")


def unknown_tasks_message(unknown: Sequence[str], known: Sequence[str] = LONGBENCH_TASKS) -> str:
    """``unknown LongBench task 'x'`` (or ``tasks [...]``), the nearest known name for each misspelt
    one, then the known ones."""
    close = {task: difflib.get_close_matches(task, known, n=1) for task in unknown}
    if len(unknown) == 1:
        what, guesses = f"task {unknown[0]!r}", [repr(m[0]) for m in close.values() if m]
    else:
        what, guesses = f"tasks {list(unknown)}", [f"{t!r} -> {m[0]!r}" for t, m in close.items() if m]
    hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
    return f"unknown LongBench {what}{hint}; known: {', '.join(known)}"


def _check_task(task: str) -> None:
    if task not in DATASET2PROMPT:
        raise ValueError(unknown_tasks_message([task]))


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
        # Without a route to the hub, `datasets` retries for ~30 s before failing; asked once
        # (5 s at most) and found unreachable, it is told it is offline: it then reads its cache
        # at once, or fails at once.
        reachable = _hub_reachable()
        try:
            with _datasets_offline(not reachable):
                data = load_dataset(HUB_DATASET, name, split="test")
        except Exception as exc:  # the hub's failures come in many types; add what to do instead
            why = f"{type(exc).__name__}: {exc}" if reachable else "the hub cannot be reached and the datasets cache lacks it"
            raise RuntimeError(
                f"could not load {HUB_DATASET}/{name} from the hub ({why}); "
                f"download LongBench's data files and pass --data-dir <folder with {name}.jsonl> (data_dir= in Python)"
            ) from exc
        return [
            _example_from_row(task, i, row, f"{HUB_DATASET}/{name}, row {i}") for i, row in enumerate(data)
        ]


def _hub_reachable() -> bool:
    """Whether the hub answers for LongBench within 5 s (``False`` in offline mode)."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import is_offline_mode

    if is_offline_mode():
        return False
    try:
        HfApi().dataset_info(HUB_DATASET, timeout=5)
    except Exception:  # no route, DNS failure, timeout, refusal: `datasets` would only retry
        return False
    return True


@contextlib.contextmanager
def _datasets_offline(offline: bool) -> Iterator[None]:
    """``datasets`` in offline mode (cache only) inside the block when ``offline``; it reads its
    ``config.HF_HUB_OFFLINE`` at each call, so setting it for the block is enough."""
    import datasets.config

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


@dataclass(frozen=True)
class LongBenchPrompt:
    """A ready prompt.

    Attributes:
        text: complete model input (chat template applied where the task uses it).
        question_span: character offsets ``[start, end)`` of the question in ``text``, or ``None``.
        prompt_tokens: length of ``text`` in tokens (:func:`~kvcore.text.encode_prompt`).
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
    while True:
        text, cut = truncate_middle_text(tokenizer, filled, budget, ids=ids)
        truncated = truncated or cut
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
    stop: tuple[str, ...] = ()
    """Strings that end generation (:data:`STOP_STRINGS`)."""
