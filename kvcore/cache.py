"""``CompressedKVCache``: a transformers ``Cache`` holding packed tiers plus full-precision buffers.

Per layer it holds what prefill compression produced (quantised tiers + a full-precision residual
of sinks, prompt window and the last prompt tokens) and, for decoding, a full-precision buffer of
generated tokens. When that buffer grows past the quantizer's ``residual_length`` (R), its oldest
``flush_tokens`` tokens are quantised into one more tier. At each decode step ``update`` returns
the dense keys/values of exactly the stored tokens; their original positions are kept beside them
so the attention function can mask padding and respect causality.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcore.accounting import kv_bytes_fp16
from kvcore.protocols import Quantizer
from kvcore.types import CompressedLayer, KVTier, tensor_bytes


class CompressedKVLayer(CacheLayerMixin):
    """One decoder layer's compressed KV (see module docstring)."""

    is_sliding = False

    def __init__(self, quantizer: Quantizer | None = None) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.compressed: CompressedLayer | None = None
        self.flushed: list[KVTier] = []
        self.buffer_keys: Tensor | None = None  # [B, H_kv, n_buf, d] storage dtype
        self.buffer_values: Tensor | None = None
        self.buffer_positions: Tensor | None = None  # int32 [B, H_kv, n_buf]
        self.seen_tokens = 0  # sequence length processed so far (padding included)
        self.next_position: Tensor | None = None  # int64 [B], original position of the next token
        self.key_positions: Tensor | None = None  # int64 [B, H_kv, n] of what update() last returned

    # -- filled by prefill ---------------------------------------------------------------------
    def store_prefill(self, compressed: CompressedLayer, n_prompt: int, next_position: Tensor) -> None:
        """Keep the compressed prefill KV of a ``n_prompt``-token prompt.

        ``next_position`` is int64 ``[B]``: the position the first generated token will get.
        """
        self.compressed = compressed
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
        """Append decoded tokens ``[B, H_kv, q, d]``; return dense K/V of every stored token."""
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
        new_pos = self.next_position[:, None] + torch.arange(q, device=key_states.device)[None, :]
        new_pos = new_pos.to(torch.int32)[:, None, :].expand(b, h_kv, q)
        self._append_buffer(key_states.to(ref.dtype), value_states.to(ref.dtype), new_pos)
        self.next_position = self.next_position + q
        self.seen_tokens += q
        return self._dense(key_states.dtype)

    def _append_buffer(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        if self.buffer_keys is None:
            self.buffer_keys, self.buffer_values, self.buffer_positions = keys, values, positions.contiguous()
        else:
            assert self.buffer_values is not None and self.buffer_positions is not None
            self.buffer_keys = torch.cat([self.buffer_keys, keys], dim=-2)
            self.buffer_values = torch.cat([self.buffer_values, values], dim=-2)
            self.buffer_positions = torch.cat([self.buffer_positions, positions], dim=-1)
        q = self.quantizer
        if q is None:
            return
        while self.buffer_keys.shape[-2] > q.residual_length + q.flush_tokens - 1 and q.flush_tokens > 0:
            n = q.flush_tokens
            self.flushed.append(
                q.quantize_block(self.buffer_keys[..., :n, :], self.buffer_values[..., :n, :], self.buffer_positions[..., :n])
            )
            self.buffer_keys = self.buffer_keys[..., n:, :].contiguous()
            self.buffer_values = self.buffer_values[..., n:, :].contiguous()  # type: ignore[index]
            self.buffer_positions = self.buffer_positions[..., n:].contiguous()  # type: ignore[index]

    def _dense(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Dequantise tiers and concatenate with the full-precision parts (token order is irrelevant
        to attention: RoPE is already in the keys and the mask uses ``key_positions``)."""
        assert self.compressed is not None
        keys, values, positions = [], [], []
        for tier in [*self.compressed.tiers, *self.flushed]:
            assert self.quantizer is not None
            keys.append(self.quantizer.dequantize(tier.keys, dtype))
            values.append(self.quantizer.dequantize(tier.values, dtype))
            positions.append(tier.positions)
        keys.append(self.compressed.residual_keys.to(dtype))
        values.append(self.compressed.residual_values.to(dtype))
        positions.append(self.compressed.residual_positions)
        if self.buffer_keys is not None:
            assert self.buffer_values is not None and self.buffer_positions is not None
            keys.append(self.buffer_keys.to(dtype))
            values.append(self.buffer_values.to(dtype))
            positions.append(self.buffer_positions)
        self.key_positions = torch.cat(positions, dim=-1).to(torch.int64)
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

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
        """Tokens stored per KV head (prefill tiers, residual, flushed tiers, decode buffer)."""
        n = self.compressed.n_tokens if self.compressed is not None else 0
        n += sum(t.n_tokens for t in self.flushed)
        return n + (self.buffer_positions.shape[-1] if self.buffer_positions is not None else 0)

    @property
    def kv_bytes(self) -> int:
        """Real bytes of every stored tensor of this layer."""
        total = self.compressed.kv_bytes if self.compressed is not None else 0
        total += sum(t.nbytes for t in self.flushed)
        if self.buffer_keys is not None:
            assert self.buffer_values is not None and self.buffer_positions is not None
            total += tensor_bytes(self.buffer_keys, self.buffer_values, self.buffer_positions)
        return total


class CompressedKVCache(Cache):
    """A ``Cache`` of :class:`CompressedKVLayer`, one per decoder layer.

    Args:
        num_layers: decoder layers of the model.
        quantizer: used to dequantise tiers and to quantise overflowing decode tokens
            (``None``: everything stays full precision).
        window_token_idx: optional token indices ``[W]`` of the prompt window (the question), shared
            by the batch; ``None`` means the last ``window_size`` prompt tokens.
    """

    def __init__(self, num_layers: int, quantizer: Quantizer | None = None, window_token_idx: Tensor | None = None):
        super().__init__(layers=[CompressedKVLayer(quantizer) for _ in range(num_layers)])
        self.quantizer = quantizer
        self.window_token_idx = window_token_idx
        self.prefill_stats: dict[str, object] = {}

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
