"""One example against the uncompressed reference: the scoring ``kvcomp bench`` and ``kvcomp tune`` share.

Both commands run a :class:`~kvcomp_eval.runs.suite.BenchExample` through these functions, so
a KL, an agreement or a KV fraction from a tuning trial means what the same column of
``results.jsonl`` means:

- :func:`generate`: one greedy generation of the example under the pipeline's config;
- :func:`teacher_forced`: log-probs ``[k, V]`` at the first ``k = min(kl_steps, len(ref_ids))``
  reference positions, the reference's own greedy tokens fed through the config's cache (the
  reference's are taken the same way under ``full``);
- :func:`run_against_reference`: a config's generation and its per-step ``KL(P_full || P_config)``;
- :func:`compare`: :class:`ExampleFidelity`, the fidelity columns of one row.

The callers switch the pipeline's config; nothing here does.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from kvcomp_eval.metrics.fidelity import greedy_exact_match, next_token_kl, prefix_agreement
from kvcomp_eval.runs.suite import BenchExample
from kvcore.types import GenerationResult

if TYPE_CHECKING:
    from kvcore.pipeline import KVCompPipeline


def generate(pipe: "KVCompPipeline", ex: BenchExample) -> GenerationResult:
    """Greedy generation of ``ex`` (its question span, token budget and stop strings) under ``pipe``'s config."""
    return pipe.generate(ex.prompt, question_span=ex.question_span, max_new_tokens=ex.max_new_tokens, stop=ex.stop)


def teacher_forced(pipe: "KVCompPipeline", ex: BenchExample, ref_ids: Sequence[int], kl_steps: int) -> Tensor | None:
    """Log-probs ``[k, V]`` after the prompt and after each of ``ref_ids[:k - 1]``, ``k = min(kl_steps, len(ref_ids))``.

    ``None`` when the reference generated nothing (no position to compare).
    """
    k = min(kl_steps, len(ref_ids))
    if k < 1:
        return None
    return pipe.continuation_logprobs(ex.prompt, list(ref_ids[: k - 1]), question_span=ex.question_span)[:k]


def kl_per_step(ref_logprobs: Tensor, cmp_logprobs: Tensor) -> list[float]:
    """``KL(P_ref || P_cmp)`` in nats at each teacher-forced position."""
    return [float(v) for v in next_token_kl(ref_logprobs, cmp_logprobs)]


def run_against_reference(
    pipe: "KVCompPipeline", ex: BenchExample, ref_ids: Sequence[int], ref_logprobs: Tensor | None
) -> tuple[GenerationResult, list[float]]:
    """The config's generation of ``ex`` and its KL to the reference at each of ``ref_logprobs``' positions.

    ``ref_logprobs`` comes from :func:`teacher_forced` under ``full`` with the same ``ref_ids``;
    without it (an empty reference) the KL list is empty.
    """
    result = generate(pipe, ex)
    if ref_logprobs is None:
        return result, []
    cmp = teacher_forced(pipe, ex, ref_ids, ref_logprobs.shape[0])
    assert cmp is not None  # ref_logprobs has at least one row, so ref_ids has a token
    return result, kl_per_step(ref_logprobs, cmp)


@dataclass(frozen=True)
class ExampleFidelity:
    """How one generation compares with the reference generation of the same example.

    Attributes:
        kl_per_step: ``KL(P_ref || P_config)`` at each teacher-forced position, nats (empty: none taken).
        exact_match: the generated token ids equal the reference's.
        prefix_agreement: common prefix length / reference length.
        kv_bytes: stored KV bytes.
        kv_bytes_fp16: bytes an fp16 cache of the same tokens would take.
    """

    kl_per_step: list[float]
    exact_match: bool
    prefix_agreement: float
    kv_bytes: int
    kv_bytes_fp16: int

    @property
    def kl_mean(self) -> float:
        """Mean KL over the teacher-forced positions (0.0 without any)."""
        return float(statistics.fmean(self.kl_per_step)) if self.kl_per_step else 0.0

    @property
    def kl_first(self) -> float:
        """KL at the first position (0.0 without any)."""
        return float(self.kl_per_step[0]) if self.kl_per_step else 0.0

    @property
    def kv_fraction(self) -> float:
        """Stored KV bytes / fp16 bytes of the same tokens."""
        return self.kv_bytes / self.kv_bytes_fp16


def compare(ref_ids: Sequence[int], result: GenerationResult, kl: Sequence[float]) -> ExampleFidelity:
    """The fidelity of ``result`` to the reference generation ``ref_ids``, with its per-step ``kl``."""
    return ExampleFidelity(
        kl_per_step=[float(v) for v in kl],
        exact_match=greedy_exact_match(ref_ids, result.token_ids),
        prefix_agreement=prefix_agreement(ref_ids, result.token_ids),
        kv_bytes=result.kv_bytes,
        kv_bytes_fp16=result.kv_bytes_fp16_full,
    )
