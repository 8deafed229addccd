"""Evaluation: LongBench, synthetic long-context probes, metrics, benchmark runs, tuning, peers.

Subpackages by job (arrows point down this list and into :mod:`kvcore`, never up):

- :mod:`kvcomp_eval.metrics`: LongBench answer metrics, fidelity, cost summaries, monitors;
- :mod:`kvcomp_eval.data`: LongBench loader and prompts, synthetic probes, the collator;
- :mod:`kvcomp_eval.evaluators`: :class:`LongBenchEvaluator` / :class:`ProbeEvaluator` run a
  :class:`TextGenerator` and yield one JSON-ready row per example;
- :mod:`kvcomp_eval.peers`: kvpress presses and ``QuantizedCache`` in their own environment;
- :mod:`kvcomp_eval.runs`: ``kvcomp bench``/``run``/``ablate``, the results store, report, plots;
- :mod:`kvcomp_eval.tune`: ``kvcomp tune`` (Optuna).

This module re-exports the building blocks of the first three.
"""

from kvcomp_eval.data.longbench import (
    DATASET2MAXLEN,
    DATASET2PROMPT,
    LONGBENCH_E_TASKS,
    LONGBENCH_TASKS,
    NO_CHAT_TEMPLATE_TASKS,
    LongBenchDataLoader,
    LongBenchExample,
    LongBenchPrompt,
    PreparedExample,
    build_prompt,
    prepare_prompt,
)
from kvcomp_eval.data.probes import PROBES, Filler, ProbeExample, build_probe
from kvcomp_eval.data.tokenization import (
    DataCollator,
    PromptBatch,
    char_span_to_token_span,
    count_prompt_tokens,
    encode_prompt,
)
from kvcomp_eval.evaluators.base import TextGenerator
from kvcomp_eval.evaluators.longbench import (
    LongBenchEvalConfig,
    LongBenchEvaluator,
    summarize_scores,
    summarize_scores_by_length,
)
from kvcomp_eval.evaluators.probes import ProbeEvalConfig, ProbeEvaluator, summarize_probe_rows
from kvcomp_eval.metrics.fidelity import (
    FidelityMetrics,
    greedy_exact_match,
    next_token_kl,
    output_rouge_l,
    prefix_agreement,
)
from kvcomp_eval.metrics.monitor import MemoryMonitor, PerformanceTimer
from kvcomp_eval.metrics.summary import CompressionMetrics, generation_metrics
from kvcomp_eval.metrics.tasks import METRICS, TASK_METRIC_NAMES, TASK_METRICS, score_prediction

__all__ = [
    "CompressionMetrics",
    "DATASET2MAXLEN",
    "DATASET2PROMPT",
    "DataCollator",
    "FidelityMetrics",
    "Filler",
    "LONGBENCH_E_TASKS",
    "LONGBENCH_TASKS",
    "LongBenchDataLoader",
    "LongBenchEvalConfig",
    "LongBenchEvaluator",
    "LongBenchExample",
    "LongBenchPrompt",
    "METRICS",
    "MemoryMonitor",
    "NO_CHAT_TEMPLATE_TASKS",
    "PROBES",
    "PerformanceTimer",
    "PreparedExample",
    "ProbeEvalConfig",
    "ProbeEvaluator",
    "ProbeExample",
    "PromptBatch",
    "TASK_METRICS",
    "TASK_METRIC_NAMES",
    "TextGenerator",
    "build_probe",
    "build_prompt",
    "char_span_to_token_span",
    "count_prompt_tokens",
    "encode_prompt",
    "generation_metrics",
    "greedy_exact_match",
    "next_token_kl",
    "output_rouge_l",
    "prefix_agreement",
    "prepare_prompt",
    "score_prediction",
    "summarize_probe_rows",
    "summarize_scores",
    "summarize_scores_by_length",
]
