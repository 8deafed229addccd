"""Decode attention over a layer's full-precision tokens, and the merge of attention parts.

A compressed layer is read without ever concatenating its parts into one dense tensor. A
quantizer with :class:`~kvcore.protocols.TierAttention` attends its packed tiers and the
full-precision part (:class:`DensePart`: prefill residual plus decoded tokens) in one softmax.
For one without it, each part ``p`` (a dequantised tier, the dense part) yields its
softmax-normalised output ``o_p`` and the log-sum-exp ``lse_p`` of its logits; the exact
attention over the union is then

    out = sum_p exp(lse_p - m) * o_p / sum_p exp(lse_p - m),   m = max_p lse_p

(the flash-decoding merge). Rows are the query heads of one KV head folded together
(``[B, H_kv, g * q, d]``), so no key or value is ever repeated per query head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DensePart:
    """The full-precision tokens of a layer as decode attention reads them.

    ``keys``/``values`` are ``[B, H_kv, n, d]`` (storage dtype); ``mask`` is bool, broadcastable to
    ``[B, H_kv, r, n]`` (True = may attend), or ``None`` when every row sees every token.
    """

    keys: Tensor
    values: Tensor
    mask: Tensor | None = None


def safe_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim and its log-sum-exp, ``0`` / ``-inf`` for rows with no finite logit.

    Args:
        logits: float32 ``[..., n]``, ``-inf`` where a key is masked.

    Returns:
        probabilities ``[..., n]`` and log-sum-exp ``[...]``.
    """
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    # A fully masked row has lse = -inf; subtracting 0 instead gives exp(-inf) = 0, not NaN.
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse))
    return probs, lse.squeeze(-1)


def attend_dense(rows: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention of ``rows [B, H_kv, r, d]`` (already scaled) over dense ``keys/values [B, H_kv, n, d]``.

    ``mask`` is bool, broadcastable to ``[B, H_kv, r, n]`` (True = may attend), or ``None``.
    Returns the output ``[B, H_kv, r, d]`` and log-sum-exp ``[B, H_kv, r]``, both float32.
    """
    logits = torch.matmul(rows, keys.to(torch.float32).transpose(-1, -2))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    probs, lse = safe_softmax(logits)
    return torch.matmul(probs, values.to(torch.float32)), lse


def merge_parts(parts: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Exact attention output ``[..., r, d]`` from per-part ``(output [..., r, d], lse [..., r])``
    pairs (``lse`` is ``-inf`` where a part saw nothing; a row that saw nothing in any part gets
    0, not NaN)."""
    if len(parts) == 1:
        return parts[0][0]
    outputs, lse = torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts])
    top = lse.amax(dim=0)
    top = torch.where(torch.isinf(top), 0.0, top)
    weights = torch.exp(lse - top)  # [P, ..., r]
    total = weights.sum(dim=0)
    return (weights.unsqueeze(-1) * outputs).sum(dim=0) / torch.where(total > 0, total, 1.0).unsqueeze(-1)
