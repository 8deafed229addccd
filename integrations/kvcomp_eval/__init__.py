"""Evaluation: LongBench, synthetic long-context probes, metrics, benchmark runner.

Building blocks a benchmark runner combines:

- :class:`LongBenchEvaluator` / :class:`ProbeEvaluator` run a :class:`TextGenerator` over
  LongBench tasks or synthetic probes and yield one JSON-ready row per example;
- :mod:`kvcomp_eval.metrics`: the LongBench answer metrics;
- :class:`CompressionMetrics` and :class:`FidelityMetrics` aggregate generations;
- :class:`MemoryMonitor` and :class:`PerformanceTimer` measure peak memory and time.
"""

from kvcomp_eval.fidelity import (
    FidelityMetrics,
    greedy_exact_match,
    next_token_kl,
    output_rouge_l,
    prefix_agreement,
)
from kvcomp_eval.longbench import (
    DATASET2MAXLEN,
    DATASET2PROMPT,
    LONGBENCH_E_TASKS,
    LONGBENCH_TASKS,
    NO_CHAT_TEMPLATE_TASKS,
    LongBenchDataLoader,
    LongBenchEvalConfig,
    LongBenchEvaluator,
    LongBenchExample,
    LongBenchPrompt,
    PreparedExample,
    build_prompt,
    prepare_prompt,
    summarize_scores,
    summarize_scores_by_length,
)
from kvcomp_eval.metrics import METRICS, TASK_METRIC_NAMES, TASK_METRICS, score_prediction
from kvcomp_eval.metrics_summary import CompressionMetrics, generation_metrics
from kvcomp_eval.monitor import MemoryMonitor, PerformanceTimer
from kvcomp_eval.probes import (
    PROBES,
    Filler,
    ProbeEvalConfig,
    ProbeEvaluator,
    ProbeExample,
    build_probe,
    summarize_probe_rows,
)
from kvcomp_eval.protocols import TextGenerator
from kvcomp_eval.tokenization import (
    DataCollator,
    PromptBatch,
    char_span_to_token_span,
    count_prompt_tokens,
    encode_prompt,
)

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
