"""What the evaluators need from a model: one prompt in, one :class:`GenerationResult` out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from transformers import PreTrainedTokenizerBase

from kvcore.types import GenerationResult


@runtime_checkable
class TextGenerator(Protocol):
    """A model that answers one complete prompt at a time.

    Attributes:
        tokenizer: the model's tokenizer; evaluators use it to measure and truncate prompts.
        max_prompt_tokens: longest prompt, in tokens, the model accepts; evaluators never
            build a longer one.
    """

    tokenizer: PreTrainedTokenizerBase
    max_prompt_tokens: int

    def generate(
        self,
        prompt: str,
        *,
        question_span: tuple[int, int] | None = None,
        max_new_tokens: int = 32,
    ) -> GenerationResult:
        """Prefill ``prompt`` (the complete model input, chat template already applied) and decode.

        Args:
            prompt: the text to encode; encode it with :func:`kvcomp_eval.tokenization.encode_prompt`
                so special tokens already in the text are not added twice.
            question_span: character offsets ``[start, end)`` of the question/instruction in
                ``prompt`` (the prompt-guided scorer's window); ``None`` means the last W tokens.
            max_new_tokens: most tokens to generate.
        """
        ...
