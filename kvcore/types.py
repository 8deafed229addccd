"""Small typed objects the components exchange.

Shapes use: ``B`` batch, ``H`` query heads, ``H_kv`` KV heads, ``N`` tokens currently in the
residual stream of this layer, ``W`` prompt-window tokens, ``d`` head dim, ``n`` tokens in one
storage tier. Positions are *original* prompt positions (what RoPE saw); ``-1`` marks padding.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch
from torch import Tensor

PADDING_POSITION = -1
"""Position value that marks a padding slot; attention never looks at it."""


class _OnFirstRead:
    """A dataclass field holding a tensor or a zero-argument function that makes it, called on
    the first read and then kept. The pre-RoPE keys and queries cost a pass over every key of a
    layer in prefill; most scorers never read them, so they are only computed when one does.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> Tensor:
        if obj is None:
            raise AttributeError  # to dataclasses: this field has no default
        value = obj.__dict__[self.slot]
        if not isinstance(value, Tensor):
            value = obj.__dict__[self.slot] = value()
        return value

    def __set__(self, obj: Any, value: Tensor | Callable[[], Tensor]) -> None:
        obj.__dict__[self.slot] = value


def materialised(obs: "LayerObservation", name: str) -> Tensor | None:
    """The tensor of a computed-on-first-read field if it exists already, else ``None``
    (for checks that must not trigger the computation)."""
    value = obs.__dict__.get("_" + name)
    return value if isinstance(value, Tensor) else None


@dataclass
class LayerObservation:
    """Everything a scorer may look at for one layer during prefill.

    Attributes:
        layer_idx: index of the decoder layer.
        keys: post-RoPE keys, ``[B, H_kv, N, d]`` (what the cache would store).
        values: values, ``[B, H_kv, N, d]``.
        queries: post-RoPE queries of the prompt window, ``[B, H, W, d]``.
        keys_pre_rope: keys before the rotary embedding, ``[B, H_kv, N, d]`` (may be given as a
            zero-argument function: computed on first read).
        queries_pre_rope: window queries before the rotary embedding, ``[B, H, W, d]`` (likewise).
        window_idx: indices along the ``N`` axis of the window queries, ``[W]``: the window tokens
            of every row (their union when rows differ).
        positions: original position of each token, ``[B, N]`` int64, ``-1`` for padding.
        n_original: prompt length (padding included) before any propagation.
        n_sink: the first ``n_sink`` positions are attention sinks.
        window_rows: ``[B, N]`` bool, each row's own window when the rows of a batch have
            different questions; ``None``: ``window_idx`` is every row's window.
        protected: the :attr:`protected_mask` already built for these tokens, or ``None``. The
            prefill passes one mask object to every layer between two thinnings, so work that
            depends only on it (and a host read of it on a GPU) is done once per stream.
    """

    layer_idx: int
    keys: Tensor
    values: Tensor
    queries: Tensor
    keys_pre_rope: Tensor = _OnFirstRead()  # type: ignore[assignment]
    queries_pre_rope: Tensor = _OnFirstRead()  # type: ignore[assignment]
    window_idx: Tensor
    positions: Tensor
    n_original: int
    n_sink: int = 4
    window_rows: Tensor | None = None
    protected: Tensor | None = None

    # Cached: several components read the same masks, and on a GPU every extra small op is a
    # kernel launch in the prefill loop. The observation is built once per layer and not mutated.
    @cached_property
    def padding_mask(self) -> Tensor:
        """``[B, N]`` bool, True where the slot is padding."""
        return self.positions < 0

    @cached_property
    def sink_mask(self) -> Tensor:
        """``[B, N]`` bool, True for attention-sink tokens."""
        return (self.positions >= 0) & (self.positions < self.n_sink)

    @cached_property
    def window_mask(self) -> Tensor:
        """``[B, N]`` bool, True for prompt-window tokens."""
        if self.window_rows is not None:
            return self.window_rows & ~self.padding_mask
        # index_fill_ rather than ``mask[:, idx] = True``: on CUDA that index_put_ syncs the host.
        mask = torch.zeros_like(self.positions, dtype=torch.bool).index_fill_(1, self.window_idx.long(), True)
        return mask & ~self.padding_mask

    @cached_property
    def window_query_positions(self) -> Tensor:
        """``[B, W]`` original positions of the window queries; ``-1`` where the query is padding
        or (rows with different windows) not in that row's window, so it counts for nothing."""
        positions = self.positions[:, self.window_idx]
        if self.window_rows is None:
            return positions
        in_row = self.window_rows[:, self.window_idx]
        return torch.where(in_row, positions, torch.full_like(positions, PADDING_POSITION))

    @cached_property
    def protected_mask(self) -> Tensor:
        """``[B, N]`` bool: sinks and window, which are never dropped nor quantised."""
        if self.protected is not None:
            return self.protected
        return self.sink_mask | self.window_mask


