"""Synthetic long-context probes: facts hidden at a chosen depth in filler text of a chosen length.

Four probes, each deterministic by seed:

- ``passkey``: one five-digit pass key in the filler; "What is the pass key?".
- ``multi_needle``: several ``key -> number`` facts; ask for the number of one key (the
  others are distractors).
- ``multi_value``: several numbers for the same key; ask for all of them.
- ``variable_tracking``: a chain of assignments ``VAR A = 12345``, ``VAR B = VAR A``, ... plus
  distractor chains with other values; ask which variables hold the value.

Lengths are in tokens of the generator's tokenizer (the whole prompt, template included, fits
in ``length`` and is as close to it as whole filler sentences allow). Depth is the fraction of
the filler that comes before the (first) fact: 0 at the start of the context, 1 at its end.
The question always comes after the context and the prompt ends with a short answer prefix
("The pass key is"), which small models need.

Scoring: the share of the gold answers found in the output as whole numbers/words.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

from kvcomp_eval.data.tokenization import count_prompt_tokens

ProbeName = Literal["passkey", "multi_needle", "multi_value", "variable_tracking"]
PROBES: tuple[str, ...] = ("passkey", "multi_needle", "multi_value", "variable_tracking")

DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 12,
    "multi_needle": 16,
    "multi_value": 64,
    "variable_tracking": 40,
}
"""Tokens to generate per probe: enough for the answer, short enough to be cheap."""

# Plain, self-similar sentences: easy for a model to skip, so the probe measures retrieval.
_DEFAULT_FILLER: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is warm.",
    "The river runs down to the sea.",
    "Here we go again.",
)

# Keys of the multi-needle probes: short, distinct, one token or two in most vocabularies.
_KEY_WORDS: tuple[str, ...] = (
    "apple", "river", "candle", "tiger", "window", "garden", "violin", "rocket", "pepper", "island",
    "hammer", "forest", "silver", "dragon", "mirror", "rabbit", "planet", "button", "castle", "meadow",
    "lemon", "anchor", "falcon", "harbor", "pillow", "ladder", "marble", "orange", "saddle", "tunnel",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class Filler:
    """Sentences that pad a probe to its length; used cyclically from a seed-chosen start.

    Parameters
    ----------
    sentences:
        The filler units, in order; a fact is only ever inserted between two of them.
    """

    def __init__(self, sentences: Sequence[str]) -> None:
        units = [" ".join(s.split()) for s in sentences]
        units = [u for u in units if u]
        if not units:
            raise ValueError("filler needs at least one non-empty sentence")
        self.sentences: tuple[str, ...] = tuple(units)

    @classmethod
    def default(cls) -> Filler:
        """The built-in repetitive filler."""
        return cls(_DEFAULT_FILLER)

    @classmethod
    def from_dir(cls, haystack_dir: str | os.PathLike[str]) -> Filler:
        """Sentences of every ``*.txt`` file in ``haystack_dir``, files in name order."""
        path = Path(haystack_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"haystack folder not found: {path}")
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no *.txt files in haystack folder {path}")
        sentences: list[str] = []
        for file in files:
            text = file.read_text(encoding="utf-8", errors="replace")
            sentences.extend(_SENTENCE_END.split(" ".join(text.split())))
        return cls(sentences)

    def take(self, n: int, start: int) -> list[str]:
        """``n`` sentences from index ``start`` on, wrapping around."""
        k = len(self.sentences)
        return [self.sentences[(start + i) % k] for i in range(n)]


@dataclass(frozen=True)
class ProbeSpec:
    """The content of one probe example before filler is added.

    Attributes:
        intro: text before the context.
        facts: ``(fraction, sentence)``; each sentence goes after ``round(fraction * n)`` filler
            sentences, in this order for equal slots.
        question: the question, asked after the context.
        answer_prefix: start of the answer, the last text of the prompt.
        answers: gold strings the output should contain.
    """

    intro: str
    facts: tuple[tuple[float, str], ...]
    question: str
    answer_prefix: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class ProbeExample:
    """One probe prompt.

    Attributes:
        probe: probe name.
        prompt: complete model input.
        question_span: character offsets ``[start, end)`` of the question in ``prompt``.
        answers: gold strings.
        length: requested length in tokens.
        prompt_tokens: actual length in tokens (``<= length``).
        depth: fraction of the filler before the first fact.
        index: example number within its (length, depth) cell.
        seed: base seed.
    """

    probe: str
    prompt: str
    question_span: tuple[int, int]
    answers: tuple[str, ...]
    length: int
    prompt_tokens: int
    depth: float
    index: int
    seed: int

    def score(self, prediction: str) -> float:
        """Share of the gold answers found in ``prediction`` as whole numbers or words."""
        found = sum(_contains_whole(prediction, a) for a in self.answers)
        return found / len(self.answers)


def _contains_whole(text: str, needle: str) -> bool:
    # "12345" must not count inside "123456", nor a name inside a longer name.
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(needle)}(?![A-Za-z0-9])", text) is not None


def _distinct_numbers(rng: random.Random, n: int, digits: int) -> list[str]:
    low, high = 10 ** (digits - 1), 10**digits - 1
    return [str(v) for v in rng.sample(range(low, high + 1), n)]


def _names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    return names


_INTRO_FACT = (
    "There is important information hidden inside a lot of irrelevant text. "
    "Find it and remember it. I will ask you about it.\n\n"
)


def _spec_passkey(rng: random.Random, depth: float, **_: int) -> ProbeSpec:
    key = _distinct_numbers(rng, 1, 5)[0]
    fact = f"The pass key is {key}. Remember it. {key} is the pass key."
    return ProbeSpec(
        intro=_INTRO_FACT,
        facts=((depth, fact),),
        question="What is the pass key?",
        answer_prefix="The pass key is",
        answers=(key,),
    )


def _spec_multi_needle(rng: random.Random, depth: float, *, n_needles: int, **_: int) -> ProbeSpec:
    keys = rng.sample(_KEY_WORDS, n_needles)
    values = _distinct_numbers(rng, n_needles, 7)
    facts = [(depth, f"One of the special magic numbers for {keys[0]} is: {values[0]}.")]
    facts += [(rng.random(), f"One of the special magic numbers for {k} is: {v}.") for k, v in zip(keys[1:], values[1:])]
    return ProbeSpec(
        intro=_INTRO_FACT,
        facts=tuple(facts),
        question=f"What is the special magic number for {keys[0]}?",
        answer_prefix=f"The special magic number for {keys[0]} is",
        answers=(values[0],),
    )


def _spec_multi_value(rng: random.Random, depth: float, *, n_values: int, **_: int) -> ProbeSpec:
    key = rng.choice(_KEY_WORDS)
    values = _distinct_numbers(rng, n_values, 7)
    facts = [(depth, f"One of the special magic numbers for {key} is: {values[0]}.")]
    facts += [(rng.random(), f"One of the special magic numbers for {key} is: {v}.") for v in values[1:]]
    return ProbeSpec(
        intro=_INTRO_FACT,
        facts=tuple(facts),
        question=f"What are all the special magic numbers for {key}?",
        answer_prefix=f"The special magic numbers for {key} are",
        answers=tuple(values),
    )


def _chain(names: Sequence[str], value: str, start: float, rng: random.Random) -> list[tuple[float, str]]:
    # Links go in text order after ``start``, so every variable is defined before it is used.
    fractions = [start] + sorted(start + (1.0 - start) * rng.random() for _ in names[1:])
    statements = [f"VAR {names[0]} = {value}."]
    statements += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return list(zip(fractions, statements))


def _spec_variable_tracking(
    rng: random.Random, depth: float, *, chain_length: int, n_distractor_chains: int, **_: int
) -> ProbeSpec:
    n_chains = 1 + n_distractor_chains
    names = _names(rng, chain_length * n_chains)
    values = _distinct_numbers(rng, n_chains, 5)
    facts = _chain(names[:chain_length], values[0], depth, rng)
    for c in range(1, n_chains):
        chain_names = names[c * chain_length : (c + 1) * chain_length]
        facts += _chain(chain_names, values[c], rng.random(), rng)
    return ProbeSpec(
        intro=(
            "Memorize and track the chain(s) of variable assignments hidden in the following text.\n\n"
        ),
        facts=tuple(facts),
        question=f"Find all variables that are assigned the value {values[0]} in the text above.",
        answer_prefix=f"The variables assigned the value {values[0]} are:",
        answers=tuple(names[:chain_length]),
    )


_SPEC_BUILDERS: dict[str, Callable[..., ProbeSpec]] = {
    "passkey": _spec_passkey,
    "multi_needle": _spec_multi_needle,
    "multi_value": _spec_multi_value,
    "variable_tracking": _spec_variable_tracking,
}


def _render(
    spec: ProbeSpec,
    filler_units: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    use_chat_template: bool,
) -> tuple[str, tuple[int, int]]:
    n = len(filler_units)
    slots: dict[int, list[str]] = {}
    for fraction, sentence in spec.facts:
        slots.setdefault(min(n, max(0, round(fraction * n))), []).append(sentence)
    parts: list[str] = []
    for i in range(n + 1):
        parts.extend(slots.get(i, ()))
        if i < n:
            parts.append(filler_units[i])
    context = " ".join(parts)
    if use_chat_template:
        user = f"{spec.intro}{context}\n\n{spec.question}"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        prompt = f"{rendered}{spec.answer_prefix}"
    else:
        prompt = f"{spec.intro}{context}\n\nQuestion: {spec.question}\nAnswer: {spec.answer_prefix}"
    start = prompt.rfind(spec.question)
    return prompt, (start, start + len(spec.question))


def build_probe(
    probe: str,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    depth: float,
    *,
    index: int = 0,
    seed: int = 0,
    filler: Filler | None = None,
    use_chat_template: bool | None = None,
    n_needles: int = 4,
    n_values: int = 4,
    chain_length: int = 4,
    n_distractor_chains: int = 1,
) -> ProbeExample:
    """Build one probe prompt of at most ``length`` tokens with its first fact at ``depth``.

    The content (numbers, keys, names, filler start, distractor places) depends only on
    ``(seed, probe, index)``, so the same fact is hidden at every length and depth of a sweep.
    ``use_chat_template=None`` wraps the prompt in the tokenizer's chat template when it has
    one (instruction-tuned models retrieve far better that way).
    """
    if probe not in _SPEC_BUILDERS:
        raise ValueError(f"unknown probe {probe!r}; known probes: {', '.join(PROBES)}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int (tokens), got {length!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    chat = has_template if use_chat_template is None else use_chat_template
    filler = filler if filler is not None else Filler.default()
    rng = random.Random(f"{seed}:{probe}:{index}")
    spec = _SPEC_BUILDERS[probe](
        rng,
        depth,
        n_needles=n_needles,
        n_values=n_values,
        chain_length=chain_length,
        n_distractor_chains=n_distractor_chains,
    )
    start = rng.randrange(len(filler.sentences))

    def tokens_with(n: int) -> tuple[int, str, tuple[int, int]]:
        prompt, span = _render(spec, filler.take(n, start), tokenizer, chat)
        return count_prompt_tokens(tokenizer, prompt), prompt, span

    n_tokens, prompt, span = tokens_with(0)
    if n_tokens > length:
        raise ValueError(f"length {length} is too short for probe {probe!r}: it needs at least {n_tokens} tokens")
    # Largest filler count that fits: grow exponentially, then bisect (the count is monotone in n).
    lo, hi = 0, 1
    while (fit := tokens_with(hi))[0] <= length:
        lo, hi = hi, hi * 2
        n_tokens, prompt, span = fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fit = tokens_with(mid)
        if fit[0] <= length:
            lo = mid
            n_tokens, prompt, span = fit
        else:
            hi = mid
    return ProbeExample(
        probe=probe,
        prompt=prompt,
        question_span=span,
        answers=spec.answers,
        length=length,
        prompt_tokens=n_tokens,
        depth=float(depth),
        index=index,
        seed=seed,
    )
