"""Prompt text to token ids: the one encoder, question spans in tokens, middle truncation.

Every path that turns a prompt into model input (the pipeline, the benchmark, the lm-eval
model, the LongBench prompt builder) goes through these functions, so a prompt's length in
tokens, its question window and its truncation are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def adds_special_tokens(tokenizer: Any, text: str) -> bool:
    """Whether encoding ``text`` should add the tokenizer's special tokens.

    A rendered chat template usually starts with the BOS token already written as text; adding
    special tokens again would put two BOS tokens in front. So they are added only when the
    text does not already start with ``tokenizer.bos_token``.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return not (bool(bos) and text.startswith(bos))


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a complete prompt, the tokenizer's special tokens added at most once."""
    return list(tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer, text))["input_ids"])


def encode_prompt_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """:func:`encode_prompt` plus each token's character range ``(start, end)`` (a fast tokenizer's offsets)."""
    enc = tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer, text), return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def count_prompt_tokens(tokenizer: Any, text: str) -> int:
    """Length in tokens of ``text`` encoded by :func:`encode_prompt`."""
    return len(encode_prompt(tokenizer, text))


def tokens_in_char_span(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens that overlap the character span ``[start, end)``, in order.

    Tokens with an empty range (special tokens) never overlap anything.
    """
    start, end = span
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


def char_span_to_token_span(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> tuple[int, int] | None:
    """Token range ``[first, last + 1)`` covering the character span ``[start, end)``.

    Args:
        offsets: per token ``(char_start, char_end)`` as a fast tokenizer's
            ``return_offsets_mapping`` gives it; special tokens have empty ranges and never match.
        span: character offsets ``[start, end)`` in the encoded text.

    Returns:
        The first and one-past-last token overlapping the span, or ``None`` if none does.
    """
    start, end = span
    if start < 0 or end <= start:
        raise ValueError(f"span must satisfy 0 <= start < end, got {span!r}")
    hits = tokens_in_char_span(offsets, span)
    if not hits:
        return None
    return hits[0], hits[-1] + 1


def middle_split(budget: int) -> tuple[int, int]:
    """``(head, tail)``: a prompt cut to ``budget`` tokens keeps its first ``head`` and last ``tail``
    tokens (LongBench's rule: the instruction at the start and the question at the end survive)."""
    if budget < 1:
        raise ValueError(f"a truncation budget must be >= 1 token, got {budget}")
    head = budget // 2
    return head, budget - head


def truncate_middle_ids(ids: Tensor, window: Tensor | None, budget: int) -> tuple[Tensor, Tensor | None]:
    """Cut the token ids ``ids [N]`` to ``budget`` by :func:`middle_split`; ``window`` (token indices
    of the question) is moved to the kept positions, and indices that fell in the cut are dropped."""
    head, tail = middle_split(budget)
    n = ids.numel()
    kept = torch.cat([ids[:head], ids[n - tail :]])
    if window is not None:
        in_head = window[window < head]
        in_tail = window[window >= n - tail] - (n - tail) + head
        window = torch.cat([in_head, in_tail])
    return kept, window


def truncate_middle_text(
    tokenizer: Any, text: str, budget: int, ids: Sequence[int] | None = None
) -> tuple[str, bool]:
    """``text`` cut to ``budget`` content tokens by :func:`middle_split` and decoded back to text.

    ``ids`` are ``text``'s tokens encoded without special tokens (encoded here when ``None``).
    Returns the text and whether it was cut; a text that fits comes back unchanged.
    """
    if ids is None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return text, False
    head, tail = middle_split(budget)
    decode = tokenizer.decode
    cut = decode(list(ids[:head]), skip_special_tokens=True) + decode(list(ids[len(ids) - tail :]), skip_special_tokens=True)
    return cut, True
