"""The ``kvcomp`` attention implementation registered with transformers.

Outside a compressed pass it is exactly transformers' SDPA attention (same mask function), so a
model loaded with it behaves like an ordinary ``sdpa`` model. Inside a pass it does two more things:

- during compressed prefill it hands the layer's post-RoPE window queries, keys and values to the
  prefill loop (:func:`capture_prefill`), which compresses them right after the layer;
- while decoding on a :class:`~kvcore.cache.CompressedKVCache` it hands the queries to the cache
  layer, which attends straight from the packed tiers and masks by the *original* positions of
  the stored tokens (:meth:`~kvcore.cache.CompressedKVLayer.attend`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "kvcomp"


@dataclass
class PrefillCapture:
    """Filled by the attention function for the layer currently running in compressed prefill."""

    window_idx: Tensor
    queries: Tensor | None = None  # [B, H, W, d] post-RoPE
    keys: Tensor | None = None  # [B, H_kv, N, d] post-RoPE
    values: Tensor | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def clear(self) -> None:
        self.queries = self.keys = self.values = None


_CAPTURE: contextvars.ContextVar[PrefillCapture | None] = contextvars.ContextVar("kvcomp_capture", default=None)
_DECODE_CACHE: contextvars.ContextVar[object | None] = contextvars.ContextVar("kvcomp_cache", default=None)


@contextlib.contextmanager
def capture_prefill(capture: PrefillCapture) -> Iterator[PrefillCapture]:
    token = _CAPTURE.set(capture)
    try:
        yield capture
    finally:
        _CAPTURE.reset(token)


@contextlib.contextmanager
def decoding_on(cache: object | None) -> Iterator[None]:
    token = _DECODE_CACHE.set(cache)
    try:
        yield
    finally:
        _DECODE_CACHE.reset(token)


def kvcomp_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    window_rows: Tensor | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """Attention for ``query [B, H, q, d]`` over ``key/value [B, H_kv, n, d]``; returns ``[B, q, H, d]``.

    ``window_rows`` (int ``[W]``, only from the prefill loop): where the window's queries lie in
    ``query`` when it holds only some rows of the stream; by default they lie at the window indices.
    """
    capture = _CAPTURE.get()
    if capture is not None:
        capture.queries = query[:, :, capture.window_idx if window_rows is None else window_rows]
        capture.keys, capture.values = key, value
    cache = _DECODE_CACHE.get()
    if cache is not None:
        layer = cache.layer(module.layer_idx)  # type: ignore[attr-defined]
        if layer.pending_queries:
            # Attention over the packed tiers and the dense store; ``key``/``value`` are only the
            # new tokens, already stored by the cache's update().
            return layer.attend(query, scaling if scaling is not None else query.shape[-1] ** -0.5), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, kvcomp_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
