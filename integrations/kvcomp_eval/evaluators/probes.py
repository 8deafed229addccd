"""``ProbeEvaluator``: a sweep of synthetic probes (lengths x depths) through any text generator."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvcomp_eval.data.probes import _KEY_WORDS, DEFAULT_MAX_NEW_TOKENS, Filler, ProbeExample, ProbeName, build_probe
from kvcomp_eval.evaluators.base import TextGenerator, generate_rows, require_text_generator
from kvcomp_eval.metrics.summary import generation_metrics
from kvcore.types import GenerationResult


class ProbeEvalConfig(BaseModel):
    """What a probe sweep runs."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    probe: ProbeName = "passkey"
    lengths: tuple[int, ...] = Field(default=(512, 1024, 2048), min_length=1)
    """Prompt lengths in tokens."""
    depths: tuple[float, ...] = Field(default=(0.0, 0.25, 0.5, 0.75, 1.0), min_length=1)
    """Fractions of the filler before the (first) fact, in [0, 1]."""
    n_per_cell: int = Field(default=5, ge=1)
    """Examples per (length, depth)."""
    seed: int = 0
    use_question_span: bool = True
    """Pass the question's character span to the generator (else it uses the last W tokens)."""
    haystack_dir: Path | None = None
    """Folder of ``*.txt`` filler text; ``None`` uses the built-in repetitive filler."""
    use_chat_template: bool | None = None
    """Wrap the prompt in the tokenizer's chat template, the answer prefix after it; ``None``:
    when the tokenizer has one."""
    max_new_tokens: int | None = Field(default=None, ge=1)
    """``None``: :data:`DEFAULT_MAX_NEW_TOKENS` for the probe."""
    n_needles: int = Field(default=4, ge=1, le=len(_KEY_WORDS))
    n_values: int = Field(default=4, ge=1, le=64)
    chain_length: int = Field(default=4, ge=1, le=64)
    n_distractor_chains: int = Field(default=1, ge=0, le=16)
    progress: bool = True

    @field_validator("lengths")
    @classmethod
    def _positive_lengths(cls, lengths: tuple[int, ...]) -> tuple[int, ...]:
        bad = [n for n in lengths if n < 1]
        if bad:
            raise ValueError(f"lengths must be positive token counts, got {bad}")
        return lengths

    @field_validator("depths")
    @classmethod
    def _unit_depths(cls, depths: tuple[float, ...]) -> tuple[float, ...]:
        bad = [d for d in depths if not (math.isfinite(d) and 0.0 <= d <= 1.0)]
        if bad:
            raise ValueError(f"depths must lie in [0, 1], got {bad}")
        return depths


