"""Padded batches of prompts, and the kernel's prompt encoder re-exported for the evaluation code.

Encoding, token counts and character-to-token spans live in :mod:`kvcore.text`, the one encoder
the pipeline, the benchmark and the lm-eval model share (special tokens added at most once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from kvcore.text import adds_special_tokens, char_span_to_token_span, count_prompt_tokens, encode_prompt

__all__ = ["DataCollator", "PromptBatch", "char_span_to_token_span", "count_prompt_tokens", "encode_prompt"]


@dataclass
class PromptBatch:
    """A left-padded batch.

    Attributes:
        input_ids: ``[B, T]`` int64 token ids, padding on the left.
        attention_mask: ``[B, T]`` int64, 1 for real tokens, 0 for padding.
        question_token_spans: per prompt, the question's ``[start, end)`` token range in the
            padded coordinates, or ``None`` when no span was given or it matched no token.
    """

    input_ids: Tensor
    attention_mask: Tensor
    question_token_spans: list[tuple[int, int] | None]


class DataCollator:
    """Tokenises prompts and pads them on the left into one batch.

    Left padding keeps every prompt's last token in the last column, which is where decoding
    continues from.

    Parameters
    ----------
    tokenizer:
        A fast tokenizer (character offsets are needed to map question spans to tokens).
    max_prompt_tokens:
        Longest prompt accepted, in tokens; ``None`` for no limit.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int | None = None) -> None:
        if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool) or max_prompt_tokens < 1):
            raise ValueError(f"max_prompt_tokens must be a positive int or None, got {max_prompt_tokens!r}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.pad_token_id = int(pad_id)

    def __call__(
        self,
        prompts: Sequence[str],
        question_spans: Sequence[tuple[int, int] | None] | None = None,
    ) -> PromptBatch:
        """Encode and left-pad ``prompts``; ``question_spans`` are character spans per prompt."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty sequence of strings")
        if question_spans is not None and len(question_spans) != len(prompts):
            raise ValueError(
                f"question_spans has {len(question_spans)} entries for {len(prompts)} prompts"
            )
        encoded: list[list[int]] = []
        offsets: list[list[tuple[int, int]]] = []
        for i, text in enumerate(prompts):
            if not isinstance(text, str) or not text:
                raise ValueError(f"prompt {i} is empty or not a string: {text!r:.40}")
            enc = self.tokenizer(
                text,
                add_special_tokens=adds_special_tokens(self.tokenizer, text),
                return_offsets_mapping=question_spans is not None,
            )
            ids = list(enc["input_ids"])
            if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens, more than max_prompt_tokens={self.max_prompt_tokens}"
                )
            encoded.append(ids)
            offsets.append(list(enc["offset_mapping"]) if question_spans is not None else [])
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        spans: list[tuple[int, int] | None] = []
        for row, ids in enumerate(encoded):
            pad = width - len(ids)
            input_ids[row, pad:] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, pad:] = 1
            span = question_spans[row] if question_spans is not None else None
            token_span = char_span_to_token_span(offsets[row], span) if span is not None else None
            spans.append(None if token_span is None else (token_span[0] + pad, token_span[1] + pad))
        return PromptBatch(input_ids=input_ids, attention_mask=attention_mask, question_token_spans=spans)
