"""LongBench v1 answer metrics: lm-eval's implementation, the one source of truth.

Every metric takes one prediction and one gold answer and returns a score in ``[0, 1]``
(LongBench reports them x100). :func:`score_prediction` applies LongBench's per-task
post-processing and takes the best score over all gold answers.

Why lm-eval's and not our own: ``kvcomp-llama`` runs LongBench through lm-eval
(``lm_eval --tasks longbench*``), and ``kvcomp eval`` must give the same number for the same
prediction. lm-eval 0.4.13's ``lm_eval.tasks.longbench.metrics`` is LongBench's own
``metrics.py``, and its ROUGE-L comes from the ``rouge`` package: sentences split at ".",
summary-level union LCS, case kept, punctuation left on the words, and an F-measure with
beta = P/R rather than plain F1. An independent copy would have to follow each of those
details, and it would drift whenever lm-eval fixes one. So these functions call lm-eval's,
and the eval extra (``pip install 'kvcomp[eval]'``) pins lm-eval to the version tested
(``tests/integrations/test_metrics.py`` checks :func:`score_prediction` equals lm-eval's
``process_results`` on every row of the shared LongBench data). lm-eval is imported on the
first score, so importing :mod:`kvcomp_eval` without the eval extra still works.

- ``qa_f1``: token F1 after SQuAD-style normalisation (lowercase, no punctuation, no articles).
- ``rouge_l``: ROUGE-L F of the ``rouge`` package (see above).
- ``classification``: the class names found in the prediction, minus those that are only part
  of the gold name; 1/(number found) if the gold class is among them, else 0.
- ``retrieval``: share of the numbers in the prediction that equal the gold paragraph number.
- ``count``: share of the numbers in the prediction that equal the gold count.
- ``code_sim``: edit similarity (fuzzywuzzy ``ratio``) between the first non-blank line of the
  prediction that is not a comment or code fence and the gold line.
- ``qa_f1_zh`` / ``rouge_l_zh``: as above on words cut by ``jieba`` (Chinese tasks).
- ``exact_match`` (not a LongBench metric, no lm-eval counterpart): normalised prediction
  equals normalised answer.
"""

from __future__ import annotations

import functools
import importlib
import re
import string
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Protocol

__all__ = [
    "Metric",
    "METRICS",
    "TASK_METRIC_NAMES",
    "TASK_METRICS",
    "FIRST_LINE_TASKS",
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_score",
    "rouge_l_score",
    "rouge_l_zh_score",
    "lm_eval_metrics",
    "classification_score",
    "retrieval_score",
    "retrieval_zh_score",
    "count_score",
    "code_sim_score",
    "exact_match_score",
    "score_prediction",
]


class Metric(Protocol):
    """``metric(prediction, ground_truth, all_classes=...) -> score in [0, 1]``."""

    def __call__(
        self, prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None
    ) -> float: ...


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
# Full-width and CJK punctuation removed by the Chinese normalisation, on top of ASCII.
_ZH_PUNCTUATION = frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
) | _PUNCTUATION


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, remove all whitespace."""
    text = text.lower()
    return "".join(ch for ch in text if ch not in _ZH_PUNCTUATION and not ch.isspace())


@functools.cache
def lm_eval_metrics() -> ModuleType:
    """lm-eval's ``lm_eval.tasks.longbench.metrics`` (imported once, on first use)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fuzzywuzzy: "using slow pure-python SequenceMatcher"
            return importlib.import_module("lm_eval.tasks.longbench.metrics")
    except ImportError as exc:
        raise ImportError(
            "LongBench metrics come from lm-eval's longbench task: pip install 'kvcomp[eval]' "
            f"(lm_eval[longbench]==0.4.13): {exc}"
        ) from exc


def qa_f1_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Token F1 between the normalised prediction and answer."""
    return float(lm_eval_metrics().qa_f1_score(prediction, ground_truth))


def qa_f1_zh_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Token F1 over jieba words after Chinese normalisation."""
    return float(lm_eval_metrics().qa_f1_zh_score(prediction, ground_truth))


