"""LongBench v1 answer metrics, written from their published definitions.

Every metric takes one prediction and one gold answer and returns a score in ``[0, 1]``
(LongBench reports them x100). :func:`score_prediction` applies LongBench's per-task
post-processing and takes the best score over all gold answers.

- ``qa_f1``: token F1 after SQuAD-style normalisation (lowercase, no punctuation, no articles).
- ``rouge_l``: ROUGE-L F1, longest common subsequence of lowercase alphanumeric tokens.
- ``classification``: the class names found in the prediction, minus those that are only part
  of the gold name; 1/(number found) if the gold class is among them, else 0.
- ``retrieval``: share of the numbers in the prediction that equal the gold paragraph number.
- ``count``: share of the numbers in the prediction that equal the gold count.
- ``code_sim``: edit similarity (fuzzywuzzy ``ratio``) between the first line of the prediction
  that is not a comment or code fence and the gold line.
- ``exact_match``: normalised prediction equals normalised answer.
- ``qa_f1_zh`` / ``rouge_l_zh``: as above on words cut by ``jieba`` (Chinese tasks).
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
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
    "rouge_l_from_tokens",
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


def _token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Token F1 between the normalised prediction and answer."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _jieba_words(text: str) -> list[str]:
    try:
        import jieba
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Chinese LongBench metrics need the 'jieba' package (pip install 'kvcomp[eval]')"
        ) from exc
    jieba.setLogLevel(60)  # jieba prints its dictionary loading to stderr otherwise
    words = (normalize_zh_answer(w) for w in jieba.cut(text, cut_all=False))
    return [w for w in words if w]


def qa_f1_zh_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Token F1 over jieba words after Chinese normalisation."""
    return _token_f1(_jieba_words(prediction), _jieba_words(ground_truth))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One DP row over the shorter sequence: O(len(a) * len(b)) time, O(min) memory.
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_from_tokens(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """ROUGE-L F1 = 2PR/(P+R) with P = LCS/len(pred), R = LCS/len(gold); 0 if either is empty."""
    if not pred_tokens or not gold_tokens:
        return 0.0
    lcs = _lcs_length(pred_tokens, gold_tokens)
    if lcs == 0:
        return 0.0
    precision = lcs / len(pred_tokens)
    recall = lcs / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


_WORD = re.compile(r"[a-z0-9]+")


def _rouge_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_l_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """ROUGE-L F1 over lowercase alphanumeric tokens."""
    return rouge_l_from_tokens(_rouge_tokens(prediction), _rouge_tokens(ground_truth))


def rouge_l_zh_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """ROUGE-L F1 over jieba words."""
    return rouge_l_from_tokens(_jieba_words(prediction), _jieba_words(ground_truth))


def classification_score(
    prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None
) -> float:
    """LongBench's class match: 1/k if the gold class is one of the k classes the prediction names.

    Class names that appear in the prediction only because they are part of the gold name (for
    example ``"city"`` inside ``"Other city"``) are not counted against it.
    """
    if not all_classes:
        raise ValueError("classification_score needs the task's all_classes, got none")
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if not (c in ground_truth and c != ground_truth)]
    if ground_truth not in found:
        return 0.0
    return 1.0 / len(found)


def _number_share(prediction: str, gold: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == gold for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Share of the numbers in the prediction equal to N of the gold ``"Paragraph N"``."""
    match = re.search(r"Paragraph (\d+)", ground_truth)
    if match is None:
        raise ValueError(f"retrieval gold answer must look like 'Paragraph N', got {ground_truth!r}")
    return _number_share(prediction, match.group(1))


def retrieval_zh_score(
    prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None
) -> float:
    """Share of the numbers in the prediction equal to N of the gold ``"段落N"``."""
    match = re.search(r"段落(\d+)", ground_truth)
    if match is None:
        raise ValueError(f"retrieval gold answer must look like '段落N', got {ground_truth!r}")
    return _number_share(prediction, match.group(1))


def count_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Share of the numbers in the prediction equal to the gold count."""
    return _number_share(prediction, str(ground_truth).strip())


def _edit_ratio(a: str, b: str) -> int:
    # fuzzywuzzy is what LongBench scores code with; difflib gives the same ratio when
    # fuzzywuzzy (or its optional C speed-up) is absent.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "using slow pure-python SequenceMatcher"
            from fuzzywuzzy import fuzz
        return int(fuzz.ratio(a, b))
    except ImportError:  # pragma: no cover - depends on the environment
        from difflib import SequenceMatcher

        return int(round(100 * SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None) -> float:
    """Edit similarity of the first non-comment line of the prediction to the gold line."""
    first = ""
    for line in prediction.lstrip("\n").split("\n"):
        # Code fences and comments are chatter, not the completed line.
        if "`" not in line and "#" not in line and "//" not in line:
            first = line
            break
    return _edit_ratio(first, ground_truth) / 100


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
    return max(fn(prediction, gold, all_classes=all_classes) for gold in answers)
