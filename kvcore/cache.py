"""``CompressedKVCache``: a transformers ``Cache`` holding packed tiers plus full-precision tokens.

Per layer it holds what prefill compression produced (quantised tiers + a full-precision residual
of sinks, prompt window and the last prompt tokens). On the first decode step the residual moves
into a *dense store* with spare room, so generated tokens are written in place rather than
concatenated each step (at most ``DENSE_SPARE_TOKENS`` free slots are held, fewer when the
quantizer never keeps that many decoded tokens). When the generated
tokens in it exceed the quantizer's ``residual_length`` (R), the oldest ``flush_tokens`` are
quantised and appended to one flushed tier. Decode attention then reads the tiers straight from their packed codes and the dense store
as it is (:meth:`CompressedKVLayer.attend`); no dense copy of the layer is ever built.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcore.accounting import kv_bytes_fp16
from kvcore.batching import cat_quantized, stack_rows
from kvcore.decode_attention import DensePart, attend_dense, merge_parts
from kvcore.protocols import Quantizer, TierAttention
from kvcore.types import PADDING_POSITION, CompressedLayer, KVTier, narrow_positions, tensor_bytes

DENSE_SPARE_TOKENS = 8
"""Free token slots the dense store keeps at most (they are held, so they count in ``kv_bytes``):
it grows by this many when full and shrinks back after a flush frees more. A quantizer that keeps
fewer decoded tokens (``residual_length + flush_tokens`` below this) gets that many instead: with
``R = 0`` and one-token flushes a single slot is all the store ever needs."""


class CompressedKVLayer(CacheLayerMixin):
    """One decoder layer's compressed KV (see module docstring)."""

    is_sliding = False

    def __init__(self, quantizer: Quantizer | None = None) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.compressed: CompressedLayer | None = None
        self.flushed: list[KVTier] = []  # decode overflow; consecutive flushes merge into one tier
        # Dense store [B, H_kv, capacity, d] (storage dtype): the prefill residual, then decoded
        # tokens; slots from ``n_dense`` on are free. Positions are int32, -1 in free slots.
        self.dense_keys: Tensor | None = None
        self.dense_values: Tensor | None = None
        self.dense_positions: Tensor | None = None
        self.n_dense = 0
        self.n_residual = 0  # prefill residual tokens at the front of the dense store (never flushed)
        self.seen_tokens = 0  # sequence length processed so far (padding included)
        self.next_position: Tensor | None = None  # int64 [B], original position of the next token
        self.pending_queries = 0  # tokens appended by update() that attend() has not served yet
        self._dense_padded = False
        self._tier_padding: list[Tensor | None] = []

    # -- filled by prefill ---------------------------------------------------------------------
    def store_prefill(self, compressed: CompressedLayer, n_prompt: int, next_position: Tensor) -> None:
        """Keep the compressed prefill KV of a ``n_prompt``-token prompt.

        ``next_position`` is int64 ``[B]``: the position the first generated token will get.
        """
        # Every prompt position is below n_prompt (padding is -1).
        self.compressed = dataclasses.replace(compressed, tiers=[narrow_positions(t, n_prompt) for t in compressed.tiers])
        self.seen_tokens = n_prompt
        self.next_position = next_position.clone()
        self.device = compressed.residual_keys.device
        self.is_initialized = True

    # -- transformers Cache layer contract -----------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise RuntimeError(
            "CompressedKVCache is filled by compressed prefill (CompressedLlamaForCausalLM); "
            "run the prompt through that model before decoding with this cache"
        )

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Store decoded tokens ``[B, H_kv, q, d]``; :meth:`attend` then serves their queries.

        Returns the new keys/values themselves: attention over the stored tokens is computed by
        :meth:`attend` from the packed tiers, never from a dense copy handed back here.
        """
        if self.compressed is None or self.next_position is None:
            self.lazy_initialization(key_states, value_states)
        assert self.compressed is not None and self.next_position is not None
        b, h_kv, q, d = key_states.shape
        ref = self.compressed.residual_keys
        if (b, h_kv, d) != (ref.shape[0], ref.shape[1], ref.shape[3]):
            raise ValueError(
                f"decode keys of shape {tuple(key_states.shape)} do not match this cache's "
                f"[batch={ref.shape[0]}, kv_heads={ref.shape[1]}, head_dim={ref.shape[3]}]: cache and model differ"
            )
        if self.dense_keys is None:
            self._open_dense_store()
        # Flush before appending: every quantised token then lies strictly before the new queries,
        # so the tiers need no causal mask.
        self._flush(incoming=q)
        new_pos = self.next_position[:, None] + torch.arange(q, device=key_states.device)[None, :]
        self._append_dense(key_states, value_states, new_pos.to(torch.int32)[:, None, :].expand(b, h_kv, q))
        self.next_position = self.next_position + q
        self.seen_tokens += q
        self.pending_queries = q
        return key_states, value_states

    def _open_dense_store(self) -> None:
        """Move the prefill residual into a dense store with room for decoded tokens."""
        assert self.compressed is not None
        c = self.compressed
        n = c.residual_keys.shape[-2]
        self.dense_keys, self.dense_values, self.dense_positions = _with_room(
            c.residual_keys, c.residual_values, c.residual_positions, n + self._spare
        )
        self.n_dense = self.n_residual = n
        # The stored parts are views now, so nothing is held twice.
        self.compressed = dataclasses.replace(
            c,
            residual_keys=self.dense_keys[..., :n, :],
            residual_values=self.dense_values[..., :n, :],
            residual_positions=self.dense_positions[..., :n],
        )
        # One host sync per layer and generation: which parts hold padding slots at all.
        self._dense_padded = bool((c.residual_positions < 0).any())
        self._tier_padding = [_padding_of(t.positions) for t in c.tiers]

    def _append_dense(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        assert self.dense_keys is not None and self.dense_values is not None and self.dense_positions is not None
        q = keys.shape[-2]
        if self.n_dense + q > self.dense_keys.shape[-2]:
            self._resize_dense(self.n_dense + q + self._spare)
        end = self.n_dense + q
        self.dense_keys[..., self.n_dense : end, :] = keys
        self.dense_values[..., self.n_dense : end, :] = values
        self.dense_positions[..., self.n_dense : end] = positions
        self.n_dense = end

    def _flush(self, incoming: int) -> None:
        """Quantise the oldest decoded tokens while the buffer would outgrow ``R + flush - 1``."""
        q = self.quantizer
        if q is None or q.flush_tokens <= 0:
            return
        assert self.dense_keys is not None and self.dense_values is not None and self.dense_positions is not None
        n, start = q.flush_tokens, self.n_residual
        while self.n_dense - start + incoming > q.residual_length + n - 1 and self.n_dense - start >= n:
            block = slice(start, start + n)
            tier = q.quantize_block(
                self.dense_keys[..., block, :], self.dense_values[..., block, :], self.dense_positions[..., block]
            )
            self._add_flushed(tier)
            rest = slice(start + n, self.n_dense)
            kept = self.n_dense - start - n
            # Shift the remaining decoded tokens to the front of the buffer (at most R of them).
            for store in (self.dense_keys, self.dense_values):
                store[..., start : start + kept, :] = store[..., rest, :].clone()
            self.dense_positions[..., start : start + kept] = self.dense_positions[..., rest].clone()
            self.dense_positions[..., start + kept : self.n_dense] = PADDING_POSITION
            self.n_dense -= n
        if self.dense_keys.shape[-2] - self.n_dense > self._spare + incoming:
            # Give the flushed slots back: what the cache holds is what kv_bytes reports.
            self._resize_dense(self.n_dense + incoming + self._spare)

    @property
    def _spare(self) -> int:
        """Free slots the dense store keeps (see :data:`DENSE_SPARE_TOKENS`)."""
        q = self.quantizer
        if q is None or q.flush_tokens <= 0:
            return DENSE_SPARE_TOKENS
        return max(1, min(DENSE_SPARE_TOKENS, q.residual_length + q.flush_tokens))

    def _resize_dense(self, capacity: int) -> None:
        assert self.dense_keys is not None and self.dense_values is not None and self.dense_positions is not None
        self.dense_keys, self.dense_values, self.dense_positions = _with_room(
            self.dense_keys[..., : self.n_dense, :],
            self.dense_values[..., : self.n_dense, :],
            self.dense_positions[..., : self.n_dense],
            capacity,
        )
        self._refresh_residual_views()

    def _add_flushed(self, tier: KVTier) -> None:
        tier = narrow_positions(tier, self.seen_tokens)  # a decoded token's position is below seen_tokens
        if self.flushed and _can_extend(self.flushed[-1], tier):
            self.flushed[-1] = _concat_tiers(self.flushed[-1], tier)
        else:
            self.flushed.append(tier)
            self._tier_padding.append(None)  # decoded tokens are never padding

    def _refresh_residual_views(self) -> None:
        assert self.compressed is not None and self.dense_keys is not None
        assert self.dense_values is not None and self.dense_positions is not None
        n = self.n_residual
        self.compressed = dataclasses.replace(
            self.compressed,
            residual_keys=self.dense_keys[..., :n, :],
            residual_values=self.dense_values[..., :n, :],
            residual_positions=self.dense_positions[..., :n],
        )

    # -- decode attention ----------------------------------------------------------------------
    def attend(self, query: Tensor, scaling: float) -> Tensor:
        """Attention of the ``q`` queries just stored by :meth:`update` over every stored token.

        Args:
            query: ``[B, H, q, d]`` post-RoPE; the queries sit at positions
                ``next_position - q ... next_position - 1``.
            scaling: the softmax scale (``1 / sqrt(d)`` for LLaMA).

        Returns:
            ``[B, q, H, d]`` in the query's dtype.
        """
        assert self.compressed is not None and self.next_position is not None
        assert self.dense_keys is not None and self.dense_values is not None and self.dense_positions is not None
        b, h, q, d = query.shape
        h_kv = self.dense_keys.shape[1]
        groups = h // h_kv
        # The query heads of one KV head become rows ([B, H_kv, groups * q, d]): every stored key
        # and value is read once per KV head, never copied per query head.
        rows = query.to(torch.float32).reshape(b, h_kv, groups * q, d) * scaling
        dense = DensePart(
            self.dense_keys[..., : self.n_dense, :], self.dense_values[..., : self.n_dense, :], self._dense_mask(q, groups)
        )
        # The dense part holds the queries' own tokens, so every row sees at least one key.
        out = self._attend_all(rows, [*self.compressed.tiers, *self.flushed], dense)
        self.pending_queries = 0
        out = out.to(query.dtype)
        return out.reshape(b, h, q, d).transpose(1, 2).contiguous()

    def _attend_all(self, rows: Tensor, tiers: list[KVTier], dense: DensePart) -> Tensor:
        if not tiers:
            return attend_dense(rows, dense.keys, dense.values, dense.mask)[0]
        padding = self._tier_padding if any(p is not None for p in self._tier_padding) else None
        if isinstance(self.quantizer, TierAttention):
            return self.quantizer.attend(rows, tiers, dense, padding)
        # A quantizer without packed attention: dequantise one tier at a time (still no full copy)
        # and merge the parts by their log-sum-exp.
        assert self.quantizer is not None
        parts = [attend_dense(rows, dense.keys, dense.values, dense.mask)]
        for i, tier in enumerate(tiers):
            mask = None if padding is None or padding[i] is None else ~padding[i]
            keys = self.quantizer.dequantize(tier.keys, torch.float32)
            values = self.quantizer.dequantize(tier.values, torch.float32)
            parts.append(attend_dense(rows, keys, values, mask))
        return merge_parts(parts)

    def _dense_mask(self, q: int, groups: int) -> Tensor | None:
        """``[B, H_kv, groups * q, n_dense]`` bool, or ``None`` when every stored token is visible
        (one query and no padding: all stored positions precede or equal the query's)."""
        if q == 1 and not self._dense_padded:
            return None
        assert self.dense_positions is not None and self.next_position is not None
        stored = self.dense_positions[..., : self.n_dense].unsqueeze(2)  # [B, H_kv, 1, n]
        query_pos = self.next_position[:, None] - q + torch.arange(q, device=stored.device)[None, :]  # [B, q]
        mask = (stored >= 0) & (stored <= query_pos[:, None, :, None])  # [B, H_kv, q, n]
        return mask.repeat(1, 1, groups, 1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_stored + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.quantizer)  # type: ignore[misc]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported on a compressed cache; use greedy or sampling")

    # -- accounting ----------------------------------------------------------------------------
    @property
    def n_stored(self) -> int:
        """Tokens stored per KV head (prefill tiers, residual, flushed tiers, decoded tokens)."""
        if self.compressed is None:
            return 0
        n = sum(t.n_tokens for t in [*self.compressed.tiers, *self.flushed])
        return n + (self.n_dense if self.dense_keys is not None else self.compressed.residual_positions.shape[-1])

    def stored_tensors(self) -> list[Tensor]:
        """Every tensor this layer holds (the dense store whole, free slots included)."""
        if self.compressed is None:
            return []
        held = [t for tier in [*self.compressed.tiers, *self.flushed] for t in _tier_tensors(tier)]
        if self.dense_keys is None:
            c = self.compressed
            return [*held, c.residual_keys, c.residual_values, c.residual_positions]
        assert self.dense_values is not None and self.dense_positions is not None
        return [*held, self.dense_keys, self.dense_values, self.dense_positions]

    @property
    def kv_bytes(self) -> int:
        """Real bytes of every stored tensor of this layer."""
        return tensor_bytes(*self.stored_tensors())


def _tier_tensors(tier: KVTier) -> tuple[Tensor, ...]:
    k, v = tier.keys, tier.values
    return (tier.positions, k.packed, k.scale, k.zero, v.packed, v.scale, v.zero)


def _with_room(keys: Tensor, values: Tensor, positions: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Copies of ``keys/values [B, H_kv, n, d]`` and ``positions [B, H_kv, n]`` with ``capacity`` slots."""
    b, h, n, d = keys.shape
    new_keys = keys.new_empty(b, h, capacity, d)
    new_values = values.new_empty(b, h, capacity, d)
    new_positions = positions.new_full((b, h, capacity), PADDING_POSITION)
    new_keys[..., :n, :] = keys
    new_values[..., :n, :] = values
    new_positions[..., :n] = positions
    return new_keys, new_values, new_positions


def _padding_of(positions: Tensor) -> Tensor | None:
    """``[B, H_kv, 1, n]`` bool marking padding slots, or ``None`` if there are none."""
    padding = (positions < 0).unsqueeze(2)
    return padding if bool(padding.any()) else None


def _can_extend(tier: KVTier, new: KVTier) -> bool:
    """Whether ``new`` can be appended to ``tier`` keeping one regular layout (per-channel key
    groups must stay aligned: the earlier tier must end on a group boundary)."""
    k = tier.keys
    same = (tier.bits, k.group_size, k.axis, tier.values.axis) == (new.bits, new.keys.group_size, new.keys.axis, new.values.axis)
    return same and (k.axis == "token" or tier.n_tokens % k.group_size == 0)


def _concat_tiers(a: KVTier, b: KVTier) -> KVTier:
    return KVTier(
        bits=a.bits,
        positions=torch.cat([a.positions, b.positions], dim=-1),
        keys=cat_quantized([a.keys, b.keys], dim=2),
        values=cat_quantized([a.values, b.values], dim=2),
    )


class CompressedKVCache(Cache):
    """A ``Cache`` of :class:`CompressedKVLayer`, one per decoder layer.

    Args:
        num_layers: decoder layers of the model.
        quantizer: used to attend to (or dequantise) tiers and to quantise overflowing decode
            tokens (``None``: everything stays full precision).
        window_token_idx: the prompt window (the question): token indices ``[W]`` shared by the
            batch, or a bool mask ``[B, N]`` per row for a batch of different prompts; ``None``
            means the last ``window_size`` prompt tokens.
    """

    def __init__(self, num_layers: int, quantizer: Quantizer | None = None, window_token_idx: Tensor | None = None):
        super().__init__(layers=[CompressedKVLayer(quantizer) for _ in range(num_layers)])
        self.quantizer = quantizer
        self.window_token_idx = window_token_idx
        self.prefill_stats: dict[str, object] = {}

    @classmethod
    def stack(cls, caches: list["CompressedKVCache"]) -> "CompressedKVCache":
        """One batch cache from caches each filled by one prompt's prefill (and not yet decoded).

        The rows keep exactly what each prefill stored (:func:`kvcore.batching.stack_rows` pads
        shorter parts with masked filler slots); each row decodes on from its own next position.
        The batch's sequence length is the longest prompt's, as if the rows were left-padded.
        """
        if not caches:
            raise ValueError("no caches to stack")
        first = caches[0]
        for cache in caches:
            if len(cache.layers) != len(first.layers) or cache.quantizer is not first.quantizer:
                raise ValueError("caches of different models or configs cannot be stacked")
            if not cache.is_filled or any(cache.layer(i).dense_keys is not None for i in range(len(cache.layers))):
                raise ValueError("only caches filled by a prefill and not yet decoded can be stacked")
        out = cls(len(first.layers), first.quantizer)
        for i in range(len(first.layers)):
            rows = [cache.layer(i) for cache in caches]
            out.layer(i).store_prefill(
                stack_rows([row.compressed for row in rows]),  # type: ignore[misc]
                n_prompt=max(row.seen_tokens for row in rows),
                next_position=torch.cat([row.next_position for row in rows]),  # type: ignore[misc]
            )
        out.prefill_stats = {"rows": [cache.prefill_stats for cache in caches]}
        return out

    @property
    def is_filled(self) -> bool:
        return all(isinstance(layer, CompressedKVLayer) and layer.compressed is not None for layer in self.layers)

    def layer(self, idx: int) -> CompressedKVLayer:
        layer = self.layers[idx]
        assert isinstance(layer, CompressedKVLayer)
        return layer

    @property
    def kv_bytes(self) -> int:
        """Real bytes of every tensor the cache stores, all layers."""
        return sum(self.layer(i).kv_bytes for i in range(len(self.layers)))

    def kv_bytes_fp16_full(self) -> int:
        """Bytes an fp16 cache of every token seen so far (padding included) would take."""
        first = self.layer(0).compressed
        if first is None:
            return 0
        b, h_kv, _, d = first.residual_keys.shape
        return kv_bytes_fp16(layers=len(self.layers), batch=b, kv_heads=h_kv, tokens=self.get_seq_length(), head_dim=d)

    def tokens_kept_per_layer(self) -> list[int]:
        """Tokens stored per KV head in each layer."""
        return [self.layer(i).n_stored for i in range(len(self.layers))]

    def avg_bits(self) -> float:
        """Effective bits per cached K/V element, every stored byte (scales, positions) included:
        ``16 * kv_bytes / kv_bytes_fp16_full``."""
        full = self.kv_bytes_fp16_full()
        return 16.0 * self.kv_bytes / full if full else 0.0
