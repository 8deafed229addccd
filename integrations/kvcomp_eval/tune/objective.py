"""Tuning prompts, the uncompressed references and the fidelity objective a trial is scored by.

A tuning prompt is a :class:`~kvcomp_eval.runs.suite.BenchExample` built by the same
constructors as the benchmark's, and references and trials are run and compared by
:mod:`kvcomp_eval.runs.scoring`, the code ``kvcomp bench`` writes its rows with: a trial's KL,
agreement and KV fraction on a prompt are the ``kl_mean``, ``prefix_agreement`` and
``kv_fraction`` a benchmark row of that prompt and config holds. Only the prompts differ (the
tuning side of the split) and the aggregation into one objective.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvcomp_eval.runs.scoring import compare, generate, run_against_reference, teacher_forced
from kvcomp_eval.runs.suite import BenchExample
from kvcore.config import CompressionConfig

if TYPE_CHECKING:
    from kvcore.pipeline import KVCompPipeline
from kvcomp_eval.tune.settings import KL_AGGREGATES, KL_CAP_NATS, KL_TRIM, TUNING_PROBE_SEED, TuneError, TuneSettings
from kvcomp_eval.tune.study import _digest


# -- prompts, references, measurements ---------------------------------------------------------------
@dataclass(frozen=True)
class TuningPrompt:
    """One tuning prompt.

    Attributes:
        key: stable name, e.g. ``passkey/500/3``.
        example: the prompt as the benchmark would run it (text, question span, tokens to generate).
        score: maps the generated text to a task score in [0, 1]; ``None`` where none is computed.
    """

    key: str
    example: BenchExample
    score: Callable[[str], float] | None = None

    @property
    def text(self) -> str:
        """Complete model input."""
        return self.example.prompt

    @property
    def question_span(self) -> tuple[int, int] | None:
        """Character range ``[start, end)`` of the question, or ``None``."""
        return self.example.question_span

    @property
    def max_new_tokens(self) -> int:
        """Tokens generated per trial (task answer and cost)."""
        return self.example.max_new_tokens


def build_prompts(settings: TuneSettings, tokenizer: Any, max_prompt_tokens: int | None = None) -> list[TuningPrompt]:
    """The tuning prompts of ``settings``: ``limit`` per length, from the tuning side of the split.

    Probes use seed :data:`TUNING_PROBE_SEED`, indices ``offset .. offset + limit - 1`` and
    depths spread evenly over (0, 1). LongBench reads rows ``offset .. offset + limit - 1``
    (within :data:`LONGBENCH_TUNING_ROWS`) and cuts each to every length in the middle;
    LongBench prompts get no task score (their answers need hundreds of generated tokens).
    """
    from kvcomp_eval.data.probes import DEFAULT_MAX_NEW_TOKENS, Filler, build_probe

    if max_prompt_tokens is not None:
        too_long = [n for n in settings.lengths if n + settings.kl_steps > max_prompt_tokens]
        if too_long:
            raise TuneError(
                f"lengths {too_long} plus {settings.kl_steps} generated tokens exceed the model's "
                f"{max_prompt_tokens} positions"
            )
    prompts: list[TuningPrompt] = []
    task = settings.longbench_task
    if task is not None:
        from kvcomp_eval.data.longbench import LongBenchDataLoader, PreparedExample, prepare_prompt

        loader = LongBenchDataLoader(settings.data_dir, offset=settings.offset, limit=settings.limit)
        examples = loader.load(task)
        if len(examples) < settings.limit:
            raise TuneError(
                f"LongBench task {task!r} has {len(examples)} rows from row {settings.offset}; --limit asks for {settings.limit}"
            )
        for length in settings.lengths:
            for ex in examples:
                prepared = PreparedExample(task, ex, prepare_prompt(ex, task, tokenizer, length), settings.kl_steps)
                prompts.append(TuningPrompt(f"{task}/{length}/{ex.index}", BenchExample.from_longbench(prepared)))
        return prompts
    filler = Filler.from_dir(settings.data_dir) if settings.data_dir is not None else None
    n_new = max(settings.kl_steps, DEFAULT_MAX_NEW_TOKENS[settings.suite])
    for length in settings.lengths:
        for i in range(settings.limit):
            index = settings.offset + i
            probe = build_probe(
                settings.suite,
                tokenizer,
                length,
                (i + 0.5) / settings.limit,
                index=index,
                seed=TUNING_PROBE_SEED,
                filler=filler,
            )
            example = BenchExample.from_probe(probe, max_new_tokens=n_new)
            prompts.append(TuningPrompt(f"{settings.suite}/{length}/{index}", example, probe.score))
    return prompts


@dataclass(frozen=True)
class Reference:
    """The uncompressed model on one prompt.

    Attributes:
        tokens: its first ``T <= kl_steps`` greedy tokens (fewer when it stops at EOS).
        logprobs: ``[T, V]`` float32 log-probabilities after the prompt and after each of
            ``tokens[:-1]`` (:func:`~kvcomp_eval.runs.scoring.teacher_forced`); ``None`` when ``T = 0``.
        generated: every token of its greedy generation (``max_new_tokens`` at most).
        score: its task score, or ``None``.
    """

    tokens: list[int]
    logprobs: Tensor | None
    generated: list[int]
    score: float | None


@dataclass(frozen=True)
class TrialMeasurement:
    """What one config did on the tuning prompts.

    Attributes:
        kl: the per-prompt mean teacher-forced KL(P_ref || P_trial), nats (a benchmark row's
            ``kl_mean``; each capped at :data:`KL_CAP_NATS`), combined over prompts by the
            objective's ``kl_aggregate`` (:func:`aggregate_kl`).
        agreement: mean share of the reference's generated tokens reproduced before the first
            difference (a row's ``prefix_agreement``).
        kv_fraction: mean over prompts of stored KV bytes / fp16 bytes of the same tokens (a row's
            ``kv_fraction``).
        task_score: mean task score, or ``None`` where the suite has none.
        task_loss: mean over prompts of ``max(0, reference score - trial score)``, or ``None``.
        quality: ``kl + task_weight * task_loss`` (the fidelity objective).
        kl_per_prompt: the per-prompt KL values.
    """

    kl: float
    agreement: float
    kv_fraction: float
    task_score: float | None
    task_loss: float | None
    quality: float
    kl_per_prompt: list[float]


def aggregate_kl(values: Sequence[float], how: str = "mean") -> float:
    """Combine per-prompt KL values (nats) into one: ``mean``, ``trimmed`` or ``median``.

    ``trimmed`` drops ``floor(KL_TRIM * n)`` values from each end before the mean (none below 10
    prompts). Why it exists: on 20 multi_news tuning prompts one prompt at KL 0.20 made `fast`'s
    mean (0.041) look worse than a thinner schedule's (0.037); on 20 report prompts the thinner
    one was worse (0.039 against 0.026), as the trimmed means (0.034 against 0.029) had said.
    """
    if not values:
        raise ValueError("no KL values to aggregate")
    ordered = sorted(values)
    n = len(ordered)
    if how == "mean":
        return sum(ordered) / n
    if how == "median":
        mid = n // 2
        return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    if how == "trimmed":
        cut = int(KL_TRIM * n)
        kept = ordered[cut : n - cut]
        return sum(kept) / len(kept)
    raise ValueError(f"unknown KL aggregate {how!r}; use one of {', '.join(KL_AGGREGATES)}")


class FidelityObjective:
    """Measures configs against the uncompressed model's references on fixed prompts.

    Parameters
    ----------
    pipeline:
        The pipeline; :meth:`measure` switches its config.
    prompts, references:
        Same length and order (see :func:`compute_references`).
    task_weight:
        Weight of the lost task score in ``quality``.
    kl_aggregate:
        How the per-prompt KL values become the trial's ``kl`` (:func:`aggregate_kl`).
    """

    def __init__(
        self,
        pipeline: "KVCompPipeline",
        prompts: Sequence[TuningPrompt],
        references: Sequence[Reference],
        task_weight: float = 1.0,
        kl_aggregate: str = "mean",
    ) -> None:
        if len(prompts) != len(references) or not prompts:
            raise ValueError(f"need one reference per prompt, got {len(prompts)} prompts and {len(references)} references")
        if kl_aggregate not in KL_AGGREGATES:
            raise ValueError(f"kl_aggregate must be one of {', '.join(KL_AGGREGATES)}, got {kl_aggregate!r}")
        self.kl_aggregate = kl_aggregate
        self.pipeline = pipeline
        self.prompts = list(prompts)
        self.references = list(references)
        self.task_weight = task_weight

    def measure(self, config: CompressionConfig) -> TrialMeasurement:
        """Run ``config`` on every prompt (the pipeline keeps it afterwards)."""
        self.pipeline.set_config(config)
        kls: list[float] = []
        agreements: list[float] = []
        fractions: list[float] = []
        scores: list[float] = []
        losses: list[float] = []
        for prompt, ref in zip(self.prompts, self.references):
            result, kl_steps = run_against_reference(self.pipeline, prompt.example, ref.generated, ref.logprobs)
            fidelity = compare(ref.generated, result, kl_steps)
            kl = fidelity.kl_mean
            # One diverging prompt must not make the whole objective inf/nan for the sampler.
            kls.append(min(kl, KL_CAP_NATS) if math.isfinite(kl) else KL_CAP_NATS)
            agreements.append(fidelity.prefix_agreement)
            fractions.append(fidelity.kv_fraction)
            if prompt.score is not None and ref.score is not None:
                score = prompt.score(result.text)
                scores.append(score)
                losses.append(max(0.0, ref.score - score))
        kl = aggregate_kl(kls, self.kl_aggregate)
        task_loss = sum(losses) / len(losses) if losses else None
        return TrialMeasurement(
            kl=kl,
            agreement=sum(agreements) / len(agreements),
            kv_fraction=sum(fractions) / len(fractions),
            task_score=sum(scores) / len(scores) if scores else None,
            task_loss=task_loss,
            quality=kl + self.task_weight * (task_loss or 0.0),
            kl_per_prompt=kls,
        )


def compute_references(
    pipeline: "KVCompPipeline", prompts: Sequence[TuningPrompt], kl_steps: int, progress: bool = False
) -> list[Reference]:
    """Run the uncompressed model (``full`` preset) once per prompt, as the benchmark runs its ``full`` rows."""
    pipeline.set_config(CompressionConfig.from_preset("full"))
    refs = []
    for prompt in tqdm(prompts, desc="reference", unit="prompt", disable=not progress, leave=False):
        result = generate(pipeline, prompt.example)
        tokens = list(result.token_ids[:kl_steps])
        logprobs = teacher_forced(pipeline, prompt.example, result.token_ids, kl_steps)
        score = prompt.score(result.text) if prompt.score is not None else None
        refs.append(Reference(tokens=tokens, logprobs=logprobs, generated=list(result.token_ids), score=score))
    return refs


def load_or_compute_references(
    pipeline: "KVCompPipeline",
    prompts: Sequence[TuningPrompt],
    kl_steps: int,
    cache_file: Path,
    model_identity: dict[str, Any],
    progress: bool = False,
) -> list[Reference]:
    """References from ``cache_file`` when it was made for the same model, prompts and steps; else computed and saved."""
    fingerprint = _digest(
        {
            "model": model_identity,
            "kl_steps": kl_steps,
            "prompts": [[p.key, p.text, p.question_span, p.max_new_tokens] for p in prompts],
        }
    )
    if cache_file.is_file():
        try:
            stored = torch.load(cache_file, weights_only=True)
        except Exception:  # an unreadable cache is recomputed, never trusted
            stored = None
        if isinstance(stored, dict) and stored.get("fingerprint") == fingerprint:
            # An empty reference has no position to compare (older files hold one row of log-probs for it).
            return [
                Reference(
                    tokens=list(r["tokens"]),
                    logprobs=r["logprobs"] if r["tokens"] else None,
                    generated=list(r["generated"]),
                    score=r["score"],
                )
                for r in stored["references"]
            ]
    refs = compute_references(pipeline, prompts, kl_steps, progress)
    payload = {
        "fingerprint": fingerprint,
        "references": [
            {"tokens": r.tokens, "logprobs": r.logprobs, "generated": r.generated, "score": r.score} for r in refs
        ],
    }
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, cache_file)
    return refs
