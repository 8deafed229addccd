"""Laws of the selective propagator."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcomp_plugins.propagators import SelectiveConfig, SelectivePropagator
from kvcore.protocols import Propagator
from kvcore.registry import ComponentError, get_registry


def make_propagator(schedule: dict, aggregation: str = "mean") -> SelectivePropagator:
    params = {"keep_ratio_by_layer": schedule, "aggregation": aggregation}
    prop = get_registry().create("propagator", "selective", params)
    assert isinstance(prop, Propagator)
    return prop


def make_inputs(
    batch: int, n_tokens: int, *, pad: list[int] | None = None, window: int = 4, n_sink: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores ``[B, 2, N]``, positions ``[B, N]`` (left padding ``pad[b]``) and the protected mask."""
    pad = pad or [0] * batch
    positions = torch.full((batch, n_tokens), -1, dtype=torch.int64)
    for b, p in enumerate(pad):
        positions[b, p:] = torch.arange(n_tokens - p)
    protected = (positions >= 0) & (positions < n_sink)
    protected[:, n_tokens - window :] = True
    protected &= positions >= 0
    scores = torch.rand(batch, 2, n_tokens, generator=torch.Generator().manual_seed(seed))
    return scores, positions, protected


def test_kept_counts_follow_the_schedule_through_layers() -> None:
    prop = make_propagator({2: 0.5, 5: 0.25, 7: 0.25})
    n_original = 100
    scores, positions, protected = make_inputs(2, n_original)
    kept_after = {}
    for layer in range(9):
        keep = prop.select(layer, scores, positions, protected, n_original)
        assert (keep is not None) == (layer in (2, 5)), layer  # at 7 the 25 tokens already fit
        if keep is None:
            continue
        assert keep.dtype == torch.int64
        scores = scores.gather(2, keep[:, None, :].expand(-1, scores.shape[1], -1))
        positions = positions.gather(1, keep)
        protected = protected.gather(1, keep)
        kept_after[layer] = positions.shape[1]
    assert kept_after == {2: 50, 5: 25}
    assert torch.all(positions[:, 1:] > positions[:, :-1])
    assert protected.sum(dim=1).tolist() == [6, 6]


@settings(max_examples=50, deadline=None)
@given(
    ratios=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=3),
    n_tokens=st.integers(8, 60),
    batch=st.integers(1, 3),
    window=st.integers(0, 6),
    n_sink=st.integers(0, 4),
    use_scores=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_selection_laws(
    ratios: list[float], n_tokens: int, batch: int, window: int, n_sink: int, use_scores: bool, seed: int
) -> None:
    ratios = sorted(ratios, reverse=True)
    if batch > 1:
        # select()'s contract: in a batch each row's last token is protected (its position + 1
        # is the row's length once earlier layers have thinned the stream).
        window = max(window, 1)
    schedule = {3 * i + 1: r for i, r in enumerate(ratios)}
    prop = make_propagator(schedule)
    scores, positions, protected = make_inputs(batch, n_tokens, window=window, n_sink=n_sink, seed=seed)
    scores = scores if use_scores else None
    for layer, ratio in schedule.items():
        keep = prop.select(layer, scores, positions, protected, n_tokens)
        n_protected = int(protected.sum(dim=1).max())
        expected = min(max(math.ceil(round(ratio * n_tokens, 9)), n_protected), positions.shape[1])
        if keep is None:
            assert expected == positions.shape[1]
            continue
        assert keep.shape == (batch, expected)
        # Indices ascend, so the kept positions stay sorted and are the original ones.
        assert torch.all(keep[:, 1:] > keep[:, :-1])
        kept_pos = positions.gather(1, keep)
        assert torch.all(kept_pos[:, 1:] > kept_pos[:, :-1])
        # Every protected token continues.
        assert torch.all(protected.gather(1, keep).sum(dim=1) == protected.sum(dim=1))
        # Every dropped candidate ranks no higher than every kept candidate.
        value = scores.mean(dim=1) if scores is not None else positions.float()
        for b in range(batch):
            kept = torch.zeros(positions.shape[1], dtype=torch.bool)
            kept[keep[b]] = True
            cand = ~protected[b]
            if (kept & cand).any() and (~kept & cand).any():
                assert value[b][kept & cand].min() >= value[b][~kept & cand].max()
        if scores is not None:
            scores = scores.gather(2, keep[:, None, :].expand(-1, scores.shape[1], -1))
        positions, protected = kept_pos, protected.gather(1, keep)


