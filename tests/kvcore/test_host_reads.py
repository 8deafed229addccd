"""Compressed prefill and decode read tensor values on the host a fixed number of times per prompt
(per stream between two thinnings), never once per layer or per decode step; a layer's split
sorts twice, what depends on the stream alone is sorted once per stream.

On a GPU each such read (``int(t.max())``, ``bool(t.any())``, ``nonzero``) makes the host wait
for every queued kernel, so a read per layer would stop the host from launching ahead of the
device. A CPU has no such wait, so the reads are counted here instead of timed: a torch function
mode sees every one, whatever device the tensors are on.
"""

from __future__ import annotations

import collections
import gc

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kvcore.config import CompressionConfig
from kvcore.model import CompressedLlamaForCausalLM
from kvcomp_plugins.memo import LastRead

from tiny_models import SHORT_PROMPT_PROPAGATION, tiny_config

HOST_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.Tensor.__float__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu, torch.Tensor.numpy,
}


SORTS = {torch.sort, torch.argsort, torch.Tensor.sort, torch.Tensor.argsort, torch.topk, torch.Tensor.topk}


class CountCalls(TorchFunctionMode):
    def __init__(self, funcs: set) -> None:  # type: ignore[type-arg]
        super().__init__()
        self.funcs = funcs
        self.reads: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in self.funcs:
            self.reads[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _reads(layers: int, config: CompressionConfig, batch: int, funcs: set = HOST_READS) -> tuple[int, int]:  # type: ignore[type-arg]
    """Calls of ``funcs`` (host reads) in one prefill (after a warm-up one) and in 4 decode steps."""
    torch.manual_seed(0)
    model = CompressedLlamaForCausalLM(tiny_config(num_hidden_layers=layers)).eval()
    model.set_compression(config)
    ids = torch.randint(3, 98, (batch, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, cache=model.new_cache(), use_cache=True, logits_to_keep=1)
        with CountCalls(funcs) as prefill:
            out = model(input_ids=ids, cache=model.new_cache(), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        model(input_ids=token, cache=out.cache, use_cache=True)  # the first step opens the dense store
        with CountCalls(funcs) as decode:
            for _ in range(4):
                model(input_ids=token, cache=out.cache, use_cache=True)
    return sum(prefill.reads.values()), sum(decode.reads.values())


@pytest.mark.parametrize(
    ("preset", "overrides", "batch"),
    [
        ("default", {}, 1),
        ("default", {}, 2),
        ("default", {"quantizer.protected_bits": 4}, 1),
        ("fast", {"propagator.keep_ratio_by_layer": {1: 0.6, 2: 0.4}, **SHORT_PROMPT_PROPAGATION}, 1),
    ],
    ids=["default", "default-batch2", "protected-tier", "fast"],
)
def test_host_reads_do_not_grow_with_the_layers(preset: str, overrides: dict, batch: int) -> None:
    # The torch backend: the one a GPU runs apart from the Triton kernels (the CPU kernels in C
    # read their inputs on the host anyway).
    config = CompressionConfig.from_preset(preset).with_overrides({"quantizer.backend": "torch", **overrides})
    few, many = _reads(4, config, batch), _reads(12, config, batch)
    assert few == many, f"host reads (prefill, decode) with 4 layers {few}, with 12 layers {many}"
    assert many[1] == 0, "a decode step reads nothing on the host"
    assert many[0] <= 4 + 3 * 2, "at most a few per prompt and per thinning"


def test_a_layer_sorts_twice_and_a_stream_sorts_its_slots_once() -> None:
    # Sorting is several kernels on a GPU. The slots' split into residual and candidates depends on
    # the stream alone (three sorts), so it is made once per stream; a layer ranks its candidates
    # (one sort) and puts every tier in position order (one sort for all tiers).
    config = CompressionConfig.from_preset("default").with_overrides({"quantizer.backend": "torch"})
    few, many = _reads(4, config, 1, SORTS)[0], _reads(12, config, 1, SORTS)[0]
    assert (many - few) == 2 * (12 - 4), f"sorts per prefill: {few} with 4 layers, {many} with 12"
    assert few - 2 * 4 == 3, "the stream's own sorts"


def test_the_scorer_builds_its_window_view_once_per_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    # The window queries' positions, weights and visibility mask depend on the stream alone.
    from kvcomp_plugins.scorers import _common

    built = []
    view = _common._window_view
    monkeypatch.setattr(_common, "_window_view", lambda *a, **k: built.append(1) or view(*a, **k))
    config = CompressionConfig.from_preset("default").with_overrides({"quantizer.backend": "torch"})
    _reads(4, config, 1)
    few = len(built)
    built.clear()
    _reads(12, config, 1)
    assert few == len(built) == 2, "one per prefill (a warm-up and the counted one), whatever the depth"


def test_last_read_is_remembered_for_the_same_unchanged_tensors_only() -> None:
    memo: LastRead[int] = LastRead()
    calls = []

    def read(t: torch.Tensor) -> int:
        calls.append(1)
        return int(t.sum())

    a = torch.ones(3, dtype=torch.int64)
    assert memo.get([a], (1,), lambda: read(a)) == 3
    assert memo.get([a], (1,), lambda: read(a)) == 3 and len(calls) == 1
    assert memo.get([a], (2,), lambda: read(a)) == 3 and len(calls) == 2  # another extra key
    a.add_(1)  # changed in place: its version moves on
    assert memo.get([a], (2,), lambda: read(a)) == 6 and len(calls) == 3
    b = a.clone()  # equal values, another object
    assert memo.get([b], (2,), lambda: read(b)) == 6 and len(calls) == 4
    del a, b
    gc.collect()
    c = torch.full((3,), 5, dtype=torch.int64)  # may reuse a freed object's id: not mistaken for it
    assert memo.get([c], (2,), lambda: read(c)) == 15 and len(calls) == 5