class ProbeEvaluator:
    """Runs a probe sweep (lengths x depths x n_per_cell) through a generator.

    Parameters mirror :class:`ProbeEvalConfig`. Lists are accepted for ``lengths``/``depths``
    and ints for depths (``0``, ``1``).

    Rows (JSON-ready) hold ``probe``, ``length``, ``depth``, ``index``, ``score``,
    ``prediction``, ``answers``, ``prompt_tokens``, ``question_span`` and the generation's cost
    fields; :meth:`evaluate` returns :func:`summarize_probe_rows` of them.
    """

    def __init__(
        self,
        generator: TextGenerator,
        probe: str = "passkey",
        lengths: Sequence[int] = (512, 1024, 2048),
        depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        n_per_cell: int = 5,
        seed: int = 0,
        use_question_span: bool = True,
        haystack_dir: str | os.PathLike[str] | None = None,
        use_chat_template: bool | None = None,
        max_new_tokens: int | None = None,
        progress: bool = True,
        **probe_options: int,
    ) -> None:
        require_text_generator(generator)
        self.config = ProbeEvalConfig(
            probe=probe,  # type: ignore[arg-type]  # validated by the config
            lengths=tuple(lengths),
            depths=tuple(float(d) if isinstance(d, int) and not isinstance(d, bool) else d for d in depths),
            n_per_cell=n_per_cell,
            seed=seed,
            use_question_span=use_question_span,
            haystack_dir=Path(haystack_dir) if haystack_dir is not None else None,
            use_chat_template=use_chat_template,
            max_new_tokens=max_new_tokens,
            progress=progress,
            **probe_options,
        )
        too_long = [n for n in self.config.lengths if n > generator.max_prompt_tokens]
        if too_long:
            raise ValueError(
                f"lengths {too_long} exceed the generator's max_prompt_tokens={generator.max_prompt_tokens}"
            )
        if use_chat_template and not getattr(generator.tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True but the generator's tokenizer has no chat template")
        self.generator = generator
        self.filler = (
            Filler.from_dir(self.config.haystack_dir) if self.config.haystack_dir is not None else Filler.default()
        )
        self.rows: list[dict[str, Any]] = []

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[self.config.probe]

    def iter_prepared(self) -> Iterator[ProbeExample]:
        """Every probe example of the sweep: lengths, then depths, then index."""
        c = self.config
        for length in c.lengths:
            for depth in c.depths:
                for index in range(c.n_per_cell):
                    yield build_probe(
                        c.probe,
                        self.generator.tokenizer,
                        length,
                        depth,
                        index=index,
                        seed=c.seed,
                        filler=self.filler,
                        use_chat_template=c.use_chat_template,
                        n_needles=c.n_needles,
                        n_values=c.n_values,
                        chain_length=c.chain_length,
                        n_distractor_chains=c.n_distractor_chains,
                    )

    def run_prepared(self, example: ProbeExample, generator: TextGenerator | None = None) -> GenerationResult:
        """Generate for one probe example (with this evaluator's generator unless one is given)."""
        gen = generator if generator is not None else self.generator
        span = example.question_span if self.config.use_question_span else None
        return gen.generate(example.prompt, question_span=span, max_new_tokens=self.max_new_tokens)

    def score_row(self, example: ProbeExample, result: GenerationResult) -> dict[str, Any]:
        """The result row of one example."""
        span = example.question_span if self.config.use_question_span else None
        return {
            "probe": example.probe,
            "length": example.length,
            "depth": example.depth,
            "index": example.index,
            "score": example.score(result.text),
            "prediction": result.text,
            "answers": list(example.answers),
            "prompt_tokens": result.prompt_tokens,
            "question_span": list(span) if span is not None else None,
            **generation_metrics(result),
        }

    def iter_examples(self) -> Iterator[dict[str, Any]]:
        """Generate and score example after example, yielding each row as soon as it is done."""
        c = self.config
        yield from generate_rows(
            self.iter_prepared(), len(c.lengths) * len(c.depths) * c.n_per_cell, self.run_prepared, self.score_row,
            desc=f"probe {c.probe}", label=lambda e: f"len={e.length} depth={e.depth:g}", progress=c.progress,
        )

    def evaluate(self) -> dict[str, Any]:
        """Run the sweep; return :func:`summarize_probe_rows`. Rows are kept in :attr:`rows`."""
        self.rows = list(self.iter_examples())
        return summarize_probe_rows(self.rows)


def summarize_probe_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean scores overall, per length, per depth and per (length, depth) cell.

    Returns ``{"n", "mean_score", "by_length": {length: mean}, "by_depth": {depth: mean},
    "cells": [{"length", "depth", "n", "mean_score"}, ...]}`` (plus ``"probe"`` when the rows
    hold one probe).
    """
    if not rows:
        raise ValueError("no rows to summarise")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    by_length: dict[int, list[float]] = {}
    by_depth: dict[float, list[float]] = {}
    cells: dict[tuple[int, float], list[float]] = {}
    for row in rows:
        s = float(row["score"])
        by_length.setdefault(row["length"], []).append(s)
        by_depth.setdefault(row["depth"], []).append(s)
        cells.setdefault((row["length"], row["depth"]), []).append(s)
    summary: dict[str, Any] = {}
    probes = {row.get("probe") for row in rows}
    if len(probes) == 1:
        summary["probe"] = probes.pop()
    summary.update(
        n=len(rows),
        mean_score=mean([float(r["score"]) for r in rows]),
        by_length={k: mean(v) for k, v in by_length.items()},
        by_depth={k: mean(v) for k, v in by_depth.items()},
        cells=[{"length": k[0], "depth": k[1], "n": len(v), "mean_score": mean(v)} for k, v in cells.items()],
    )
    return summary
