"""What the evaluators need from a model: one prompt in, one :class:`GenerationResult` out."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from tqdm.auto import tqdm
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
        stop: Sequence[str] = (),
    ) -> GenerationResult:
        """Prefill ``prompt`` (the complete model input, chat template already applied) and decode.

        Args:
            prompt: the text to encode; encode it with :func:`kvcore.text.encode_prompt`
                so special tokens already in the text are not added twice.
            question_span: character offsets ``[start, end)`` of the question/instruction in
                ``prompt`` (the prompt-guided scorer's window); ``None`` means the last W tokens.
            max_new_tokens: most tokens to generate.
            stop: strings that end decoding once the text holds one; the text is cut before it.
        """
        ...


def require_text_generator(generator: object) -> TextGenerator:
    """``generator`` itself if it is a :class:`TextGenerator`, else a ``TypeError`` naming its type."""
    if not isinstance(generator, TextGenerator):
        raise TypeError(
            "generator must provide tokenizer, max_prompt_tokens and generate(prompt, *, question_span, "
            f"max_new_tokens); got {type(generator).__name__}"
        )
    return generator


Example = TypeVar("Example")


def generate_rows(
    examples: Iterable[Example],
    total: int,
    run: Callable[[Example], GenerationResult],
    score: Callable[[Example, GenerationResult], dict[str, Any]],
    *,
    desc: str,
    label: Callable[[Example], str],
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Generate and score example after example behind one progress bar, yielding each row as soon
    as it is done (the loop every evaluator shares)."""
    with tqdm(total=total, desc=desc, unit="ex", disable=not progress) as bar:
        for example in examples:
            bar.set_postfix_str(label(example), refresh=False)
            row = score(example, run(example))
            bar.update(1)
            yield row
