"""Fidelity of a compressed model to the uncompressed one on the same prompt.

Task scores of a small model are low and noisy; how far its outputs move away from the
uncompressed model's is measurable at every length:

- next-token KL(P_ref || P_cmp) at the end of prefill (nats);
- greedy agreement: exact match of the generated token ids, and the common prefix length
  divided by the reference length;
- ROUGE-L (plain LCS F1 over words) between the compressed and the reference output texts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from kvcore.types import GenerationResult

__all__ = [
    "next_token_kl",
    "greedy_exact_match",
    "prefix_agreement",
    "output_rouge_l",
    "rouge_l_from_tokens",
    "FidelityMetrics",
]


def next_token_kl(ref_logprobs: Tensor, cmp_logprobs: Tensor) -> Tensor:
    """KL(P_ref || P_cmp) = sum_v p_ref(v) * (log p_ref(v) - log p_cmp(v)), in nats.

    Args:
        ref_logprobs: log-probabilities ``[..., V]`` of the reference (uncompressed) model.
        cmp_logprobs: log-probabilities ``[..., V]`` of the compressed model, same shape.

    Returns:
        float64 tensor ``[...]`` (0-d for ``[V]`` inputs), ``>= 0``; ``inf`` where the compressed
        model gives probability 0 to a token the reference can emit.
    """
    if ref_logprobs.shape != cmp_logprobs.shape:
        raise ValueError(
            f"log-prob shapes differ: reference {tuple(ref_logprobs.shape)} vs compressed {tuple(cmp_logprobs.shape)}"
        )
    if ref_logprobs.ndim == 0 or ref_logprobs.shape[-1] == 0:
        raise ValueError(f"log-probs need a non-empty vocabulary axis, got shape {tuple(ref_logprobs.shape)}")
    if not (ref_logprobs.is_floating_point() and cmp_logprobs.is_floating_point()):
        raise ValueError("log-probs must be floating-point tensors")
    ref = ref_logprobs.detach().to(torch.float64)
    cmp = cmp_logprobs.detach().to(torch.float64)
    for name, t in (("reference", ref), ("compressed", cmp)):
        total = torch.logsumexp(t, dim=-1)
        if not torch.allclose(total, torch.zeros_like(total), atol=1e-3):
            raise ValueError(f"{name} log-probs are not normalised (logsumexp = {total.flatten()[:4].tolist()})")
    p_ref = ref.exp()
    # Tokens the reference never emits contribute nothing (0 * log 0 := 0), even where cmp is -inf.
    terms = torch.where(p_ref > 0, p_ref * (ref - cmp), torch.zeros_like(ref))
    return terms.sum(dim=-1).clamp_min(0.0)


def greedy_exact_match(ref_ids: Sequence[int], cmp_ids: Sequence[int]) -> bool:
    """True if both generations produced exactly the same token ids."""
    return list(ref_ids) == list(cmp_ids)


def prefix_agreement(ref_ids: Sequence[int], cmp_ids: Sequence[int]) -> float:
    """Length of the common prefix divided by the reference length, in [0, 1].

    An empty reference agrees only with an empty output (1.0), else 0.0.
    """
    ref, cmp = list(ref_ids), list(cmp_ids)
    if not ref:
        return 1.0 if not cmp else 0.0
    common = 0
    for a, b in zip(ref, cmp):
        if a != b:
            break
        common += 1
    return common / len(ref)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One DP row over the shorter sequence: O(len(a) * len(b)) time, O(min) memory.
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_from_tokens(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """ROUGE-L F1 = 2PR/(P+R) with P = LCS/len(pred), R = LCS/len(gold); 0 if either is empty."""
    if not pred_tokens or not gold_tokens:
        return 0.0
    lcs = _lcs_length(pred_tokens, gold_tokens)
    if lcs == 0:
        return 0.0
    precision = lcs / len(pred_tokens)
    recall = lcs / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


_WORD = re.compile(r"[a-z0-9]+")


def output_rouge_l(ref_text: str, cmp_text: str) -> float:
    """ROUGE-L F1 (plain LCS F1 over lowercase alphanumeric words) of the compressed output against the reference.

    A similarity of two generations, not a LongBench score: it needs no lm-eval and is
    symmetric (the LongBench ``rouge_l`` in :mod:`.tasks` is neither).
    """
    return rouge_l_from_tokens(_WORD.findall(cmp_text.lower()), _WORD.findall(ref_text.lower()))


@dataclass(frozen=True)
class FidelityMetrics:
    """Fidelity of one compressed generation (or the mean over several) to the reference.

    Attributes:
        n: number of prompt pairs.
        next_token_kl: mean KL(P_ref || P_cmp) at the end of prefill, nats (``None`` if a result
            lacks ``first_token_logprobs``).
        exact_match: share of pairs whose generated ids are identical.
        prefix_agreement: mean common-prefix share of the reference generation.
        rouge_l: mean ROUGE-L F1 of compressed vs reference text.
    """

    n: int
    next_token_kl: float | None
    exact_match: float
    prefix_agreement: float
    rouge_l: float

    @classmethod
    def from_pair(cls, reference: GenerationResult, compressed: GenerationResult) -> FidelityMetrics:
        """Compare one compressed generation to the reference generation of the same prompt."""
        kl: float | None = None
        if reference.first_token_logprobs is not None and compressed.first_token_logprobs is not None:
            kl = float(next_token_kl(reference.first_token_logprobs, compressed.first_token_logprobs))
        return cls(
            n=1,
            next_token_kl=kl,
            exact_match=float(greedy_exact_match(reference.token_ids, compressed.token_ids)),
            prefix_agreement=prefix_agreement(reference.token_ids, compressed.token_ids),
            rouge_l=output_rouge_l(reference.text, compressed.text),
        )

    @classmethod
    def from_pairs(
        cls, references: Sequence[GenerationResult], compressed: Sequence[GenerationResult]
    ) -> FidelityMetrics:
        """Mean fidelity over aligned lists of reference and compressed generations."""
        if len(references) != len(compressed):
            raise ValueError(f"{len(references)} reference results vs {len(compressed)} compressed results")
        if not references:
            raise ValueError("no result pairs to compare")
        return cls.mean([cls.from_pair(r, c) for r, c in zip(references, compressed)])

    @classmethod
    def mean(cls, items: Sequence[FidelityMetrics]) -> FidelityMetrics:
        """Average of several (weighted by their ``n``)."""
        if not items:
            raise ValueError("no fidelity metrics to average")
        n = sum(m.n for m in items)

        def avg(values: list[float]) -> float:
            return sum(v * m.n for v, m in zip(values, items)) / n

        kls = [m.next_token_kl for m in items]
        return cls(
            n=n,
            next_token_kl=None if any(k is None for k in kls) else avg([k for k in kls if k is not None]),
            exact_match=avg([m.exact_match for m in items]),
            prefix_agreement=avg([m.prefix_agreement for m in items]),
            rouge_l=avg([m.rouge_l for m in items]),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