def test_highest_mean_score_wins_and_max_aggregation_differs() -> None:
    positions = torch.arange(8)[None]
    protected = torch.zeros(1, 8, dtype=torch.bool)
    protected[0, 7] = True
    scores = torch.zeros(1, 2, 8)
    scores[0, 0, 2] = 1.0  # one head loves token 2
    scores[0, 0, 4] = scores[0, 1, 4] = 0.6  # both heads like token 4
    mean_keep = make_propagator({0: 0.25}, "mean").select(0, scores, positions, protected, 8)
    max_keep = make_propagator({0: 0.25}, "max").select(0, scores, positions, protected, 8)
    assert mean_keep.tolist() == [[4, 7]]
    assert max_keep.tolist() == [[2, 7]]


def test_no_scores_keeps_the_most_recent() -> None:
    _, positions, protected = make_inputs(1, 20, window=3, n_sink=2)
    keep = make_propagator({0: 0.5}).select(0, None, positions, protected, 20)
    assert keep.tolist() == [[0, 1] + list(range(12, 20))]


def test_a_padded_row_keeps_what_it_keeps_alone_and_fills_up_with_padding() -> None:
    # Row 1 has 10 padding slots: it keeps 0.6 of its own 10 tokens, the long row 0.6 of 20.
    scores, positions, protected = make_inputs(2, 20, pad=[0, 10], window=4, n_sink=2)
    scores[1, :, :10] = 100.0  # even absurd scores on padding do not make it a real choice
    scores[1, 0, 3] = float("nan")
    prop = make_propagator({0: 0.7})
    keep = prop.select(0, scores, positions, protected, 20)
    assert keep.shape == (2, 14)
    kept_pos = positions.gather(1, keep)
    assert (kept_pos[0] >= 0).all() and int((kept_pos[1] >= 0).sum()) == 7
    alone = prop.select(0, scores[1:, :, 10:], positions[1:, 10:], protected[1:, 10:], 10)
    assert kept_pos[1][kept_pos[1] >= 0].tolist() == positions[1:, 10:].gather(1, alone)[0].tolist()


def test_protected_tokens_raise_n_keep() -> None:
    scores, positions, protected = make_inputs(2, 30, window=8, n_sink=4)
    keep = make_propagator({0: 0.1}).select(0, scores, positions, protected, 30)
    assert keep.shape == (2, 12)
    assert torch.equal(positions.gather(1, keep), positions[:, protected[0]])


def test_unscheduled_layers_and_full_keep_return_none() -> None:
    prop = make_propagator({3: 1.0})
    scores, positions, protected = make_inputs(1, 10)
    assert not prop.acts_after(2) and prop.acts_after(3)
    assert prop.select(2, scores, positions, protected, 10) is None
    assert prop.select(3, scores, positions, protected, 10) is None


def test_ratio_refers_to_the_original_length() -> None:
    prop = make_propagator({1: 0.3})
    scores, positions, protected = make_inputs(1, 10, window=1, n_sink=0)
    assert prop.select(1, scores, positions, protected, 10).shape == (1, 3)  # not 4 from 0.3 * 10 rounding
    assert prop.select(1, scores, positions, protected, 40) is None  # ceil(0.3 * 40) = 12 > N = 10


def test_min_keep_tokens_leaves_short_prompts_whole_and_floors_long_ones() -> None:
    prop = get_registry().create("propagator", "selective", {"keep_ratio_by_layer": {1: 0.25}, "min_keep_tokens": 16})
    scores, positions, protected = make_inputs(1, 40, window=1, n_sink=0)
    assert prop.select(1, scores[..., :12], positions[:, :12], protected[:, :12], 12) is None  # 12 <= 16: untouched
    assert prop.select(1, scores, positions, protected, 40).shape == (1, 16)  # not ceil(0.25 * 40) = 10
    assert prop.n_keep(1, 400) == 100  # long prompts follow the ratio
    with pytest.raises(ComponentError, match=r"propagator\.min_keep_tokens"):
        get_registry().create("propagator", "selective", {"keep_ratio_by_layer": {1: 0.5}, "min_keep_tokens": -1})


