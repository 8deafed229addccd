"""Experiments built on :class:`~kvcomp_eval.runs.benchmark.CompressionBenchmark`: the ablation variants.

:func:`derive_ablation_variants` turns one base config into real
:class:`~kvcore.config.CompressionConfig` variants (through ``with_overrides``), each removing
or replacing one mechanism:

============== =========================================================================
variant         what changes (everything else stays as in the base)
============== =========================================================================
alpha-only      scorer ``prompt_guided`` with alpha=1, beta=gamma=0 (window attention)
beta-only       scorer ``prompt_guided`` with beta=1 (content relevance)
gamma-only      scorer ``prompt_guided`` with gamma=1 (sink/recency prior)
evict-only      no low-bit tiers: a fraction f of the candidates kept at 8 bit, the rest
                dropped, f chosen so the measured KV bytes equal the base's
uniform-bytes   one bit width for every kept candidate: 2, 4 or 8 bit, with the share of
                dropped tokens that makes the measured KV bytes equal the base's
no-propagation  propagator ``none``
random-scores   scorer ``random`` (seeded): what the scorer is worth
============== =========================================================================

Equal bytes are matched by *measurement*: the base and candidate variants prefill the same
calibration prompt (the suite's example of median length) and the stored KV bytes of the cache
are compared. Tier bytes grow linearly with the kept fraction, so f is found by interpolation
between measured points (regula falsi, a few prefills). The library has no fp16 tier for
scored tokens, so evict-only keeps its tokens at 8 bit (per-channel keys; the ``lossless8``
preset's KL to the full cache is below 1e-3 on the test model): it spends its bytes on keeping
about twice as many tokens as an fp16 eviction could, which favours eviction if anything.
A variant whose resolved contents equal the base's (e.g. alpha-only for a base that already
scores with alpha only) is listed but not run twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvcore.config import CompressionConfig

__all__ = ["Variant", "derive_ablation_variants", "match_fraction", "ABLATION_VARIANTS", "MATCH_TOLERANCE"]

ABLATION_VARIANTS = (
    "alpha-only",
    "beta-only",
    "gamma-only",
    "evict-only",
    "uniform-bytes",
    "no-propagation",
    "random-scores",
)
MATCH_TOLERANCE = 0.05
"""A uniform width that keeps every token counts as 'equal bytes' within this relative gap."""

# What decides which tokens go to which width. Single-tier variants replace all of it: they are
# flat references (the same share stored in every layer), so a base's budget_by_layer is not
# carried over (uniform has no such field, and a kept share near 1 could not take a multiplier).
_TIER_FIELDS = ("frac_8bit", "frac_4bit", "frac_2bit", "frac_drop", "avg_bits", "bits", "budget_by_layer")
_TIERED = ("mixed_precision", "uniform")


@dataclass
class Variant:
    """One ablation variant.

    Attributes:
        name: variant name (the config's name in the results).
        config: the variant's config, or ``None`` when it does not apply to this base.
        derivation: how it differs from the base, in words.
        overrides: the dotted overrides applied to the base.
        same_as: name of an identical config already in the run (then it is not run again).
        bytes_match: how equal bytes were reached (measured bytes), when they were matched.
    """

    name: str
    config: CompressionConfig | None
    derivation: str
    overrides: dict[str, Any] = field(default_factory=dict)
    same_as: str | None = None
    bytes_match: str | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for ``run.json`` and the summary."""
        text = self.derivation
        if self.same_as:
            text += f" — identical to `{self.same_as}`, not run twice"
        return {"derivation": text, "overrides": self.overrides, "same_as": self.same_as, "bytes_match": self.bytes_match}


def match_fraction(
    measure: Callable[[float], int], target: int, iterations: int = 4
) -> tuple[float, int, list[tuple[float, int]]]:
    """The kept fraction ``f`` in [0, 1] whose measured bytes are closest to ``target``.

    ``measure(f)`` must grow with ``f`` (it is a step function of the token counts). Starts from
    the ends, then interpolates inside the bracket (regula falsi) ``iterations`` times.

    Returns:
        ``(f, bytes at f, every (f, bytes) measured)``.
    """
    points = [(0.0, measure(0.0)), (1.0, measure(1.0))]
    lo, hi = points
    if target <= lo[1]:
        return 0.0, lo[1], points
    if target >= hi[1]:
        return 1.0, hi[1], points
    for _ in range(iterations):
        if hi[1] == lo[1]:
            break
        f = lo[0] + (target - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])
        f = round(min(max(f, 0.0), 1.0), 4)
        if any(abs(f - p[0]) < 1e-4 for p in points):
            break
        b = measure(f)
        points.append((f, b))
        if b == target:
            break
        lo, hi = ((f, b), hi) if b < target else (lo, (f, b))
    best = min(points, key=lambda p: (abs(p[1] - target), -p[0]))
    return best[0], best[1], points


def _quantizer_common(base: CompressionConfig) -> dict[str, Any]:
    """The base quantizer's shared parameters (group size, key mode, residual, ...) without tiers."""
    resolved = base.resolved().to_dict()["quantizer"]
    return {k: v for k, v in resolved.items() if k not in _TIER_FIELDS and k != "name"}


