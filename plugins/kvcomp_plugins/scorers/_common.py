"""Pieces every built-in scorer shares: shape checks, window attention, pooling, the
structural prior, min-max normalisation and the protected/padding override.

Conventions (see :class:`kvcore.types.LayerObservation`): ``B`` batch, ``H`` query heads,
``H_kv`` KV heads (``g = H / H_kv`` query heads per KV head; query head ``j`` belongs to KV
head ``j // g``), ``N`` tokens, ``W`` window queries, ``d`` head dim.

Every scorer returns ``[B, H_kv, N]`` float32 where

- real, unprotected tokens ("candidates") score in ``[0, 1]`` (each term min-max normalised
  over the candidates of its ``(batch, KV head)``);
- protected tokens (sinks and prompt window) score :data:`PROTECTED_SCORE`, above any candidate;
- padding slots score :data:`PADDING_SCORE`, below any candidate.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, Field
from torch import Tensor

from kvcomp_plugins import native
from kvcomp_plugins.memo import LastRead
from kvcore.types import LayerObservation, materialised

PROTECTED_SCORE = 2.0
"""Score of sinks and window tokens: candidates score at most 1, so protected tokens always outrank."""

PADDING_SCORE = -1.0
"""Score of padding slots: candidates score at least 0, so padding always ranks last."""

MAX_LOGIT_SCALE = 1e30
"""Cap on the softmax inverse temperature ``|q| |k| / sqrt(d)``.

Past it the softmax is one-hot to float32 precision anyway; capping keeps the logits finite for
any finite input (``q . k`` of two float32 vectors can overflow).
"""

_TINY = torch.finfo(torch.float32).tiny
_LOGIT_ELEMENTS_PER_CHUNK = 1 << 24
"""Window logits held at once (~64 MiB of float32): KV heads are processed in chunks below it."""


def _check_odd(kernel: int) -> int:
    if kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd (1 = no pooling, 3, 5, 7, ...), got {kernel}")
    return kernel


PoolKernel = Annotated[int, Field(ge=1, le=1023), AfterValidator(_check_odd)]
"""Width of the 1-D pool along the token axis: an odd integer >= 1 (1 disables pooling)."""

PoolMode = Literal["max", "avg"]

RecencyFraction = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""Recency time constant as a fraction of the prompt length; must be > 0."""

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def resolve_config(model: type[ConfigT], config: ConfigT | None, params: dict[str, Any]) -> ConfigT:
    """Return ``config``, or validate ``params`` into ``model`` (never both).

    Raises:
        ValueError: both were given, or ``params`` are invalid (pydantic's ``ValidationError``
            is a ``ValueError`` and names the bad field).
    """
    if config is not None:
        if params:
            raise ValueError(
                f"pass either a {model.__name__} or its fields as keywords, not both (got {sorted(params)})"
            )
        if not isinstance(config, model):
            raise ValueError(f"config must be a {model.__name__}, got {type(config).__name__}")
        return config
    return model.model_validate(params)


def check_observation(obs: LayerObservation) -> None:
    """Raise ``ValueError`` naming the first tensor whose shape disagrees with the others."""
    if obs.keys.dim() != 4:
        raise ValueError(f"keys must be [B, H_kv, N, d], got shape {tuple(obs.keys.shape)}")
    b, h_kv, n, d = obs.keys.shape
    # Pre-RoPE tensors not computed yet (model-made, right by construction) are not forced here.
    for name, tensor in (("values", obs.values), ("keys_pre_rope", materialised(obs, "keys_pre_rope"))):
        if tensor is None:
            continue
        shape = tuple(tensor.shape)
        if shape != (b, h_kv, n, d):
            raise ValueError(f"{name} must have the keys' shape {(b, h_kv, n, d)}, got {shape}")
    if obs.queries.dim() != 4 or obs.queries.shape[0] != b or obs.queries.shape[-1] != d:
        raise ValueError(f"queries must be [B={b}, H, W, d={d}], got shape {tuple(obs.queries.shape)}")
    h, w = obs.queries.shape[1], obs.queries.shape[2]
    if h % h_kv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({h_kv})")
    queries_pre_rope = materialised(obs, "queries_pre_rope")
    if queries_pre_rope is not None and tuple(queries_pre_rope.shape) != (b, h, w, d):
        raise ValueError(
            f"queries_pre_rope must have the queries' shape {(b, h, w, d)}, got {tuple(queries_pre_rope.shape)}"
        )
    if tuple(obs.window_idx.shape) != (w,):
        raise ValueError(f"window_idx must be [W={w}], got shape {tuple(obs.window_idx.shape)}")
    if tuple(obs.positions.shape) != (b, n):
        raise ValueError(f"positions must be [B={b}, N={n}], got shape {tuple(obs.positions.shape)}")
    if obs.window_rows is not None and tuple(obs.window_rows.shape) != (b, n):
        raise ValueError(f"window_rows must be [B={b}, N={n}], got shape {tuple(obs.window_rows.shape)}")
    if obs.n_original < 1 or obs.n_sink < 0:
        raise ValueError(f"n_original must be >= 1 and n_sink >= 0, got {obs.n_original} and {obs.n_sink}")