def rouge_l_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """ROUGE-L F of the ``rouge`` package, as LongBench scores summaries (0 for an empty text)."""
    return float(lm_eval_metrics().rouge_score(prediction, ground_truth))


def rouge_l_zh_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """ROUGE-L F over jieba words."""
    return float(lm_eval_metrics().rouge_zh_score(prediction, ground_truth))


def classification_score(
    prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None
) -> float:
    """LongBench's class match: 1/k if the gold class is one of the k classes the prediction names.

    Class names that appear in the prediction only because they are part of the gold name (for
    example ``"city"`` inside ``"Other city"``) are not counted against it.
    """
    if not all_classes:
        raise ValueError("classification_score needs the task's all_classes, got none")
    return float(lm_eval_metrics().classification_score(prediction, ground_truth, all_classes=list(all_classes)))


def retrieval_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Share of the numbers in the prediction equal to N of the gold ``"Paragraph N"``."""
    if re.search(r"Paragraph (\d+)", ground_truth) is None:  # lm-eval would fail with an IndexError
        raise ValueError(f"retrieval gold answer must look like 'Paragraph N', got {ground_truth!r}")
    return float(lm_eval_metrics().retrieval_score(prediction, ground_truth))


def retrieval_zh_score(
    prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None
) -> float:
    """Share of the numbers in the prediction equal to N of the gold ``"段落N"``."""
    if re.search(r"段落(\d+)", ground_truth) is None:
        raise ValueError(f"retrieval gold answer must look like '段落N', got {ground_truth!r}")
    return float(lm_eval_metrics().retrieval_zh_score(prediction, ground_truth))


def count_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Share of the numbers in the prediction equal to the gold count."""
    return float(lm_eval_metrics().count_score(prediction, str(ground_truth).strip()))


def code_sim_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Edit similarity of the first non-blank, non-comment line of the prediction to the gold line."""
    return float(lm_eval_metrics().code_sim_score(prediction, ground_truth))


def exact_match_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """1.0 if the normalised prediction equals the normalised answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


METRICS: dict[str, Metric] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge_l": rouge_l_score,
    "rouge_l_zh": rouge_l_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
    "exact_match": exact_match_score,
}
"""Metric name -> function."""

TASK_METRIC_NAMES: dict[str, str] = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_l_zh",
    "gov_report": "rouge_l",
    "qmsum": "rouge_l",
    "multi_news": "rouge_l",
    "vcsum": "rouge_l_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge_l",
    "lsht": "classification",
    "passage_count": "count",
    "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}
"""LongBench v1 task -> name of its official metric."""

TASK_METRICS: dict[str, Metric] = {task: METRICS[name] for task, name in TASK_METRIC_NAMES.items()}
"""LongBench v1 task -> metric function."""

FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
"""Few-shot tasks whose prediction is cut to its first line before scoring (the model tends to
continue with the next made-up example)."""


def score_prediction(
    task: str,
    prediction: str,
    answers: Sequence[str],
    all_classes: Sequence[str] | None = None,
    *,
    metric: str | Callable[..., float] | None = None,
) -> float:
    """Score one prediction the way LongBench does: post-process, then best over gold answers.

    Equals lm-eval's ``process_results`` of the task on the same text (the first-line cut of
    the few-shot tasks is what lm-eval's ``until: ["\\n"]`` does while generating).

    Args:
        task: LongBench task name (selects the metric and the post-processing).
        prediction: the generated text.
        answers: the gold answers; the maximum score over them is returned.
        all_classes: class names, needed by the classification tasks.
        metric: override the task's metric (a name from :data:`METRICS` or a function).
    """
    if task not in TASK_METRIC_NAMES:
        raise ValueError(f"unknown LongBench task {task!r}; known: {', '.join(TASK_METRIC_NAMES)}")
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r:.80}")
    if metric is None:
        fn: Callable[..., float] = TASK_METRICS[task]
    elif isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        fn = METRICS[metric]
    else:
        fn = metric
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    # lm-eval's process_results strip the prediction, except for code: there a leading
    # indent is part of the line compared.
    if TASK_METRIC_NAMES[task] != "code_sim":
        prediction = prediction.strip()
    return max(fn(prediction, gold, all_classes=all_classes) for gold in answers)
