"""The search space: what a trial samples and how it becomes a :class:`~kvcore.config.CompressionConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvcore.config import CompressionConfig

if TYPE_CHECKING:
    import optuna

    pass
from kvcomp_eval.tune.settings import GROUP_SIZES


# -- search space -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    """The parameters a trial samples and how they become config overrides.

    - ``alpha``, ``beta``, ``gamma`` in [0, 1]: the prompt-guided scorer's weights (it
      normalises them to sum 1).
    - Tier fractions by stick breaking, so they always sum to 1: ``kept_fraction`` in
      [``min_kept_fraction``, 1] of the candidate tokens is stored (the rest dropped); of those
      ``share_8bit`` go to 8 bit, and of the remainder ``share_4bit`` to 4 bit, the rest to 2 bit.
    - ``group_size = 2 ** group_size_log2`` over :data:`GROUP_SIZES` (an int parameter, so
      CMA-ES models it too); sizes that do not divide ``head_dim`` are pruned.
    - ``residual_length`` in ``residual_range`` (log scale).
    - ``propagation`` in {none, selective}; for selective: ``propagation_layer`` (first layer
      after which tokens are thinned), ``keep_ratio_1`` and ``keep_ratio_2_share`` give
      ``{layer: r1, layer2: r1 * share}`` with ``layer2`` halfway to the last layer, so the
      ratios never increase. Models with fewer than 3 layers get no propagation.
    """

    num_layers: int
    head_dim: int
    group_sizes: tuple[int, ...] = GROUP_SIZES
    residual_range: tuple[int, int] = (16, 128)
    keep_ratio_range: tuple[float, float] = (0.2, 1.0)
    min_kept_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.head_dim < 1:
            raise ValueError(f"num_layers and head_dim must be >= 1, got {self.num_layers}, {self.head_dim}")
        logs = [math.log2(g) for g in self.group_sizes]
        if not self.group_sizes or any(not x.is_integer() for x in logs) or logs != list(
            range(int(logs[0]), int(logs[0]) + len(logs))
        ):
            raise ValueError(f"group_sizes must be consecutive powers of two, got {self.group_sizes}")

    @property
    def propagation_layers(self) -> tuple[int, int] | None:
        """Range ``[lo, hi]`` of the first propagation layer, or ``None`` when the model is too shallow."""
        lo, hi = max(1, self.num_layers // 8), self.num_layers - 2
        return (lo, hi) if self.num_layers >= 3 and lo <= hi else None

    def describe(self) -> dict[str, Any]:
        return {
            "group_sizes": list(self.group_sizes),
            "residual_range": list(self.residual_range),
            "keep_ratio_range": list(self.keep_ratio_range),
            "min_kept_fraction": self.min_kept_fraction,
            "propagation_layers": list(self.propagation_layers) if self.propagation_layers else None,
        }

    def suggest(self, trial: "optuna.trial.BaseTrial") -> dict[str, Any]:
        """Sample one point; returns dotted config overrides (``{"scorer.alpha": 0.4, ...}``)."""
        alpha = trial.suggest_float("alpha", 0.0, 1.0)
        beta = trial.suggest_float("beta", 0.0, 1.0)
        gamma = trial.suggest_float("gamma", 0.0, 1.0)
        kept = trial.suggest_float("kept_fraction", self.min_kept_fraction, 1.0)
        share8 = trial.suggest_float("share_8bit", 0.0, 1.0)
        share4 = trial.suggest_float("share_4bit", 0.0, 1.0)
        lo = int(math.log2(self.group_sizes[0]))
        group_size = 2 ** trial.suggest_int("group_size_log2", lo, lo + len(self.group_sizes) - 1)
        residual = trial.suggest_int("residual_length", *self.residual_range, log=True)
        overrides: dict[str, Any] = {
            "scorer.name": "prompt_guided",
            "scorer.alpha": round(alpha, 4),
            "scorer.beta": round(beta, 4),
            "scorer.gamma": round(gamma, 4),
            "quantizer.name": "mixed_precision",
            **{f"quantizer.{k}": v for k, v in tier_fractions(kept, share8, share4).items()},
            "quantizer.group_size": group_size,
            "quantizer.residual_length": residual,
        }
        layers = self.propagation_layers
        mode = trial.suggest_categorical("propagation", ["none", "selective"]) if layers else "none"
        if mode == "none":
            overrides["propagator"] = "none"
        else:
            assert layers is not None
            first = trial.suggest_int("propagation_layer", *layers)
            r1 = trial.suggest_float("keep_ratio_1", *self.keep_ratio_range)
            share = trial.suggest_float("keep_ratio_2_share", *self.keep_ratio_range)
            second = first + max(1, (self.num_layers - 1 - first) // 2)
            schedule = {first: round(r1, 4)}
            if second <= self.num_layers - 2:
                schedule[second] = round(min(r1 * share, schedule[first]), 4)
            overrides["propagator.name"] = "selective"
            overrides["propagator.keep_ratio_by_layer"] = schedule
        return overrides


def tier_fractions(kept: float, share8: float, share4: float) -> dict[str, float]:
    """Stick breaking: ``kept`` of the candidates stored; of those ``share8`` at 8 bit, then ``share4`` of the rest at 4 bit.

    Returns ``frac_8bit``, ``frac_4bit``, ``frac_2bit``, ``frac_drop`` rounded to 4 decimals and
    summing to 1 (the drop fraction takes the rounding remainder).
    """
    f8 = round(kept * share8, 4)
    f4 = round(kept * (1.0 - share8) * share4, 4)
    stored = {"frac_8bit": f8, "frac_4bit": f4, "frac_2bit": round(max(0.0, kept - f8 - f4), 4)}
    excess = round(sum(stored.values()) - 1.0, 4)
    if excess > 0:  # two fractions rounded up past 1: take the excess from the largest tier
        top = max(stored, key=lambda k: stored[k])
        stored[top] = round(stored[top] - excess, 4)
    return {**stored, "frac_drop": round(max(0.0, 1.0 - sum(stored.values())), 4)}


def build_trial_config(
    base: CompressionConfig, overrides: dict[str, Any], *, num_layers: int, head_dim: int
) -> CompressionConfig:
    """``base`` plus ``overrides``, validated against the registry and the model's shape.

    Raises:
        ValueError: (``ConfigError``/``ComponentError`` included) naming what is invalid.
    """
    config = base.with_overrides(overrides).resolved()
    quant = config.quantizer
    group = quant.params.get("group_size")
    # A group larger than the head is read as the head (TieredQuantizerConfig.group_for): only a smaller one must divide it.
    if quant.name != "none" and isinstance(group, int) and head_dim % min(group, head_dim):
        raise ValueError(f"quantizer.group_size={group} does not divide the model's head_dim={head_dim}")
    schedule = config.propagator.params.get("keep_ratio_by_layer") or {}
    too_deep = [int(layer) for layer in schedule if int(layer) >= num_layers]
    if too_deep:
        raise ValueError(f"propagator.keep_ratio_by_layer names layer(s) {too_deep}; the model has {num_layers} layers")
    return config