def _single_tier(base: CompressionConfig, bits: int, keep: float) -> tuple[CompressionConfig, dict[str, Any]]:
    """Base with every kept candidate at ``bits`` (``keep`` of them) and the rest dropped."""
    common = _quantizer_common(base)
    if keep >= 1.0:
        section = {"name": "uniform", **common, "bits": bits}
    else:
        fracs = {"frac_8bit": 0.0, "frac_4bit": 0.0, "frac_2bit": 0.0}
        fracs[f"frac_{bits}bit"] = keep
        section = {"name": "mixed_precision", **common, **fracs, "frac_drop": round(1.0 - keep, 6)}
    overrides = {"quantizer": section}
    return base.with_overrides(overrides), overrides


def _scorer_terms(alpha: float, beta: float, gamma: float) -> dict[str, Any]:
    return {"scorer.name": "prompt_guided", "scorer.alpha": alpha, "scorer.beta": beta, "scorer.gamma": gamma}


def derive_ablation_variants(
    base_name: str,
    base: CompressionConfig,
    measure_kv_bytes: Callable[[CompressionConfig], int],
    known: dict[str, CompressionConfig] | None = None,
) -> list[Variant]:
    """The ablation variants of ``base`` (see the module docstring), in :data:`ABLATION_VARIANTS` order.

    Args:
        base_name: the base config's name.
        base: the base config.
        measure_kv_bytes: stored KV bytes of a config on the calibration prompt.
        known: configs already in the run ``{name: config}`` (the base and ``full`` at least);
            a variant equal to one of them is marked ``same_as`` it.
    """
    from kvcomp_eval.runs.store import config_hash

    known = dict(known or {})
    known.setdefault(base_name, base)
    variants: list[Variant] = []

    def add(name: str, overrides: dict[str, Any] | None, derivation: str, config: CompressionConfig | None = None,
            bytes_match: str | None = None) -> None:
        if config is None and overrides is not None:
            config = base.with_overrides(overrides)
        same = None
        if config is not None:
            h = config_hash(config)
            same = next((n for n, c in known.items() if config_hash(c) == h), None)
            if same is None:
                known[name] = config
        variants.append(Variant(name, config, derivation, overrides or {}, same, bytes_match))

    add("alpha-only", _scorer_terms(1.0, 0.0, 0.0), "scorer prompt_guided, alpha=1, beta=gamma=0 (window attention only)")
    add("beta-only", _scorer_terms(0.0, 1.0, 0.0), "scorer prompt_guided, beta=1, alpha=gamma=0 (content relevance only)")
    add("gamma-only", _scorer_terms(0.0, 0.0, 1.0), "scorer prompt_guided, gamma=1, alpha=beta=0 (sink/recency prior only)")

    quantizer = base.quantizer.name
    if quantizer not in _TIERED:
        add("evict-only", None, f"not applicable: the base quantizer is {quantizer!r}, not a tiered one")
        add("uniform-bytes", None, f"not applicable: the base quantizer is {quantizer!r}, not a tiered one")
    else:
        target = measure_kv_bytes(base)

        def bytes_at(bits: int) -> Callable[[float], int]:
            return lambda keep: measure_kv_bytes(_single_tier(base, bits, keep)[0])

        f, got, _ = match_fraction(bytes_at(8), target)
        config, overrides = _single_tier(base, 8, f)
        add(
            "evict-only",
            overrides,
            f"no low-bit tiers: {f:.1%} of candidates kept at 8 bit, {1 - f:.1%} dropped",
            config,
            f"{got} B vs base {target} B ({got / target - 1:+.1%})",
        )
        # One width for every kept token: keep all at the width when that alone matches the
        # bytes (within MATCH_TOLERANCE), else drop the share that matches them.
        candidates = []
        for bits in (2, 4, 8):
            whole = bytes_at(bits)(1.0)
            if whole <= target * (1 + MATCH_TOLERANCE):
                candidates.append((bits, 1.0, whole))
            else:
                keep, b, _ = match_fraction(bytes_at(bits), target)
                candidates.append((bits, keep, b))
        close = [c for c in candidates if abs(c[2] - target) <= MATCH_TOLERANCE * target]
        bits, keep, got = max(close, key=lambda c: (c[1], c[0])) if close else min(candidates, key=lambda c: abs(c[2] - target))
        config, overrides = _single_tier(base, bits, keep)
        tried = "; ".join(f"{b} bit keep {k:.1%}: {n} B" for b, k, n in candidates)
        add(
            "uniform-bytes",
            overrides,
            f"every kept candidate at {bits} bit, {keep:.1%} kept" + ("" if keep >= 1 else f", {1 - keep:.1%} dropped"),
            config,
            f"{got} B vs base {target} B ({got / target - 1:+.1%}); tried {tried}",
        )

    add("no-propagation", {"propagator": {"name": "none"}}, "propagator none (every layer sees every token)")
    add("random-scores", {"scorer": {"name": "random"}}, "scorer random (seeded uniform scores)")
    return variants
