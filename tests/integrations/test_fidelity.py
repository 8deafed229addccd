"""Fidelity to the uncompressed model: next-token KL, greedy agreement, output ROUGE-L."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcomp_eval.metrics.fidelity import (
    FidelityMetrics,
    greedy_exact_match,
    next_token_kl,
    output_rouge_l,
    prefix_agreement,
)
from kvcore.types import GenerationResult


def test_kl_hand_computed() -> None:
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert float(next_token_kl(p, q)) == pytest.approx(expected, abs=1e-7)
    assert float(next_token_kl(p, p)) == 0.0
    assert next_token_kl(p, q).dtype == torch.float64
    assert next_token_kl(p, q).shape == ()


def test_kl_zero_probabilities() -> None:
    p = torch.tensor([1.0, 0.0]).log()  # [0, -inf]
    q = torch.tensor([0.5, 0.5]).log()
    # The token the reference never emits contributes nothing: KL = ln 2.
    assert float(next_token_kl(p, q)) == pytest.approx(math.log(2.0))
    # The compressed model rules out the reference's only token: infinite divergence.
    assert math.isinf(float(next_token_kl(q, p)))


def test_kl_batched_rows() -> None:
    ref = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), dim=-1)
    cmp = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]]), dim=-1)
    kl = next_token_kl(ref, cmp)
    assert kl.shape == (2,)
    assert float(kl[0]) == pytest.approx(0.0, abs=1e-9)
    assert float(kl[1]) > 0.0


def test_kl_refuses_bad_input() -> None:
    p = torch.tensor([0.5, 0.5]).log()
    with pytest.raises(ValueError, match="shapes differ"):
        next_token_kl(p, torch.tensor([0.2, 0.3, 0.5]).log())
    with pytest.raises(ValueError, match="not normalised"):
        next_token_kl(torch.tensor([1.0, 2.0]), p)  # logits, not log-probs
    with pytest.raises(ValueError, match="floating-point"):
        next_token_kl(torch.tensor([0, 0]), torch.tensor([0, 0]))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=2, max_size=12).flatmap(
        lambda a: st.tuples(st.just(a), st.lists(st.floats(-5, 5), min_size=len(a), max_size=len(a)))
    )
)
def test_kl_is_nonnegative_and_zero_on_itself(pair: tuple[list[float], list[float]]) -> None:
    ref = torch.log_softmax(torch.tensor(pair[0], dtype=torch.float64), dim=-1)
    cmp = torch.log_softmax(torch.tensor(pair[1], dtype=torch.float64), dim=-1)
    assert float(next_token_kl(ref, cmp)) >= 0.0
    assert float(next_token_kl(ref, ref)) == pytest.approx(0.0, abs=1e-12)


def test_greedy_agreement_hand_computed() -> None:
    assert greedy_exact_match([1, 2, 3], [1, 2, 3])
    assert not greedy_exact_match([1, 2, 3], [1, 2])
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 3, 4, 5]) == 1.0
    assert prefix_agreement([1, 2], [7]) == 0.0
    assert prefix_agreement([], []) == 1.0
    assert prefix_agreement([], [1]) == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=10), st.lists(st.integers(0, 4), max_size=10))
def test_prefix_agreement_laws(ref: list[int], cmp: list[int]) -> None:
    value = prefix_agreement(ref, cmp)
    assert 0.0 <= value <= 1.0
    assert (value == 1.0) == (cmp[: len(ref)] == ref and (bool(ref) or not cmp))


def test_output_rouge_l() -> None:
    assert output_rouge_l("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)


def _gen(ids: list[int], text: str, logits: list[float] | None) -> GenerationResult:
    return GenerationResult(
        text=text,
        token_ids=ids,
        prompt_tokens=10,
        kv_bytes=100,
        kv_bytes_fp16_full=400,
        avg_bits=4.0,
        tokens_kept_per_layer=[10],
        ttft_s=0.1,
        decode_tokens_per_s=50.0,
        peak_rss_bytes=1,
        first_token_logprobs=None if logits is None else torch.log_softmax(torch.tensor(logits), dim=-1),
    )


def test_fidelity_metrics_from_pairs() -> None:
    ref = [_gen([1, 2, 3, 4], "a b c d", [0.0, 0.0]), _gen([5, 6], "x y", [0.0, 0.0])]
    cmp = [_gen([1, 2, 3, 4], "a b c d", [0.0, 0.0]), _gen([5, 7], "x z", [math.log(3.0), 0.0])]
    one = FidelityMetrics.from_pair(ref[1], cmp[1])
    # KL([1/2, 1/2] || [3/4, 1/4]) = 0.5 ln(2/3) + 0.5 ln 2
    assert one.next_token_kl == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2), abs=1e-6)
    assert one.exact_match == 0.0 and one.prefix_agreement == 0.5 and one.rouge_l == 0.5
    mean = FidelityMetrics.from_pairs(ref, cmp)
    assert mean.n == 2
    assert mean.exact_match == 0.5
    assert mean.prefix_agreement == pytest.approx(0.75)
    assert mean.rouge_l == pytest.approx(0.75)
    assert mean.next_token_kl == pytest.approx(one.next_token_kl / 2)
    assert FidelityMetrics.from_pair(_gen([1], "a", None), _gen([1], "a", [0.0])).next_token_kl is None
    assert mean.to_dict()["n"] == 2


def test_fidelity_metrics_refuses_misaligned_lists() -> None:
    with pytest.raises(ValueError, match="1 reference results vs 0"):
        FidelityMetrics.from_pairs([_gen([1], "a", None)], [])
    with pytest.raises(ValueError, match="no result pairs"):
        FidelityMetrics.from_pairs([], [])
