"""What an uncompressed fp16 KV cache of the same tokens would take: the yardstick of every ratio."""

from __future__ import annotations

from typing import Any

FP16_BYTES = 2
"""Bytes of one fp16 element."""


def kv_bytes_fp16(*, layers: int, batch: int, kv_heads: int, tokens: int, head_dim: int) -> int:
    """Bytes of fp16 keys and values ``[batch, kv_heads, tokens, head_dim]`` in each of ``layers`` layers."""
    return 2 * layers * batch * kv_heads * tokens * head_dim * FP16_BYTES  # 2: keys and values


def kv_bytes_fp16_for_model(config: Any, tokens: int, batch: int = 1) -> int:
    """:func:`kv_bytes_fp16` for a transformers model config (LLaMA field names)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_bytes_fp16(
        layers=config.num_hidden_layers, batch=batch, kv_heads=config.num_key_value_heads, tokens=tokens, head_dim=head_dim
    )
