"""Laws of the built-in scorers, checked on tiny hand-built observations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcomp_plugins.scorers import (
    KeyNormScorer,
    PromptGuidedScorer,
    RandomScorer,
    SnapKVScorer,
    StreamingScorer,
    _common,
)
from kvcore.protocols import Scorer
from kvcore.registry import ComponentError, get_registry
from kvcore.types import LayerObservation

SCORER_NAMES = ["prompt_guided", "snapkv", "key_norm", "streaming", "random"]


def make_obs(
    *,
    batch: int = 1,
    kv_heads: int = 2,
    group: int = 2,
    n_tokens: int = 20,
    window: int = 4,
    head_dim: int = 8,
    pad: list[int] | None = None,
    n_sink: int = 2,
    seed: int = 0,
    layer_idx: int = 0,
    scale: float = 1.0,
) -> LayerObservation:
    """A random observation; row ``b`` is left-padded with ``pad[b]`` slots (position -1).

    The window is the last ``window`` slots; positions count real tokens from 0.
    """
    gen = torch.Generator().manual_seed(seed)
    pad = pad or [0] * batch

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    positions = torch.full((batch, n_tokens), -1, dtype=torch.int64)
    for b, p in enumerate(pad):
        positions[b, p:] = torch.arange(n_tokens - p)
    return LayerObservation(
        layer_idx=layer_idx,
        keys=rand(batch, kv_heads, n_tokens, head_dim),
        values=rand(batch, kv_heads, n_tokens, head_dim),
        queries=rand(batch, kv_heads * group, window, head_dim),
        keys_pre_rope=rand(batch, kv_heads, n_tokens, head_dim),
        queries_pre_rope=rand(batch, kv_heads * group, window, head_dim),
        window_idx=torch.arange(n_tokens - window, n_tokens),
        positions=positions,
        n_original=n_tokens,
        n_sink=n_sink,
    )


def naive_window_attention(obs: LayerObservation) -> torch.Tensor:
    """Explicit loops over batch, KV head, query head and window query; full causal softmax."""
    b_, h_kv, n, d = obs.keys.shape
    g = obs.queries.shape[1] // h_kv
    out = torch.zeros(b_, h_kv, n, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_kv):
            count = 0
            for j in range(h * g, (h + 1) * g):
                for w, slot in enumerate(obs.window_idx.tolist()):
                    q_pos = int(obs.positions[b, slot])
                    if q_pos < 0:
                        continue
                    logits = torch.full((n,), -math.inf, dtype=torch.float64)
                    for i in range(n):
                        k_pos = int(obs.positions[b, i])
                        if 0 <= k_pos <= q_pos:
                            logits[i] = obs.queries[b, j, w].double() @ obs.keys[b, h, i].double() / math.sqrt(d)
                    out[b, h] += torch.softmax(logits, dim=0)
                    count += 1
            out[b, h] /= max(count, 1)
    return out


def naive_normalise(term: torch.Tensor, obs: LayerObservation) -> torch.Tensor:
    """Min-max over candidate tokens (real, unprotected) per (batch, head), with loops."""
    candidates = ~obs.padding_mask & ~obs.protected_mask
    out = torch.zeros_like(term, dtype=torch.float64)
    for b in range(term.shape[0]):
        for h in range(term.shape[1]):
            vals = term[b, h][candidates[b]].double()
            lo, hi = vals.min(), vals.max()
            if hi > lo:
                out[b, h] = (term[b, h].double() - lo) / (hi - lo)
    return out


def check_overrides(scores: torch.Tensor, obs: LayerObservation) -> torch.Tensor:
    """Assert protected/padding values and return the ``[B, N]`` candidate mask."""
    protected = obs.protected_mask[:, None, :].expand_as(scores)
    padding = obs.padding_mask[:, None, :].expand_as(scores)
    assert torch.all(scores[protected] == _common.PROTECTED_SCORE)
    assert torch.all(scores[padding] == _common.PADDING_SCORE)
    return ~obs.padding_mask & ~obs.protected_mask


def test_attention_term_matches_naive_loops() -> None:
    obs = make_obs(batch=2, kv_heads=2, group=3, n_tokens=14, window=4, pad=[0, 5], seed=1)
    scores = PromptGuidedScorer(alpha=1.0, beta=0.0, gamma=0.0, pool_kernel=1).score(obs)
    expected = naive_normalise(naive_window_attention(obs), obs)
    candidates = check_overrides(scores, obs)
    mask = candidates[:, None, :].expand_as(scores)
    torch.testing.assert_close(scores[mask].double(), expected[mask], atol=1e-5, rtol=1e-5)
    # The reference is not degenerate: candidates span the whole [0, 1] range.
    assert scores[mask].min() == 0.0 and scores[mask].max() == pytest.approx(1.0)


def test_window_attention_is_a_distribution_over_visible_keys() -> None:
    obs = make_obs(batch=2, n_tokens=12, window=3, pad=[0, 4], seed=2)
    attn = _common.window_attention(obs)
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(2, 2))
    assert torch.all(attn[:, :, :4][1] == 0)  # padding receives nothing


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pooling_matches_loops_over_candidates(mode: str) -> None:
    obs = make_obs(batch=2, n_tokens=16, window=3, pad=[0, 3], seed=3)
    scorer = PromptGuidedScorer(alpha=1.0, beta=0.0, gamma=0.0, pool_kernel=5, pool=mode)
    raw = _common.window_attention(obs)
    candidates = ~obs.padding_mask & ~obs.protected_mask
    pooled = torch.zeros_like(raw)
    for b in range(raw.shape[0]):
        for h in range(raw.shape[1]):
            for i in range(raw.shape[2]):
                reach = [j for j in range(i - 2, i + 3) if 0 <= j < raw.shape[2] and candidates[b, j]]
                vals = raw[b, h, reach]
                if mode == "max":
                    pooled[b, h, i] = vals.max() if reach else 0.0
                else:
                    pooled[b, h, i] = vals.mean() if reach else 0.0
    expected = naive_normalise(pooled, obs)
    scores = scorer.score(obs)
    mask = check_overrides(scores, obs)[:, None, :].expand_as(scores)
    torch.testing.assert_close(scores[mask].double(), expected[mask], atol=1e-5, rtol=1e-5)


def test_content_term_is_cosine_to_mean_window_query() -> None:
    obs = make_obs(batch=1, kv_heads=2, group=2, n_tokens=12, window=3, seed=4)
    scores = PromptGuidedScorer(alpha=0.0, beta=1.0, gamma=0.0).score(obs)
    q = obs.queries_pre_rope.reshape(1, 2, 2, 3, -1).mean(dim=(2, 3))  # [B, H_kv, d]
    cos = F.cosine_similarity(obs.keys_pre_rope, q[:, :, None, :], dim=-1)
    expected = naive_normalise(cos, obs)
    mask = check_overrides(scores, obs)[:, None, :].expand_as(scores)
    torch.testing.assert_close(scores[mask].double(), expected[mask], atol=1e-5, rtol=1e-5)


def test_streaming_is_sinks_plus_exponential_recency() -> None:
    obs = make_obs(n_tokens=30, window=4, n_sink=3)
    scores = StreamingScorer(recency_fraction=0.2).score(obs)
    pos = torch.arange(30, dtype=torch.float64)
    prior = torch.exp(-(29 - pos) / (0.2 * 30))
    expected = naive_normalise(prior.expand(1, 2, 30), obs)
    mask = check_overrides(scores, obs)
    torch.testing.assert_close(scores[0][:, mask[0]].double(), expected[0][:, mask[0]])
    # Recency: among candidates, later tokens never score lower.
    cand = scores[0, 0, mask[0]]
    assert torch.all(cand[1:] >= cand[:-1])
    assert torch.equal(scores[:, 0], scores[:, 1])
    # Prompt-guided with only the prior weight is the streaming scorer.
    pg = PromptGuidedScorer(alpha=0.0, beta=0.0, gamma=1.0, recency_fraction=0.2).score(obs)
    torch.testing.assert_close(pg, scores)


def test_key_norm_prefers_small_keys() -> None:
    obs = make_obs(kv_heads=1, group=1, n_tokens=10, window=2, n_sink=1)
    norms = torch.arange(10, 0, -1, dtype=torch.float32)  # token 1 largest candidate norm, token 7 smallest
    obs.keys = F.normalize(obs.keys, dim=-1) * norms[None, None, :, None]
    scores = KeyNormScorer().score(obs)
    mask = check_overrides(scores, obs)
    cand = scores[0, 0, mask[0]]
    assert cand[0] == 0.0 and cand[-1] == 1.0
    assert torch.all(cand[1:] > cand[:-1])


def test_snapkv_is_prompt_guided_attention_only() -> None:
    obs = make_obs(batch=2, n_tokens=18, pad=[2, 0], seed=5)
    for kernel, mode in [(1, "max"), (5, "max"), (3, "avg")]:
        snap = SnapKVScorer(pool_kernel=kernel, pool=mode).score(obs)
        pg = PromptGuidedScorer(alpha=3.0, beta=0.0, gamma=0.0, pool_kernel=kernel, pool=mode).score(obs)
        torch.testing.assert_close(snap, pg)


def test_weights_are_normalised() -> None:
    obs = make_obs(seed=6)
    a = PromptGuidedScorer(alpha=0.6, beta=0.2, gamma=0.2).score(obs)
    b = PromptGuidedScorer(alpha=6.0, beta=2.0, gamma=2.0).score(obs)
    torch.testing.assert_close(a, b)
    assert PromptGuidedScorer(alpha=6.0, beta=2.0, gamma=2.0).weights == pytest.approx((0.6, 0.2, 0.2))


def test_random_is_seeded_per_layer_and_ignores_global_rng() -> None:
    obs = make_obs(batch=2, pad=[0, 3])
    torch.manual_seed(123)
    a = RandomScorer(seed=7).score(obs)
    state = torch.get_rng_state()
    torch.manual_seed(999)
    b = RandomScorer(seed=7).score(obs)
    torch.manual_seed(123)
    RandomScorer(seed=7).score(obs)
    assert torch.equal(torch.get_rng_state(), state)  # scoring never advances the global RNG
    assert torch.equal(a, b)
    assert not torch.equal(a, RandomScorer(seed=8).score(obs))
    obs.layer_idx = 1
    assert not torch.equal(a, RandomScorer(seed=7).score(obs))
    mask = check_overrides(a, obs)[:, None, :].expand_as(a)
    assert torch.all((a[mask] >= 0) & (a[mask] < 1))


@pytest.mark.parametrize("name", SCORER_NAMES)
def test_sinks_and_window_outrank_everything_under_defaults(name: str) -> None:
    obs = make_obs(batch=2, n_tokens=24, window=5, pad=[0, 6], n_sink=3, seed=8)
    scorer = get_registry().create("scorer", name, {})
    assert isinstance(scorer, Scorer)
    scores = scorer.score(obs)
    assert scores.shape == (2, 2, 24) and scores.dtype == torch.float32
    candidates = check_overrides(scores, obs)
    for b in range(2):
        cand = scores[b][:, candidates[b]]
        prot = scores[b][:, obs.protected_mask[b]]
        pad = scores[b][:, obs.padding_mask[b]]
        assert prot.min() > cand.max()
        if pad.numel():
            assert pad.max() < cand.min()
        assert cand.min() >= 0 and cand.max() <= 1


@pytest.mark.parametrize("name", ["prompt_guided", "snapkv", "key_norm", "streaming"])
def test_left_padding_does_not_change_a_row(name: str) -> None:
    """A left-padded row scores its real tokens exactly as the same sequence alone."""
    padded = make_obs(batch=2, n_tokens=20, window=4, pad=[0, 7], seed=9)
    alone = LayerObservation(
        layer_idx=0,
        keys=padded.keys[1:, :, 7:],
        values=padded.values[1:, :, 7:],
        queries=padded.queries[1:],
        keys_pre_rope=padded.keys_pre_rope[1:, :, 7:],
        queries_pre_rope=padded.queries_pre_rope[1:],
        window_idx=padded.window_idx - 7,
        positions=padded.positions[1:, 7:],
        n_original=13,
        n_sink=padded.n_sink,
    )
    scorer = get_registry().create("scorer", name, {})
    both = scorer.score(padded)
    assert torch.all(both[1, :, :7] == _common.PADDING_SCORE)
    torch.testing.assert_close(both[1:, :, 7:], scorer.score(alone), atol=1e-5, rtol=1e-5)


def test_padding_window_queries_are_ignored() -> None:
    """A row shorter than the window: padding slots inside the window ask nothing and get -1."""
    obs = make_obs(batch=2, n_tokens=10, window=6, pad=[0, 7], seed=10)
    scores = PromptGuidedScorer().score(obs)
    assert torch.isfinite(scores).all()
    check_overrides(scores, obs)
    assert torch.all(scores[1, :, :7] == _common.PADDING_SCORE)
    assert torch.all(scores[1, :, 7:] == _common.PROTECTED_SCORE)


def test_all_equal_keys_give_constant_terms_zero() -> None:
    obs = make_obs(kv_heads=1, group=2, n_tokens=12, seed=11)
    obs.keys = torch.ones_like(obs.keys)
    obs.keys_pre_rope = torch.ones_like(obs.keys_pre_rope)
    # Attention over identical keys is flat (bar the causal mask), content relevance is constant.
    scores = PromptGuidedScorer(alpha=0.0, beta=1.0, gamma=0.0).score(obs)
    mask = check_overrides(scores, obs)
    assert torch.all(scores[0][:, mask[0]] == 0.0)
    assert torch.all(KeyNormScorer().score(obs)[0][:, mask[0]] == 0.0)


def test_chunked_window_attention_equals_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    obs = make_obs(batch=2, kv_heads=4, group=2, n_tokens=16, pad=[0, 3], seed=12)
    whole = _common.window_attention(obs)
    monkeypatch.setattr(_common, "_LOGIT_ELEMENTS_PER_CHUNK", 1)  # one KV head at a time
    torch.testing.assert_close(_common.window_attention(obs), whole)


magnitudes = st.sampled_from([0.0, 1e-38, 1e-20, 1e-3, 1.0, 1e3, 1e20, 1e30, 3e38])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(SCORER_NAMES),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    n_tokens=st.integers(1, 12),
    window=st.integers(0, 4),
    head_dim=st.sampled_from([1, 4, 8]),
    pad=st.integers(0, 12),
    n_sink=st.integers(0, 4),
    key_scale=magnitudes,
    query_scale=magnitudes,
    equal_keys=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_scores_are_finite_for_any_finite_input(
    name: str,
    batch: int,
    kv_heads: int,
    group: int,
    n_tokens: int,
    window: int,
    head_dim: int,
    pad: int,
    n_sink: int,
    key_scale: float,
    query_scale: float,
    equal_keys: bool,
    seed: int,
) -> None:
    window = min(window, n_tokens)
    obs = make_obs(
        batch=batch,
        kv_heads=kv_heads,
        group=group,
        n_tokens=n_tokens,
        window=window,
        head_dim=head_dim,
        pad=[min(pad, n_tokens)] + [0] * (batch - 1),
        n_sink=n_sink,
        seed=seed,
    )
    obs.keys = (obs.keys * key_scale).clamp(-3e38, 3e38)
    obs.keys_pre_rope = (obs.keys_pre_rope * key_scale).clamp(-3e38, 3e38)
    obs.queries = (obs.queries * query_scale).clamp(-3e38, 3e38)
    obs.queries_pre_rope = (obs.queries_pre_rope * query_scale).clamp(-3e38, 3e38)
    if equal_keys:
        obs.keys = torch.full_like(obs.keys, key_scale)
        obs.keys_pre_rope = torch.full_like(obs.keys_pre_rope, key_scale)
    scores = get_registry().create("scorer", name, {}).score(obs)
    assert scores.shape == (batch, kv_heads, n_tokens)
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    candidates = check_overrides(scores, obs)[:, None, :].expand_as(scores)
    assert torch.all((scores[candidates] >= 0) & (scores[candidates] <= 1))


def test_shape_mismatch_is_refused() -> None:
    obs = make_obs()
    obs.positions = obs.positions[:, :-1]
    with pytest.raises(ValueError, match="positions must be"):
        PromptGuidedScorer().score(obs)
    obs = make_obs(kv_heads=2, group=2)
    obs.queries = obs.queries[:, :3]
    with pytest.raises(ValueError, match="multiple of KV heads"):
        SnapKVScorer().score(obs)


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("prompt_guided", {"alpha": 0, "beta": 0, "gamma": 0}, "alpha + beta + gamma must be > 0"),
        ("prompt_guided", {"alpha": -0.1}, "scorer.alpha"),
        ("prompt_guided", {"pool_kernel": 4}, "scorer.pool_kernel"),
        ("prompt_guided", {"pool_kernel": 0}, "scorer.pool_kernel"),
        ("prompt_guided", {"pool": "min"}, "scorer.pool"),
        ("prompt_guided", {"recency_fraction": 0.0}, "scorer.recency_fraction"),
        ("prompt_guided", {"alpha": "0.5"}, "scorer.alpha"),
        ("prompt_guided", {"window": 8}, "scorer.window"),
        ("snapkv", {"pool_kernel": 2}, "scorer.pool_kernel"),
        ("streaming", {"recency_fraction": -1.0}, "scorer.recency_fraction"),
        ("key_norm", {"p": 2}, "scorer.p"),
        ("random", {"seed": -1}, "scorer.seed"),
        ("random", {"seed": 1.5}, "scorer.seed"),
    ],
)
def test_bad_config_is_refused(name: str, params: dict, field: str) -> None:
    with pytest.raises(ComponentError, match=field.replace("+", r"\+").replace(".", r"\.")):
        get_registry().create("scorer", name, params)


def test_config_and_keywords_are_exclusive() -> None:
    from kvcomp_plugins.scorers import PromptGuidedConfig

    assert PromptGuidedScorer(PromptGuidedConfig(alpha=1.0)).config.alpha == 1.0
    with pytest.raises(ValueError, match="not both"):
        PromptGuidedScorer(PromptGuidedConfig(), alpha=1.0)


def test_components_are_registered_by_kvcomp() -> None:
    registry = get_registry()
    for name in SCORER_NAMES:
        spec = registry.get("scorer", name)
        assert spec.distribution == "kvcomp"
        assert spec.module.startswith("kvcomp_plugins.scorers.")
        assert spec.description
    spec = registry.get("propagator", "selective")
    assert spec.distribution == "kvcomp"
    assert spec.module == "kvcomp_plugins.propagators.selective"
    assert set(SCORER_NAMES) <= set(registry.names("scorer"))


def test_pre_rope_tensors_are_computed_only_when_a_scorer_reads_them():
    """The model hands them over as functions: the default scorer never calls them (a pass over
    every key of every layer saved in prefill), a content scorer calls each once."""
    base = make_obs()
    calls = []

    def lazy(tensor):
        return lambda: calls.append(1) or tensor

    obs = dataclasses.replace(base, keys_pre_rope=lazy(base.keys_pre_rope), queries_pre_rope=lazy(base.queries_pre_rope))
    PromptGuidedScorer(alpha=1.0, beta=0.0, gamma=0.0).score(obs)  # the default preset's weights
    assert calls == []
    with_content = PromptGuidedScorer(alpha=0.5, beta=0.5, gamma=0.0)
    torch.testing.assert_close(with_content.score(obs), with_content.score(base))
    assert len(calls) == 2  # once each, then kept


@pytest.mark.parametrize(
    "kwargs",
    [dict(batch=2, kv_heads=3, group=3, n_tokens=40, window=5, pad=[0, 7]), dict(n_tokens=300, window=19, head_dim=64)],
)
def test_window_attention_in_c_is_the_torch_reference(kwargs, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcomp_plugins import native

    if not native.available():
        pytest.skip("the C kernels cannot be built here (no compiler)")
    obs = make_obs(seed=4, **kwargs)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the kernel's loops without a team, then shared by two threads
        one = _common.window_attention(obs)
        torch.set_num_threads(2)
        two = _common.window_attention(obs)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(native, "available", lambda: False)
    reference = _common.window_attention(obs)
    # Same maths; only the order of float32 additions (and a polynomial exp, ~3e-7 relative) differs.
    for in_c in (one, two):
        torch.testing.assert_close(in_c, reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pooling_and_normalising_in_c_are_the_torch_reference(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcomp_plugins import native

    if not native.available():
        pytest.skip("the C kernels cannot be built here (no compiler)")
    gen = torch.Generator().manual_seed(9)
    scores = torch.rand(2, 3, 50, generator=gen)
    mask = torch.rand(2, 50, generator=gen) > 0.3
    mask[1] = False  # a row without candidates: nothing pooled, a constant term
    in_c = [_common.pool_tokens(scores, mask, 5, mode), _common.minmax_normalise(scores, mask)]
    monkeypatch.setattr(native, "available", lambda: False)
    reference = [_common.pool_tokens(scores, mask, 5, mode), _common.minmax_normalise(scores, mask)]
    for got, want in zip(in_c, reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert torch.all(in_c[1][1] == 0)
