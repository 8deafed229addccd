"""LongBench metrics against hand-computed values and lm-eval's on the shared data; CompressionMetrics; monitors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcomp_eval.metrics.tasks import (
    METRICS,
    FIRST_LINE_TASKS,
    TASK_METRIC_NAMES,
    TASK_METRICS,
    classification_score,
    code_sim_score,
    count_score,
    exact_match_score,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_l_score,
    score_prediction,
)
from kvcomp_eval.metrics.fidelity import output_rouge_l
from kvcomp_eval.metrics.summary import CompressionMetrics, generation_metrics
from kvcomp_eval.metrics.monitor import MemoryMonitor, PerformanceTimer
from kvcore.types import GenerationResult

ENGLISH_TASKS = [
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report",
    "qmsum", "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en",
    "lcc", "repobench-p",
]


def test_normalize_answer_drops_case_punctuation_articles_and_extra_spaces() -> None:
    assert normalize_answer("The  Quick, brown fox!  an apple") == "quick brown fox apple"
    assert normalize_answer("A theme, an  anthem.") == "theme anthem"  # only whole-word articles


def test_qa_f1_hand_computed() -> None:
    # pred -> "eiffel tower in paris" (4 tokens), gold -> "eiffel tower" (2): P=1/2, R=1, F1=2/3.
    assert qa_f1_score("The Eiffel Tower, in Paris!", "Eiffel tower") == pytest.approx(2 / 3)
    # "a cat sat" -> "cat sat"; "the cat" -> "cat": P=1/2, R=1.
    assert qa_f1_score("a cat sat", "the cat") == pytest.approx(2 / 3)
    # Repeated tokens count once per occurrence: "yes yes no" vs "yes": P=1/3, R=1, F1=1/2.
    assert qa_f1_score("yes yes no", "yes") == pytest.approx(0.5)
    assert qa_f1_score("Paris", "London") == 0.0
    assert qa_f1_score("", "London") == 0.0
    assert qa_f1_score("The answer.", "answer") == 1.0


def test_rouge_l_hand_computed() -> None:
    # LongBench's ROUGE-L (the ``rouge`` package): LCS "the gunman" = 2 of 4 words each -> 0.5.
    assert rouge_l_score("police killed the gunman", "the gunman kill police") == pytest.approx(0.5)
    # P = 3/3, R = 3/6 -> F1 = 2/3.
    assert rouge_l_score("a b c", "a x b y c z") == pytest.approx(2 / 3)
    # Case and punctuation stay on the words: only "world" matches, 1 of 2 each.
    assert rouge_l_score("Hello World", "hello World") == pytest.approx(0.5)
    assert rouge_l_score("Hello, World!", "hello world") == 0.0
    assert rouge_l_score("", "hello") == 0.0  # the package refuses an empty text; LongBench scores 0
    assert rouge_l_score("foo", "bar") == 0.0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from(["the", "cat", "sat", "mat", "on", "dog", "7"]), max_size=25),
    st.lists(st.sampled_from(["the", "cat", "sat", "mat", "on", "dog", "7"]), max_size=25),
)
def test_output_rouge_l_matches_rouge_score_package_and_is_symmetric(a: list[str], b: list[str]) -> None:
    # The fidelity ROUGE-L (two generations compared) is plain LCS F1, as Google's rouge_score.
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    pred, gold = " ".join(a), " ".join(b)
    ours = output_rouge_l(gold, pred)
    assert 0.0 <= ours <= 1.0
    assert ours == pytest.approx(output_rouge_l(pred, gold))
    reference = rouge_scorer.RougeScorer(["rougeL"]).score(gold, pred)["rougeL"].fmeasure
    assert ours == pytest.approx(reference)


def test_classification_hand_computed() -> None:
    classes = ["city", "Other city", "country"]
    # "city" is found only as part of the gold "Other city": it does not count against it.
    assert classification_score("Other city", "Other city", all_classes=classes) == 1.0
    # Two classes named, gold among them: 1/2.
    assert classification_score("city or country", "country", all_classes=classes) == 0.5
    assert classification_score("city", "Other city", all_classes=classes) == 0.0
    assert classification_score("nothing", "country", all_classes=classes) == 0.0
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("city", "city", all_classes=None)


def test_retrieval_and_count_hand_computed() -> None:
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert retrieval_score("Paragraph 33", "Paragraph 3") == 0.0
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0
    with pytest.raises(ValueError, match="Paragraph N"):
        retrieval_score("3", "3")
    assert count_score("There are 7 unique paragraphs out of 10.", "7") == 0.5
    assert count_score("7", "7") == 1.0
    assert count_score("seven", "7") == 0.0


def test_code_similarity_hand_computed() -> None:
    # The comment line and the code fence are skipped: the first code line is compared.
    assert code_sim_score("\n# comment\n```python\nreturn x + 1\nfoo()", "return x + 1") == 1.0
    assert code_sim_score("// js comment\nreturn x + 1", "return x + 1") == 1.0
    # 11 of 12 characters match: ratio 2*11/24 = 0.9167 -> 92/100.
    assert code_sim_score("return x + 2", "return x + 1") == pytest.approx(0.92)
    # "abcd" vs "abce": 2*3/8 = 0.75.
    assert code_sim_score("abcd", "abce") == pytest.approx(0.75)
    # Blank lines, spaces only included, are skipped too.
    assert code_sim_score("   \n\t\nreturn x + 1", "return x + 1") == 1.0
    # Only comments: nothing to compare, similarity of "" to the gold is 0.
    assert code_sim_score("# only a comment", "return x") == 0.0


def test_exact_match() -> None:
    assert exact_match_score("The Answer.", "answer") == 1.0
    assert exact_match_score("answer two", "answer") == 0.0


def test_every_english_task_has_a_metric() -> None:
    for task in ENGLISH_TASKS:
        assert TASK_METRICS[task] is METRICS[TASK_METRIC_NAMES[task]]
    assert TASK_METRIC_NAMES["multi_news"] == "rouge_l"
    assert TASK_METRIC_NAMES["passage_retrieval_en"] == "retrieval"
    assert TASK_METRIC_NAMES["lcc"] == "code_sim"
    assert len(TASK_METRIC_NAMES) == 21


def test_score_prediction_takes_the_best_gold_answer_and_first_line_rule() -> None:
    # "no" vs "yes" = 0; vs "no idea": P=1, R=1/2 -> 2/3.
    assert score_prediction("qasper", "no", ["yes", "no idea"]) == pytest.approx(2 / 3)
    classes = ["Location", "Human being", "Entity"]
    # trec keeps only the first line: the made-up continuation naming "Entity" is ignored.
    assert score_prediction("trec", "\nLocation\nQuestion: what?\nType: Entity", ["Location"], classes) == 1.0
    # Without the first-line rule (a QA task), everything counts.
    assert score_prediction("hotpotqa", "Paris\nLondon", ["Paris"]) == pytest.approx(2 / 3)
    assert score_prediction("hotpotqa", "Paris", ["Paris"], metric="exact_match") == 1.0


def test_score_prediction_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown LongBench task 'nope'.*qasper"):
        score_prediction("nope", "x", ["x"])
    with pytest.raises(ValueError, match="non-empty list"):
        score_prediction("qasper", "x", [])
    with pytest.raises(ValueError, match="non-empty list"):
        score_prediction("qasper", "x", "x")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score_prediction("qasper", "x", ["x"], metric="bleu")


def test_chinese_metrics_use_words() -> None:
    pytest.importorskip("jieba")
    assert score_prediction("multifieldqa_zh", "北京。", ["北京"]) == 1.0
    assert score_prediction("passage_retrieval_zh", "段落5", ["段落5"]) == 1.0
    assert 0.0 < score_prediction("dureader", "我爱北京天安门", ["我爱北京"]) < 1.0


SHARED_LONGBENCH = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "longbench"


def _candidate_predictions(row: dict[str, Any]) -> list[str]:
    """Texts a model could plausibly produce for a row: part of the answer, of the context, noise.

    Kept short: the ``rouge`` package is slow on long texts and every row is scored twice.
    """
    answer, context = row["answers"][0], row.get("context", "")
    words = answer.split()
    return [
        " ".join(words[:40]).upper() + " .. " + " ".join(words[-20:]),
        "\n" + " ".join(context.split()[:60]) + "\n\nQuestion: next",
        "  \n# note\n" + " ".join(words[:30]).replace(". ", ".\n"),
        "",
    ]


def test_score_prediction_equals_lm_eval_on_every_shared_row() -> None:
    files = sorted(SHARED_LONGBENCH.glob("*.jsonl"))
    if not files:
        pytest.skip(f"no shared LongBench data at {SHARED_LONGBENCH} (*.jsonl)")
    lm = pytest.importorskip("lm_eval.tasks.longbench.metrics", reason="lm-eval comes with the eval extra")
    process_results = {
        "qa_f1": lm.get_qa_f1_score, "qa_f1_zh": lm.get_qa_f1_zh_score, "rouge_l": lm.get_rouge_score,
        "rouge_l_zh": lm.get_rouge_zh_score, "classification": lm.get_classification_score,
        "retrieval": lm.get_retrieval_score, "retrieval_zh": lm.get_retrieval_zh_score,
        "count": lm.get_count_score, "code_sim": lm.get_code_sim_score,
    }
    checked = 0
    for path in files:
        task = path.stem
        assert task in TASK_METRIC_NAMES, f"{path.name}: not a LongBench v1 task"
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            doc = {"answers": row["answers"], "all_classes": row.get("all_classes")}
            for pred in _candidate_predictions(row):
                if task in FIRST_LINE_TASKS:  # lm-eval cuts there while generating (until "\n")
                    pred = pred.lstrip("\n").split("\n")[0]
                (expected,) = process_results[TASK_METRIC_NAMES[task]](doc, [pred]).values()
                ours = score_prediction(task, pred, row["answers"], row.get("all_classes"))
                assert ours == expected, (path.name, row.get("_id"), pred[:80])
                checked += 1
    assert checked >= 4 * len(files)


def _result(prompt_tokens: int, kv_bytes: int, full: int, bits: float, kept: list[int], ttft: float) -> GenerationResult:
    return GenerationResult(
        text="x",
        token_ids=[1, 2, 3],
        prompt_tokens=prompt_tokens,
        kv_bytes=kv_bytes,
        kv_bytes_fp16_full=full,
        avg_bits=bits,
        tokens_kept_per_layer=kept,
        ttft_s=ttft,
        decode_tokens_per_s=10.0 * ttft,
        peak_rss_bytes=kv_bytes * 10,
    )


def test_compression_metrics_from_results_hand_computed() -> None:
    results = [
        _result(100, 1000, 4000, 4.0, [100, 50], 1.0),
        _result(300, 3000, 8000, 8.0, [300, 100], 3.0),
    ]
    m = CompressionMetrics.from_results(results)
    assert m.n == 2
    assert m.prompt_tokens == 200
    assert m.kv_bytes == 2000 and m.kv_bytes_fp16_full == 6000
    assert m.compression_ratio == pytest.approx(12000 / 4000)
    assert m.kv_fraction == pytest.approx(4000 / 12000)
    assert m.avg_bits == pytest.approx((100 * 4 + 300 * 8) / 400)  # weighted by prompt length
    assert m.tokens_kept_per_layer == (200.0, 75.0)
    assert m.ttft_s == 2.0 and m.decode_tokens_per_s == 20.0
    assert m.peak_memory_bytes == 30000
    assert m.to_dict()["tokens_kept_per_layer"] == [200.0, 75.0]
    row = generation_metrics(results[0])
    assert row["compression_ratio"] == 4.0 and row["generated_tokens"] == 3


def test_compression_metrics_refuses_empty_and_mixed_layers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CompressionMetrics.from_results([])
    with pytest.raises(ValueError, match="numbers of layers"):
        CompressionMetrics.from_results([_result(1, 1, 1, 8.0, [1], 1.0), _result(1, 1, 1, 8.0, [1, 1], 1.0)])


def test_memory_monitor_sees_a_cpu_allocation() -> None:
    size = 64 * 2**20
    with MemoryMonitor(device="cpu", interval_s=0.002) as mon:
        block = b"\x01" * size  # written byte by byte: every page is resident
        time.sleep(0.02)
        del block
    assert mon.backend == "rss"
    assert mon.samples >= 3
    assert mon.peak_increase_bytes >= size * 0.9
    assert mon.peak_bytes >= max(mon.start_bytes, mon.end_bytes)
    assert set(mon.to_dict()) >= {"peak_bytes", "start_bytes", "end_bytes"}


def test_memory_monitor_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        MemoryMonitor(device="cpu", interval_s=0)
    with pytest.raises(ValueError, match="device"):
        MemoryMonitor(device="tpu")


def test_performance_timer_records_named_spans() -> None:
    with PerformanceTimer() as timer:
        with timer.span("prefill"):
            time.sleep(0.02)
        for _ in range(2):
            with timer.span("decode"):
                time.sleep(0.005)
    assert timer.spans["prefill"] >= 0.02
    assert timer.spans["decode"] >= 0.01
    assert timer.counts == {"prefill": 1, "decode": 2}
    assert [name for name, _ in timer.records] == ["prefill", "decode", "decode"]
    assert timer.elapsed_s >= timer.spans["prefill"] + timer.spans["decode"]
    frozen = timer.elapsed_s
    time.sleep(0.005)
    assert timer.elapsed_s == frozen  # stopped at exit
    with pytest.raises(ValueError, match="span name"):
        with timer.span(""):
            pass
