"""Mixed-precision quantizer: importance picks 8, 4 or 2 bits per token, or drops it.

Per (layer, KV head) the candidate tokens (not protected, not among the last ``R``) are ranked
by score; the top ``frac_8bit`` are stored at 8 bit, the next ``frac_4bit`` at 4 bit, the next
``frac_2bit`` at 2 bit and the rest dropped. Codes are packed for real (:mod:`.packing`).
Keys are grouped per channel by default (KIVI-style), because LLaMA keys have outlier
channels that per-token groups smear over the whole group; values are always per token.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from kvcore.config import MAX_TOKEN_COUNT, layer_index_keys, refuse_missing_layers
from kvcore.decode_attention import DensePart
from kvcore.types import CompressedLayer, KVTier, QuantizedTensor
from kvcomp_plugins.quantizers import attend, backends, native
from kvcomp_plugins.quantizers.packing import validate_quant_args
from kvcomp_plugins.quantizers.rows import compress_rows, rows_differ
from kvcomp_plugins.quantizers.tiers import TokenSplit, gather_parts, split_tokens

DEFAULT_FRACTIONS = {"frac_8bit": 0.1, "frac_4bit": 0.55, "frac_2bit": 0.0, "frac_drop": 0.35}
"""Used when neither fractions nor ``avg_bits`` are given (the ``default`` preset's split, which
also sets ``group_size: 64`` and ``residual_length: 32``)."""



def _check_bit_width(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bit width must be 2, 4 or 8 (0 means dropped: use frac_drop), got {bits}")
    return bits


BitWidth = Annotated[int, Field(strict=True), AfterValidator(_check_bit_width)]
"""A stored bit width. A strict int: ``4.0`` or ``"4"`` is refused, not coerced (``Literal`` would take 4.0)."""


def _check_protected_bits(bits: int) -> int:
    if bits not in (2, 4, 8, 16):
        raise ValueError(f"protected_bits must be 2, 4 or 8 (a quantised tier) or 16 (the residual dtype), got {bits}")
    return bits


ProtectedBits = Annotated[int, Field(strict=True), AfterValidator(_check_protected_bits)]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class TieredQuantizerConfig(BaseModel):
    """Parameters every tiered quantizer shares."""

    model_config = ConfigDict(extra="forbid", strict=True)

    group_size: int = Field(
        32,
        ge=1,
        le=1024,
        description="G: tokens per group (channel keys), channels per group (values); read as head_dim when larger.",
    )
    key_mode: Literal["channel", "token"] = Field("channel", description="How keys are grouped.")
    residual_length: int = Field(128, ge=0, le=MAX_TOKEN_COUNT, description="R: most recent tokens kept in full precision.")
    flush_tokens: int | None = Field(None, ge=1, le=MAX_TOKEN_COUNT, description="Tokens per decode flush; None means group_size.")
    flush_bits: BitWidth = Field(8, description="Bit width of tokens flushed from the decode residual.")
    flush_key_mode: Literal["channel", "token"] | None = Field(
        None,
        description="How flushed decode keys are grouped; None means key_mode. 'token' lets small flushes "
        "(flush_tokens below group_size) store one scale per channel group of each token, not of each channel.",
    )
    protected_bits: ProtectedBits = Field(
        16,
        description="Storage of protected prompt tokens (sinks, the question and what follows it) outside the "
        "last R: 16 keeps them in the residual dtype, 2/4/8 stores them as a tier of that width.",
    )
    residual_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    backend: Literal["auto", "torch", "triton", "native"] = Field(
        "auto", description="Kernels: auto (Triton on CUDA, the C decode kernel on CPU), torch, triton or native."
    )

    def tier_fractions(self) -> tuple[tuple[int, float], ...]:
        """``(bits, fraction of candidates)`` per tier, highest precision first."""
        raise NotImplementedError

    def budget_at(self, layer_idx: int) -> float:
        """The multiplier of the stored fractions at ``layer_idx``: 1 unless a subclass schedules budgets."""
        return 1.0

    def group_for(self, head_dim: int) -> int:
        """The group size used on a model with ``head_dim`` channels per head: ``min(G, head_dim)``.

        A per-token value group never spans two heads, so a larger ``G`` means one group per
        head; keys use the same size (tokens per group), since the decode kernels read one group
        size for a tier's keys and values. One preset thus serves 32-, 64- and 128-channel heads;
        a smaller ``G`` that does not divide ``head_dim`` is refused when the model is checked.
        """
        return min(self.group_size, head_dim)


class MixedPrecisionConfig(TieredQuantizerConfig):
    """Tier fractions, given explicitly or through a target average bit width.

    Explicit fractions must sum to 1 (within 1e-6); fractions left unset count as 0. With none
    of them and no ``avg_bits``, :data:`DEFAULT_FRACTIONS` apply. ``avg_bits`` (b̄, payload
    bits per candidate token, dropped tokens counting 0) is met by mixing the two neighbouring
    widths of {0, 4, 8}: b̄ <= 4 stores b̄/4 of the candidates at 4 bit and drops the rest;
    b̄ > 4 stores (b̄ - 4)/4 at 8 bit and the rest at 4 bit. 2 bit is never chosen this way,
    since large 2-bit tiers were measured to cost more fidelity than dropping the least
    important tokens; ask for it with explicit fractions.

    ``budget_by_layer`` maps a first layer to a multiplier of the stored fractions from that
    layer on (layers before the first key keep 1); what it takes away is dropped, what it adds
    comes from the dropped share. ``{0: 0.5, 8: 1.3, 20: 1.0}`` halves layers 0-7 and gives
    layers 8-19 30% more, about the same bytes over 30 layers.
    """

    frac_8bit: float | None = Field(None, ge=0.0, le=1.0)
    frac_4bit: float | None = Field(None, ge=0.0, le=1.0)
    frac_2bit: float | None = Field(None, ge=0.0, le=1.0)
    frac_drop: float | None = Field(None, ge=0.0, le=1.0)
    avg_bits: float | None = Field(None, ge=0.0, le=8.0)
    budget_by_layer: dict[int, float] | None = Field(
        None, description="first layer -> multiplier of the stored fractions from that layer on (the rest is dropped)"
    )

    _budget_keys = field_validator("budget_by_layer", mode="before")(lambda cls, value: layer_index_keys(value))

    @model_validator(mode="after")
    def _check_fractions(self) -> "MixedPrecisionConfig":
        given = {name: getattr(self, name) for name in DEFAULT_FRACTIONS if getattr(self, name) is not None}
        if self.avg_bits is not None and given:
            raise ValueError(f"avg_bits={self.avg_bits} and explicit fractions {given} are mutually exclusive")
        total = sum(given.values())
        if given and abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"frac_8bit + frac_4bit + frac_2bit + frac_drop must sum to 1 (unset ones count as 0), "
                f"got {given} summing to {total:.6g}"
            )
        stored = sum(frac for _, frac in self.tier_fractions())
        for layer, factor in sorted((self.budget_by_layer or {}).items()):
            if not (math.isfinite(factor) and factor >= 0.0):
                raise ValueError(f"budget_by_layer: layer {layer} has multiplier {factor}; multipliers are finite and >= 0")
            if factor * stored > 1.0 + 1e-6:
                raise ValueError(
                    f"budget_by_layer: layer {layer} multiplies the stored fraction {stored:.4g} by {factor}, "
                    f"more than every candidate token; use at most {1.0 / stored:.4g}"
                )
        return self

    def budget_at(self, layer_idx: int) -> float:
        """The multiplier of the stored fractions at ``layer_idx`` (1 without ``budget_by_layer``)."""
        factor = 1.0
        for layer, value in sorted((self.budget_by_layer or {}).items()):
            if layer <= layer_idx:
                factor = value
        return factor

    def tier_fractions(self) -> tuple[tuple[int, float], ...]:
        if self.avg_bits is not None:
            b = self.avg_bits
            f8 = max(0.0, (b - 4.0) / 4.0)
            f4 = min(1.0, b / 4.0) - f8
            return ((8, f8), (4, f4), (2, 0.0))
        given = {name: getattr(self, name) for name in DEFAULT_FRACTIONS if getattr(self, name) is not None}
        fracs = {**{name: 0.0 for name in DEFAULT_FRACTIONS}, **given} if given else DEFAULT_FRACTIONS
        return ((8, fracs["frac_8bit"]), (4, fracs["frac_4bit"]), (2, fracs["frac_2bit"]))


class MixedPrecisionQuantizer:
    """Stores a layer's K/V as 8/4/2-bit packed tiers plus a full-precision residual.

    Parameters are the fields of :class:`MixedPrecisionConfig` (keyword arguments).
    Implements :class:`kvcore.protocols.Quantizer`.
    """

    config_model: ClassVar[type[TieredQuantizerConfig]] = MixedPrecisionConfig

    def __init__(self, **params: Any) -> None:
        self.config = self.config_model(**params)
        self.residual_length: int = self.config.residual_length
        self.flush_tokens: int = self.config.flush_tokens or self.config.group_size
        self._flush_key_mode = self.config.flush_key_mode or self.config.key_mode
        self.tier_fractions = self.config.tier_fractions()
        self.residual_dtype = _DTYPES[self.config.residual_dtype]
        # Decode staging buffers, shared by the layers of the model this quantizer serves (one
        # layer attends at a time; not for concurrent use from several threads).
        self._scratch = attend.Scratch()
        self._scaled: dict[float, MixedPrecisionQuantizer] = {}  # for_layer's copies, by multiplier

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def for_layer(self, layer_idx: int) -> "MixedPrecisionQuantizer":
        """This quantizer as it compresses layer ``layer_idx`` (:class:`kvcore.protocols.LayerwiseQuantizer`):
        itself, or with its stored fractions scaled by the config's ``budget_by_layer``. The
        copies share everything else (decode buffers included) and are made once per multiplier."""
        factor = self.config.budget_at(layer_idx)
        if factor == 1.0:
            return self
        if factor not in self._scaled:
            clone = copy.copy(self)
            clone.tier_fractions = tuple((bits, frac * factor) for bits, frac in self.tier_fractions)
            self._scaled[factor] = clone
        return self._scaled[factor]

    def compress(
        self, keys: Tensor, values: Tensor, positions: Tensor, scores: Tensor | None, protected: Tensor
    ) -> CompressedLayer:
        """Split one prefill layer into residual, tiers and dropped tokens, and pack the tiers.

        Args:
            keys: post-RoPE keys ``[B, H_kv, N, d]``.
            values: values ``[B, H_kv, N, d]``.
            positions: original positions ``[B, N]`` int, ``-1`` for padding.
            scores: importance ``[B, H_kv, N]`` (higher = more important) or ``None``.
            protected: ``[B, N]`` bool, kept in full precision.

        Returns:
            :class:`CompressedLayer`; ``dropped_tokens`` counts dropped slots per (batch row, KV head).

        A row of a batch is stored exactly as it would be alone: rows that differ (padding, their
        own question) are compressed one by one and stacked with filler slots (:mod:`.rows`).
        """
        self._check_layer(keys, values, positions, scores, protected)
        if rows_differ(positions, protected):
            return compress_rows(self.compress, keys, values, positions, scores, protected)
        b, h = keys.shape[:2]
        in_c = self._splits_in_c(keys, positions, protected)
        split = (native.split_tokens if in_c else split_tokens)(
            positions, scores, protected, h, self.residual_length, self.tier_fractions
        )
        if self.config.protected_bits < 16:
            split = self._protected_as_tier(split, positions, keys.shape[2], h)
        if in_c:
            residual = split.residual_idx[0]
            residual_keys, residual_values = keys.index_select(2, residual), values.index_select(2, residual)
            group = self.config.group_for(keys.shape[-1])
            packed = native.quantize_tiers(keys, values, split.tier_idx, split.tier_bits, group, self.config.key_mode)
            tiers = [
                KVTier(bits=bits, positions=pos, keys=k, values=v)
                for bits, pos, (k, v) in zip(split.tier_bits, split.tier_positions, packed)
            ]
        else:
            idx = [split.residual_idx.unsqueeze(1).expand(b, h, -1), *split.tier_idx]
            k_parts, v_parts = gather_parts([keys, values], idx)
            residual_keys, residual_values = k_parts[0], v_parts[0]
            tiers = self._quantize_tiers(
                [(k, v, pos, bits) for k, v, pos, bits in zip(k_parts[1:], v_parts[1:], split.tier_positions, split.tier_bits)]
            )
        return CompressedLayer(
            tiers=tiers,
            # copy=True: in the storage dtype already, the part would be a view keeping every
            # gathered full-precision token alive (bytes held but not counted).
            residual_keys=residual_keys.to(self.residual_dtype, copy=True),
            residual_values=residual_values.to(self.residual_dtype, copy=True),
            residual_positions=_positions_of(positions, split.residual_idx.unsqueeze(1).expand(b, h, -1)),
            dropped_tokens=split.dropped_per_head,
        )

    def _protected_as_tier(self, split: TokenSplit, positions: Tensor, n: int, h: int) -> TokenSplit:
        """``split`` with the protected slots outside the last ``R`` moved from the residual into a
        first tier of ``protected_bits`` (quantised with the other tiers, in the same call).

        The batch rows share positions and protected slots here (see :meth:`compress`), so the
        residual is the same slots in every row, ascending: the protected ones before the last
        ``R``, then the last ``R`` (all of them). Their count alone says how many lie before: no
        read of the indices, which on a GPU would wait for the device once per layer.
        """
        residual = split.residual_idx
        n_old = residual.shape[1] - min(self.residual_length, n)
        if n_old <= 0:
            return split
        idx = residual[:, :n_old].unsqueeze(1).expand(-1, h, -1).contiguous()
        return dataclasses.replace(
            split,
            residual_idx=residual[:, n_old:],
            tier_bits=[self.config.protected_bits, *split.tier_bits],
            tier_idx=[idx, *split.tier_idx],
            tier_positions=[_positions_of(positions, idx), *split.tier_positions],
        )

    def _splits_in_c(self, keys: Tensor, positions: Tensor, protected: Tensor) -> bool:
        """Whether the C kernels split and pack this layer: the backend quantises in C here, and
        the batch rows share their positions and protected slots (one prompt, or equal ones)."""
        return backends.select_backend(self.config.backend, keys.device) is native and native.rows_shared(positions, protected)

    def quantize_block(self, keys: Tensor, values: Tensor, positions: Tensor) -> KVTier:
        """Quantise ``[B, H_kv, n, d]`` decode-overflow tokens at ``flush_bits``.

        ``positions`` is int ``[B, H_kv, n]`` (stored as int32).
        """
        if keys.ndim != 4 or keys.shape != values.shape:
            raise ValueError(
                f"keys/values must share a [B, H_kv, n, d] shape, got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if tuple(positions.shape) != tuple(keys.shape[:3]):
            raise ValueError(
                f"positions must be [B, H_kv, n] = {tuple(keys.shape[:3])}, got {tuple(positions.shape)}"
            )
        bits = self.config.flush_bits
        self._check_head_dim(tuple(keys.shape), [bits])
        return self._quantize_tiers([(keys, values, positions.to(torch.int32).contiguous(), bits)], self._flush_key_mode)[0]

    def dequantize(self, tensor: QuantizedTensor, dtype: torch.dtype) -> Tensor:
        """Unpack and dequantise to a dense ``[B, H_kv, n, d]`` tensor of ``dtype``."""
        return backends.unpack_dequantize(tensor, dtype, self.config.backend)

    def attend(
        self, rows: Tensor, tiers: Sequence[KVTier], dense: DensePart, padding: Sequence[Tensor | None] | None = None
    ) -> Tensor:
        """Decode attention straight from the packed ``tiers`` (:class:`kvcore.protocols.TierAttention`)."""
        return backends.attend_layer(rows, tiers, dense, padding, self.config.backend, self._scratch)

    def _quantize_tier(self, keys: Tensor, values: Tensor, positions: Tensor, bits: int) -> KVTier:
        """Pack ``[B, H_kv, k, d]`` keys (``key_mode``) and values (per token) at ``bits``."""
        return self._quantize_tiers([(keys, values, positions, bits)])[0]

    def _quantize_tiers(self, parts: list[tuple[Tensor, Tensor, Tensor, int]], key_mode: str | None = None) -> list[KVTier]:
        """:meth:`_quantize_tier` of every ``(keys, values, positions, bits)`` of a layer in one call
        (keys grouped by ``key_mode``, default the config's)."""
        cfg = self.config
        key_mode = key_mode or cfg.key_mode
        requests = []
        for keys, values, _, bits in parts:
            group = cfg.group_for(keys.shape[-1])
            requests += [(keys, bits, group, key_mode), (values, bits, group, "token")]
        packed = backends.quantize_pack_many(requests, cfg.backend)
        return [
            KVTier(bits=bits, positions=positions, keys=packed[2 * i], values=packed[2 * i + 1])
            for i, (_, _, positions, bits) in enumerate(parts)
        ]

    def check_model(self, *, num_layers: int, head_dim: int) -> None:
        """Refuse a model whose ``head_dim`` the groups or the packing cannot split, or a
        ``budget_by_layer`` naming a layer it does not have (before prefill)."""
        self._check_head_dim((1, 1, 1, head_dim), self._bits_used())
        refuse_missing_layers("quantizer.budget_by_layer", getattr(self.config, "budget_by_layer", None) or {}, num_layers)

    def _check_head_dim(self, shape: tuple[int, ...], bits_used: list[int]) -> None:
        group = self.config.group_for(shape[-1])
        for bits in bits_used:
            for axis in {self.config.key_mode, self._flush_key_mode, "token"}:
                validate_quant_args(shape, bits, group, axis)

    def _check_layer(
        self, keys: Tensor, values: Tensor, positions: Tensor, scores: Tensor | None, protected: Tensor
    ) -> None:
        if keys.ndim != 4 or keys.shape != values.shape:
            raise ValueError(
                f"keys/values must share a [B, H_kv, N, d] shape, got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        b, h, n, _ = keys.shape
        if tuple(positions.shape) != (b, n) or positions.is_floating_point():
            raise ValueError(
                f"positions must be an int [B, N] = {(b, n)} tensor, got {positions.dtype} {tuple(positions.shape)}"
            )
        if tuple(protected.shape) != (b, n) or protected.dtype != torch.bool:
            raise ValueError(
                f"protected must be a bool [B, N] = {(b, n)} tensor, got {protected.dtype} {tuple(protected.shape)}"
            )
        if scores is not None and tuple(scores.shape) != (b, h, n):
            raise ValueError(f"scores must be [B, H_kv, N] = {(b, h, n)}, got {tuple(scores.shape)}")
        self._check_head_dim(tuple(keys.shape), self._bits_used())

    def _bits_used(self) -> list[int]:
        """Every width this quantizer stores: its tiers', the protected tier's and ``flush_bits``
        (the decode cache flushes a layer's tokens through :meth:`quantize_block`)."""
        used = [bits for bits, frac in self.tier_fractions if frac > 0] + [self.config.flush_bits]
        return used + [self.config.protected_bits] if self.config.protected_bits < 16 else used


def _positions_of(positions: Tensor, idx: Tensor) -> Tensor:
    """int32 ``[B, H_kv, k]`` original positions of slots ``idx`` ``[B, H_kv, k]``."""
    b = positions.shape[0]
    return positions.gather(1, idx.reshape(b, -1)).reshape(idx.shape).to(torch.int32).contiguous()