def candidate_mask(obs: LayerObservation) -> Tensor:
    """``[B, N]`` bool: real (non-padding) tokens that are not protected, i.e. the ones ranked."""
    return ~obs.padding_mask & ~obs.protected_mask


def _grouped(queries: Tensor, h_kv: int) -> Tensor:
    """``[B, H, W, d]`` -> ``[B, H_kv, g, W, d]`` (query head ``j`` -> KV head ``j // g``)."""
    b, h, w, d = queries.shape
    return queries.reshape(b, h_kv, h // h_kv, w, d)


def _abs_max(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Largest magnitude over ``dims`` (kept), floored at the smallest normal float32; 1 if empty."""
    if any(x.shape[d] == 0 for d in dims):  # e.g. an empty window: nothing to scale
        shape = [1 if i in dims else size for i, size in enumerate(x.shape)]
        return x.new_ones(shape)
    return x.abs().amax(dim=dims, keepdim=True).clamp_min(_TINY)


def window_attention(obs: LayerObservation) -> Tensor:
    """Mean attention each token receives from the window queries, ``[B, H_kv, N]`` float32.

    For KV head ``h`` and token ``i``: the mean over the ``g`` query heads of the group and the
    valid (non-padding) window queries of ``softmax(q . k / sqrt(d))``, causal by original
    position (a query at position ``p`` sees keys at positions ``0 <= pos <= p``; padding never).
    Only ``W x N`` logits per query head exist at once; KV heads are processed in chunks.

    Numerics: queries and keys are divided by their largest magnitude per ``(batch, head)`` and
    the inverse temperature ``s_q s_k / sqrt(d)`` is capped at :data:`MAX_LOGIT_SCALE`, so the
    result is finite for any finite input.

    On a CPU the whole computation is one C call (``kvc_window_attention``, the same maths up to
    the order of float32 additions): the torch version below costs ~35 small ops per layer.
    """
    keys = obs.keys.float()
    b, h_kv, n, d = keys.shape
    g, w = obs.queries.shape[1] // h_kv, obs.queries.shape[2]
    in_c = d <= native.MAX_HEAD_DIM and _in_c(keys)
    # The same for every layer of a stream: kept for the stream's tensors (see kvcomp_plugins.memo).
    tensors = [obs.positions, obs.window_idx] + ([obs.window_rows] if obs.window_rows is not None else [])
    sees_upto, q_weight, hidden = _WINDOW_VIEW.get(tensors, (g, in_c), lambda: _window_view(obs, g, not in_c))
    if in_c:
        return _window_attention_c(obs.queries, keys, sees_upto, obs.positions, q_weight)

    queries = _grouped(obs.queries.float(), h_kv)  # [B, H_kv, g, W, d]

    s_q = _abs_max(queries, (2, 3, 4))  # [B, H_kv, 1, 1, 1]
    s_k = _abs_max(keys, (2, 3))  # [B, H_kv, 1, 1]
    inv_temp = (s_q.double() * s_k.double()[..., None] / math.sqrt(d)).clamp(max=MAX_LOGIT_SCALE).float()
    # Dividing the queries by both scales bounds every product term by 1 without copying the keys;
    # the inverse temperature is folded into the (W-row) queries, not applied to the W x N logits.
    q_unit = queries / s_q / s_k[..., None] * inv_temp

    per_chunk = max(1, _LOGIT_ELEMENTS_PER_CHUNK // max(1, b * g * w * n))
    out = []
    for start in range(0, h_kv, per_chunk):
        sl = slice(start, start + per_chunk)
        logits = torch.einsum("bhgwd,bhnd->bhgwn", q_unit[:, sl], keys[:, sl])
        probs = torch.softmax(logits.masked_fill_(hidden, float("-inf")), dim=-1)
        # The weighted mean over the g heads and W queries of a group is one small matmul.
        weights = q_weight[:, None, None, :].expand(-1, probs.shape[1], g, -1).reshape(b, probs.shape[1], 1, g * w)
        out.append(torch.matmul(weights, probs.reshape(b, probs.shape[1], g * w, n)).squeeze(2))
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


_WINDOW_VIEW: LastRead[tuple[Tensor, Tensor, Tensor | None]] = LastRead()


def _window_view(obs: LayerObservation, g: int, with_mask: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """What :func:`window_attention` needs of the stream alone: the last position each window
    query sees ``[B, W]``, each query's weight in the mean ``[B, W]`` and (``with_mask``) the mask
    ``[B, 1, 1, W, N]`` of the keys each query may not see."""
    q_pos = obs.window_query_positions  # [B, W]
    q_valid = q_pos >= 0
    # A valid query sees keys at original positions 0..its own; a padding query sees every real key
    # (its row stays finite and its weight is 0), so no row is empty.
    sees_upto = torch.where(q_valid, q_pos, torch.iinfo(q_pos.dtype).max)
    # Each valid query contributes 1 / (g * n_valid) of the mean; padding queries contribute 0.
    n_valid = q_valid.sum(dim=1).clamp_min(1)  # [B]
    q_weight = q_valid.float() / (g * n_valid[:, None]).float()  # [B, W]
    if not with_mask:
        return sees_upto, q_weight, None
    k_pos = obs.positions
    # True = masked: a key the query may not see (later, or padding).
    hidden = ((k_pos[:, None, :] > sees_upto[:, :, None]) | (k_pos[:, None, :] < 0))[:, None, None]
    return sees_upto, q_weight, hidden


def _window_attention_c(queries: Tensor, keys: Tensor, sees_upto: Tensor, k_pos: Tensor, q_weight: Tensor) -> Tensor:
    """:func:`window_attention` in C. ``queries`` ``[B, H, W, d]``, ``keys`` float32 ``[B, H_kv, N, d]``
    (any layout with contiguous channels), ``sees_upto`` ``[B, W]`` (the last position each query
    sees), ``k_pos`` ``[B, N]``, ``q_weight`` ``[B, W]``; returns ``[B, H_kv, N]``."""
    b, h_kv, n, d = keys.shape
    g, w = queries.shape[1] // h_kv, queries.shape[2]
    queries = queries.to(torch.float32).contiguous()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    sees, pos = sees_upto.to(torch.int64).contiguous(), k_pos.to(torch.int64).contiguous()
    weight = q_weight.to(torch.float32).contiguous()
    out = torch.empty(b, h_kv, n, dtype=torch.float32)
    scratch = torch.empty(g * w * (n + d) + n // 16 + 1, dtype=torch.float32)  # see kernels.c
    status = native.library().kvc_window_attention(
        queries.data_ptr(), keys.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2), sees.data_ptr(),
        pos.data_ptr(), weight.data_ptr(), b, h_kv, g, w, n, d, out.data_ptr(), scratch.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"the C window attention refused queries {tuple(queries.shape)} and keys {tuple(keys.shape)}")
    return out


def pool_tokens(scores: Tensor, mask: Tensor, kernel: int, mode: PoolMode) -> Tensor:
    """1-D pool of ``[B, H_kv, N]`` scores along the token axis over the ``[B, N]`` ``mask`` tokens.

    Only masked-in tokens feed the pool (so the very high attention of sinks and window tokens
    does not spill onto their neighbours); ``"avg"`` divides by the number of masked-in tokens
    in reach. Scores must be >= 0 (``"max"`` treats masked-out tokens as 0). ``kernel == 1``
    returns the input unchanged.
    """
    if kernel == 1:
        return scores
    if _in_c(scores):
        return _rows_in_c("kvc_pool", scores, mask, kernel, int(mode == "avg"))
    b, h_kv, n = scores.shape
    m = mask[:, None, :].expand(b, h_kv, n).float()
    src = (scores * m).reshape(b * h_kv, 1, n)
    pad = kernel // 2
    if mode == "max":
        pooled = F.max_pool1d(src, kernel, stride=1, padding=pad)
    else:
        total = F.avg_pool1d(src, kernel, stride=1, padding=pad, count_include_pad=True)
        count = F.avg_pool1d(m.reshape(b * h_kv, 1, n), kernel, stride=1, padding=pad, count_include_pad=True)
        pooled = torch.where(count > 0, total / count.clamp_min(_TINY), torch.zeros_like(total))
    return pooled.reshape(b, h_kv, n)


def _in_c(x: Tensor) -> bool:
    """Whether the C kernels serve a step on ``x``: on a CPU, where they are built, a dozen small
    torch ops per call become one call (the same arithmetic in float32, up to its order)."""
    return x.device.type == "cpu" and native.available()


def _rows_in_c(kernel: str, scores: Tensor, mask: Tensor, *args: int) -> Tensor:
    """``kernel`` (``kvc_pool`` or ``kvc_minmax``) on ``[B, H_kv, N]`` scores with a ``[B, N]`` mask."""
    b, h_kv, n = scores.shape
    x = scores.to(torch.float32).contiguous()
    m = mask.to(torch.uint8).contiguous()
    out = torch.empty_like(x)
    if getattr(native.library(), kernel)(x.data_ptr(), m.data_ptr(), b, h_kv, n, *args, out.data_ptr()) != 0:
        raise ValueError(f"{kernel} refused its arguments {args} (pool_kernel must be odd)")
    return out


def content_relevance(obs: LayerObservation) -> Tensor:
    """Cosine similarity ``[B, H_kv, N]`` between each pre-RoPE key and its group's mean pre-RoPE
    window query (valid queries only).

    Vectors are divided by their largest magnitude before any product, so extreme inputs do not
    overflow; a zero vector has similarity 0 with everything.
    """
    keys = obs.keys_pre_rope.float()
    h_kv = keys.shape[1]
    queries = _grouped(obs.queries_pre_rope.float(), h_kv)  # [B, H_kv, g, W, d]
    q_valid = (obs.window_query_positions >= 0)[:, None, None, :, None]  # [B, 1, 1, W, 1]
    # Only the direction of the mean matters: average the scaled queries.
    q_scaled = queries / _abs_max(queries, (2, 3, 4)) * q_valid
    q_mean = q_scaled.sum(dim=(2, 3))  # [B, H_kv, d]
    q_dir = q_mean / _abs_max(q_mean, (2,))
    q_dir = q_dir / torch.linalg.vector_norm(q_dir, dim=-1, keepdim=True).clamp_min(_TINY)

    k_dir = keys / _abs_max(keys, (3,))
    k_norm = torch.linalg.vector_norm(k_dir, dim=-1)  # [B, H_kv, N], in [1, sqrt(d)] unless zero
    dots = torch.einsum("bhnd,bhd->bhn", k_dir, q_dir)
    return (dots / k_norm.clamp_min(_TINY)).clamp(-1.0, 1.0)


def structural_prior(obs: LayerObservation, recency_fraction: float) -> Tensor:
    """Sinks and recency, ``[B, H_kv, N]`` float32 (the same for every head).

    1 for sink positions (``< n_sink``), else ``exp(-(last - pos) / tau)``, where ``last`` is the
    newest real position of the row and ``tau = recency_fraction * (last + 1)``. Without padding
    ``last + 1`` is ``n_original``; with left padding it is the row's own length, so a short row
    of a padded batch is not judged against a longer one's time scale.
    """
    pos = obs.positions
    last = pos.amax(dim=1, keepdim=True).clamp_min(0)  # [B, 1]
    tau = recency_fraction * (last + 1).double()
    age = (last - pos).clamp_min(0).double()
    prior = torch.exp(-age / tau).float()
    prior = torch.where(obs.sink_mask, torch.ones_like(prior), prior)
    return prior[:, None, :].expand(-1, obs.keys.shape[1], -1)


def minmax_normalise(scores: Tensor, mask: Tensor) -> Tensor:
    """Scale ``[B, H_kv, N]`` scores to ``[0, 1]`` per ``(batch, KV head)`` over the ``[B, N]`` mask.

    A term that is constant over the masked tokens (or has none) carries no ranking information
    and becomes all zeros, so it adds nothing to a weighted sum. Scores must be finite and
    bounded (every term here lies within ``[-sqrt(d), sqrt(d)]``), so ``max - min`` cannot overflow.
    """
    if _in_c(scores):
        return _rows_in_c("kvc_minmax", scores, mask)
    # Few ops on purpose: on a GPU each is a launch, and this runs once per layer.
    hidden = ~mask[:, None, :]
    lo = scores.masked_fill(hidden, float("inf")).amin(dim=-1, keepdim=True)
    hi = scores.masked_fill(hidden, float("-inf")).amax(dim=-1, keepdim=True)
    span = hi - lo
    has_range = (span > 0) & (span < float("inf"))  # finite and positive (NaN fails both)
    out = ((scores - lo.where(has_range, 0.0)) / span.where(has_range, 1.0)).clamp_(0.0, 1.0)
    return out.where(has_range, 0.0)


def finalise(scores: Tensor, obs: LayerObservation) -> Tensor:
    """Apply the shared override: protected -> :data:`PROTECTED_SCORE`, padding -> :data:`PADDING_SCORE`.

    ``scores`` is ``[B, H_kv, N]`` with candidates already in ``[0, 1]``; returns float32.
    """
    scores = torch.where(obs.protected_mask[:, None, :], PROTECTED_SCORE, scores.float())
    return torch.where(obs.padding_mask[:, None, :], PADDING_SCORE, scores)
