"""Tuning prompts, the uncompressed references and the fidelity objective a trial is scored by."""

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

from kvcomp_eval.metrics.fidelity import next_token_kl, prefix_agreement
from kvcore.config import CompressionConfig

if TYPE_CHECKING:
    pass

    from kvcore.pipeline import KVCompPipeline
from kvcomp_eval.tune.settings import KL_CAP_NATS, TUNING_PROBE_SEED, TuneError, TuneSettings
from kvcomp_eval.tune.study import _digest


# -- prompts, references, measurements ---------------------------------------------------------------
@dataclass(frozen=True)
class TuningPrompt:
    """One tuning prompt.

    Attributes:
        key: stable name, e.g. ``passkey/500/3``.
        text: complete model input.
        question_span: character range ``[start, end)`` of the question, or ``None``.
        max_new_tokens: tokens generated per trial (task answer and cost).
        score: maps the generated text to a task score in [0, 1]; ``None`` where none is computed.
    """

    key: str
    text: str
    question_span: tuple[int, int] | None
    max_new_tokens: int
    score: Callable[[str], float] | None = None


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
        from kvcomp_eval.data.longbench import LongBenchDataLoader, prepare_prompt

        loader = LongBenchDataLoader(settings.data_dir, offset=settings.offset, limit=settings.limit)
        examples = loader.load(task)
        if len(examples) < settings.limit:
            raise TuneError(
                f"LongBench task {task!r} has {len(examples)} rows from row {settings.offset}; --limit asks for {settings.limit}"
            )
        for length in settings.lengths:
            for ex in examples:
                p = prepare_prompt(ex, task, tokenizer, length)
                prompts.append(TuningPrompt(f"{task}/{length}/{ex.index}", p.text, p.question_span, settings.kl_steps))
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
            prompts.append(TuningPrompt(f"{settings.suite}/{length}/{index}", probe.prompt, probe.question_span, n_new, probe.score))
    return prompts


@dataclass(frozen=True)
class Reference:
    """The uncompressed model on one prompt.

    Attributes:
        tokens: its first ``T <= kl_steps`` greedy tokens (fewer when it stops at EOS).
        logprobs: ``[T, V]`` float32 log-probabilities after the prompt and after each of ``tokens[:-1]``.
        generated: every token of its greedy generation (``max_new_tokens`` at most).
        score: its task score, or ``None``.
    """

    tokens: list[int]
    logprobs: Tensor
    generated: list[int]
    score: float | None


@dataclass(frozen=True)
class TrialMeasurement:
    """What one config did on the tuning prompts.

    Attributes:
        kl: mean over prompts of the mean teacher-forced KL(P_ref || P_trial), nats.
        agreement: mean share of the reference's generated tokens reproduced before the first difference.
        kv_fraction: stored KV bytes / fp16 bytes of the same tokens, summed over prompts.
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
    """

    def __init__(
        self,
        pipeline: "KVCompPipeline",
        prompts: Sequence[TuningPrompt],
        references: Sequence[Reference],
        task_weight: float = 1.0,
    ) -> None:
        if len(prompts) != len(references) or not prompts:
            raise ValueError(f"need one reference per prompt, got {len(prompts)} prompts and {len(references)} references")
        self.pipeline = pipeline
        self.prompts = list(prompts)
        self.references = list(references)
        self.task_weight = task_weight

    def measure(self, config: CompressionConfig) -> TrialMeasurement:
        """Run ``config`` on every prompt (the pipeline keeps it afterwards)."""
        self.pipeline.set_config(config)
        kls: list[float] = []
        agreements: list[float] = []
        scores: list[float] = []
        losses: list[float] = []
        kv_bytes = fp16_bytes = 0
        for prompt, ref in zip(self.prompts, self.references):
            logprobs = self.pipeline.continuation_logprobs(prompt.text, ref.tokens[:-1], question_span=prompt.question_span)
            kl = next_token_kl(ref.logprobs, logprobs).mean().item()
            kls.append(min(kl, KL_CAP_NATS) if math.isfinite(kl) else KL_CAP_NATS)
            result = self.pipeline.generate(
                prompt.text, question_span=prompt.question_span, max_new_tokens=prompt.max_new_tokens
            )
            kv_bytes += result.kv_bytes
            fp16_bytes += result.kv_bytes_fp16_full
            agreements.append(prefix_agreement(ref.generated, result.token_ids))
            if prompt.score is not None and ref.score is not None:
                score = prompt.score(result.text)
                scores.append(score)
                losses.append(max(0.0, ref.score - score))
        kl_mean = sum(kls) / len(kls)
        task_loss = sum(losses) / len(losses) if losses else None
        return TrialMeasurement(
            kl=kl_mean,
            agreement=sum(agreements) / len(agreements),
            kv_fraction=kv_bytes / fp16_bytes,
            task_score=sum(scores) / len(scores) if scores else None,
            task_loss=task_loss,
            quality=kl_mean + self.task_weight * (task_loss or 0.0),
            kl_per_prompt=kls,
        )


def compute_references(
    pipeline: "KVCompPipeline", prompts: Sequence[TuningPrompt], kl_steps: int, progress: bool = False
) -> list[Reference]:
    """Run the uncompressed model (``full`` preset) once per prompt."""
    pipeline.set_config(CompressionConfig.from_preset("full"))
    refs = []
    for prompt in tqdm(prompts, desc="reference", unit="prompt", disable=not progress, leave=False):
        result = pipeline.generate(prompt.text, question_span=prompt.question_span, max_new_tokens=prompt.max_new_tokens)
        tokens = result.token_ids[:kl_steps]
        logprobs = pipeline.continuation_logprobs(prompt.text, tokens[:-1], question_span=prompt.question_span)
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
            return [
                Reference(tokens=list(r["tokens"]), logprobs=r["logprobs"], generated=list(r["generated"]), score=r["score"])
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
