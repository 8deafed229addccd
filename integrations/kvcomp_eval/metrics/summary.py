"""What compression cost and saved over a set of generations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvcore.types import GenerationResult

__all__ = ["CompressionMetrics", "generation_metrics"]


def generation_metrics(result: GenerationResult) -> dict[str, Any]:
    """The JSON-ready cost and speed fields of one :class:`GenerationResult` (bytes, s, tokens/s)."""
    return {
        "generated_tokens": len(result.token_ids),
        "kv_bytes": result.kv_bytes,
        "kv_bytes_fp16_full": result.kv_bytes_fp16_full,
        "compression_ratio": result.compression_ratio,
        "avg_bits": result.avg_bits,
        "tokens_kept_per_layer": list(result.tokens_kept_per_layer),
        "ttft_s": result.ttft_s,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "peak_rss_bytes": result.peak_rss_bytes,
    }


@dataclass(frozen=True)
class CompressionMetrics:
    """Cache size, speed and memory over ``n`` generations.

    Attributes:
        n: number of generations.
        prompt_tokens: mean prompt length, tokens.
        kv_bytes: mean bytes of the stored (compressed) KV cache per prompt.
        kv_bytes_fp16_full: mean bytes an uncompressed fp16 cache would take per prompt.
        compression_ratio: total fp16 bytes / total stored bytes (bytes-weighted, > 1 is smaller).
        kv_fraction: total stored bytes / total fp16 bytes (the inverse, in [0, ...]).
        avg_bits: mean bits per stored K/V element, weighted by prompt length.
        tokens_kept_per_layer: mean tokens stored per KV head, per layer ``[L]``.
        ttft_s: mean time to first token, seconds.
        decode_tokens_per_s: mean decoding speed, tokens per second.
        peak_memory_bytes: largest peak memory of any generation (RSS on CPU, CUDA peak on GPU).
    """

    n: int
    prompt_tokens: float
    kv_bytes: float
    kv_bytes_fp16_full: float
    compression_ratio: float
    kv_fraction: float
    avg_bits: float
    tokens_kept_per_layer: tuple[float, ...]
    ttft_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int

    @classmethod
    def from_results(cls, results: Sequence[GenerationResult]) -> CompressionMetrics:
        """Aggregate generations of the same model (all must report the same number of layers)."""
        if not results:
            raise ValueError("CompressionMetrics.from_results needs at least one GenerationResult")
        n = len(results)
        layers = {len(r.tokens_kept_per_layer) for r in results}
        if len(layers) != 1:
            raise ValueError(f"results report different numbers of layers: {sorted(layers)}")
        n_layers = layers.pop()
        total_kv = sum(r.kv_bytes for r in results)
        total_full = sum(r.kv_bytes_fp16_full for r in results)
        total_prompt = sum(r.prompt_tokens for r in results)
        weights = [r.prompt_tokens for r in results] if total_prompt > 0 else [1] * n
        return cls(
            n=n,
            prompt_tokens=total_prompt / n,
            kv_bytes=total_kv / n,
            kv_bytes_fp16_full=total_full / n,
            compression_ratio=total_full / max(total_kv, 1),
            kv_fraction=total_kv / max(total_full, 1),
            avg_bits=sum(w * r.avg_bits for w, r in zip(weights, results)) / sum(weights),
            tokens_kept_per_layer=tuple(
                sum(r.tokens_kept_per_layer[layer] for r in results) / n for layer in range(n_layers)
            ),
            ttft_s=sum(r.ttft_s for r in results) / n,
            decode_tokens_per_s=sum(r.decode_tokens_per_s for r in results) / n,
            peak_memory_bytes=max(r.peak_rss_bytes for r in results),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        out = asdict(self)
        out["tokens_kept_per_layer"] = list(self.tokens_kept_per_layer)
        return out