def test_keep_first_tokens_keeps_the_prompt_start_by_position_whatever_the_scores() -> None:
    prop = get_registry().create("propagator", "selective", {"keep_ratio_by_layer": {1: 0.5}, "keep_first_tokens": 6})
    scores, positions, protected = make_inputs(2, 20, pad=[0, 4], window=2, n_sink=0)
    scores[:, :, :10] = -1.0  # the start scores lowest everywhere: only its positions keep it
    keep = prop.select(1, scores, positions, protected, 20)
    assert keep is not None and keep.shape == (2, 10)
    for row in range(2):  # positions 0-5, wherever the row's padding puts them
        assert set(range(6)) <= set(positions[row, keep[row]].tolist()), row
    # Without the option the same scores drop the start (the other tokens outscore it).
    plain = make_propagator({1: 0.5}).select(1, scores, positions, protected, 20)
    assert not set(range(6)) & set(positions[0, plain[0]].tolist())
    with pytest.raises(ComponentError, match=r"propagator\.keep_first_tokens"):
        get_registry().create("propagator", "selective", {"keep_ratio_by_layer": {1: 0.5}, "keep_first_tokens": -1})


def test_bad_shapes_are_refused() -> None:
    scores, positions, protected = make_inputs(2, 10)
    prop = make_propagator({0: 0.5})
    with pytest.raises(ValueError, match="protected must be"):
        prop.select(0, scores, positions, protected[:, :5], 10)
    with pytest.raises(ValueError, match="scores must be"):
        prop.select(0, scores[:1], positions, protected, 10)


def test_json_digit_keys_are_read_as_layers() -> None:
    prop = make_propagator({"16": 0.25, "8": 0.5})
    assert prop.config.keep_ratio_by_layer == {8: 0.5, 16: 0.25}
    assert list(prop.config.keep_ratio_by_layer) == [8, 16]


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({8: 0}, r"layer 8: keep ratio 0\.0 is out of range; ratios lie in \(0, 1\]"),
        ({8: 1.5}, r"layer 8: keep ratio 1\.5 is out of range"),
        ({8: float("nan")}, r"layer 8: keep ratio nan is out of range"),
        ({8: 0.25, 16: 0.5}, r"layer 16: keep ratio 0\.5 is larger than 0\.25 at earlier layer 8"),
        ({-1: 0.5}, r"layer -1 is negative; layer indices are integers >= 0"),
        ({"-2": 0.5}, r"layer -2 is negative"),
        ({"eight": 0.5}, r"layer 'eight' is not a layer index"),
        ({1.0: 0.5}, r"layer 1\.0 is not a layer index"),
        ({True: 0.5}, r"layer True is not a layer index"),
        ({"8": 0.5, 8: 0.4}, r"layer 8 appears twice"),
        ({}, r"the schedule is empty"),
        ({8: "0.5"}, r"keep_ratio_by_layer\.8: Input should be a valid number"),
    ],
)
def test_bad_schedules_are_refused(schedule: dict, message: str) -> None:
    with pytest.raises(ComponentError) as info:
        get_registry().create("propagator", "selective", {"keep_ratio_by_layer": schedule})
    text = str(info.value)
    assert "propagator.keep_ratio_by_layer" in text
    assert re.search(message, text), text


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "propagator.keep_ratio_by_layer: Field required"),
        ({"keep_ratio_by_layer": {8: 0.5}, "aggregation": "median"}, "propagator.aggregation"),
        ({"keep_ratio_by_layer": {8: 0.5}, "ratio": 0.5}, "propagator.ratio"),
        ({"keep_ratio_by_layer": [0.5]}, "propagator.keep_ratio_by_layer"),
    ],
)
def test_other_bad_fields_are_refused(params: dict, field: str) -> None:
    with pytest.raises(ComponentError, match=field.replace(".", r"\.")):
        get_registry().create("propagator", "selective", params)


def test_check_model_refuses_layers_beyond_the_model() -> None:
    prop = make_propagator({8: 0.5, 30: 0.25})
    prop.check_model(num_layers=31, head_dim=64)
    with pytest.raises(ValueError, match=r"layer\(s\) \[30\], but the model has 30 layers; use indices 0\.\.29"):
        prop.check_model(num_layers=30, head_dim=64)


def test_direct_construction_validates_too() -> None:
    assert SelectivePropagator(keep_ratio_by_layer={4: 0.5}).acts_after(4)
    assert SelectivePropagator(SelectiveConfig(keep_ratio_by_layer={4: 0.5})).acts_after(4)
    with pytest.raises(ValueError, match="out of range"):
        SelectivePropagator(keep_ratio_by_layer={4: 0.0})
    with pytest.raises(ValueError, match="not both"):
        SelectivePropagator(SelectiveConfig(keep_ratio_by_layer={4: 0.5}), aggregation="max")
