"""Built-in scorers (registered via the kvcomp.plugins entry point 'scorers')."""

from __future__ import annotations

from typing import Callable

from kvcomp_plugins.scorers.key_norm import KeyNormConfig, KeyNormScorer
from kvcomp_plugins.scorers.prompt_guided import PromptGuidedConfig, PromptGuidedScorer
from kvcomp_plugins.scorers.random_scorer import RandomConfig, RandomScorer
from kvcomp_plugins.scorers.snapkv import SnapKVConfig, SnapKVScorer
from kvcomp_plugins.scorers.streaming import StreamingConfig, StreamingScorer
from kvcore.hookspecs import hookimpl

__all__ = [
    "KeyNormConfig",
    "KeyNormScorer",
    "PromptGuidedConfig",
    "PromptGuidedScorer",
    "RandomConfig",
    "RandomScorer",
    "SnapKVConfig",
    "SnapKVScorer",
    "StreamingConfig",
    "StreamingScorer",
    "register_components",
]


@hookimpl
def register_components(register: Callable[..., None]) -> None:
    """Register the five built-in scorers."""
    register(
        "scorer",
        "prompt_guided",
        PromptGuidedScorer,
        PromptGuidedConfig,
        "window attention + content relevance + sink/recency prior (the default)",
    )
    register("scorer", "snapkv", SnapKVScorer, SnapKVConfig, "pooled attention from the prompt window only")
    register("scorer", "key_norm", KeyNormScorer, KeyNormConfig, "low L2 norm of the post-RoPE key = important")
    register("scorer", "streaming", StreamingScorer, StreamingConfig, "attention sinks plus exponential recency")
    register("scorer", "random", RandomScorer, RandomConfig, "seeded uniform random scores (baseline)")