@dataclass
class QuantizedTensor:
    """A packed, quantised ``[B, H_kv, n, d]`` tensor.

    ``packed`` is uint8 ``[B, H_kv, n, d * bits // 8]``: 8-bit codes one per byte, 4-bit two per
    byte, 2-bit four per byte, packed along ``d`` with the lowest channel in the lowest bits.
    ``axis`` says how channels were grouped for the asymmetric min-max statistics:

    - ``"token"``: per token, groups of ``group_size`` consecutive channels;
      ``scale``/``zero`` are fp16 ``[B, H_kv, n, d // group_size]``.
    - ``"channel"``: per channel, groups of ``group_size`` consecutive tokens (KIVI-style keys);
      ``scale``/``zero`` are fp16 ``[B, H_kv, ceil(n / group_size), d]``.

    Dequantised value = ``code * scale + zero``.
    """

    packed: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int
    axis: Literal["token", "channel"]
    shape: tuple[int, int, int, int]

    @property
    def nbytes(self) -> int:
        """Real bytes held by the stored tensors."""
        return tensor_bytes(self.packed, self.scale, self.zero)


@dataclass
class KVTier:
    """The tokens one precision tier stores for one layer.

    Every KV head stores the same *number* of tokens (different tokens), so tensors are regular.
    ``positions`` is ``[B, H_kv, n]``: the original position of each stored token, int32 from a
    quantizer, int16 once a cache holds it and every position it can have fits
    (:func:`narrow_positions`).
    """

    bits: int
    positions: Tensor
    keys: QuantizedTensor
    values: QuantizedTensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + tensor_bytes(self.positions)

    @property
    def n_tokens(self) -> int:
        return self.positions.shape[-1]


POSITION_INT16_LIMIT = torch.iinfo(torch.int16).max
"""Caches whose positions stay below this store their tiers' positions as int16."""


def narrow_positions(tier: KVTier, bound: int) -> KVTier:
    """``tier`` with int16 positions when every position is ``< bound <= 32767``, else unchanged.

    A position costs 4 bytes per stored token and KV head as int32, a few percent of a 2- or
    4-bit token's bytes; prompts and generations up to 32k tokens need no more than 2.
    """
    if bound > POSITION_INT16_LIMIT or tier.positions.dtype == torch.int16:
        return tier
    return dataclasses.replace(tier, positions=tier.positions.to(torch.int16))


@dataclass
class CompressedLayer:
    """One layer's compressed KV: quantised tiers plus a full-precision residual part.

    ``residual_keys``/``residual_values`` are ``[B, H_kv, n_r, d]`` in the storage dtype
    (fp16 by default); ``residual_positions`` is int32 ``[B, H_kv, n_r]``.
    """

    tiers: list[KVTier]
    residual_keys: Tensor
    residual_values: Tensor
    residual_positions: Tensor
    dropped_tokens: int = 0

    @property
    def kv_bytes(self) -> int:
        """Real bytes of every stored tensor (codes, scales, zeros, positions, residual)."""
        return sum(t.nbytes for t in self.tiers) + tensor_bytes(
            self.residual_keys, self.residual_values, self.residual_positions
        )

    @property
    def n_tokens(self) -> int:
        """Tokens stored per KV head."""
        return sum(t.n_tokens for t in self.tiers) + self.residual_positions.shape[-1]

    @property
    def tokens_by_bits(self) -> dict[int, int]:
        """Stored tokens per KV head by bit width; 16 stands for the full-precision residual."""
        counts: dict[int, int] = {}
        for tier in self.tiers:
            counts[tier.bits] = counts.get(tier.bits, 0) + tier.n_tokens
        counts[16] = self.residual_positions.shape[-1]
        return counts


@dataclass
class LayerResult:
    """What :meth:`RealTimePrefillCompressor.compress_layer_kv_cache` returns for one layer.

    ``keep_idx`` is ``None`` when every token continues to the next layer, else sorted int64
    indices ``[B, n_keep]`` into the layer's ``N`` axis of the tokens that continue.
    ``scores`` is the importance ``[B, H_kv, N]`` float32 that was used (``None`` if no scorer).
    """

    compressed: CompressedLayer
    keep_idx: Tensor | None = None
    scores: Tensor | None = None
    timings_s: dict[str, float] = field(default_factory=dict)


def tensor_bytes(*tensors: Tensor) -> int:
    """Sum of ``nbytes`` of the given tensors: the one way bytes are counted in kvcomp."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class GenerationResult:
    """One prompt's generation plus what its cache cost.

    ``first_token_logprobs`` is the log-softmax ``[V]`` (float32) of the logits at the end of
    prefill, kept so fidelity (next-token KL to the uncompressed model) can be computed.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    kv_bytes: int
    kv_bytes_fp16_full: int
    avg_bits: float
    tokens_kept_per_layer: list[int]
    ttft_s: float
    decode_tokens_per_s: float
    peak_rss_bytes: int
    first_token_logprobs: Tensor | None = None

    @property
    def compression_ratio(self) -> float:
        """fp16 full-cache bytes divided by stored bytes (higher is smaller)."""
        return self.kv_bytes_fp16_full / max(self.kv_bytes, 1)
