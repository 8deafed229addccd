"""Synthetic long-context probes: length, depth, determinism, scoring, evaluator plumbing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvcomp_eval.data.probes import PROBES, Filler, ProbeExample, build_probe
from kvcomp_eval.evaluators.probes import ProbeEvaluator, summarize_probe_rows
from kvcomp_eval.data.tokenization import count_prompt_tokens
from kvcore.types import GenerationResult

HAYSTACK = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "haystack"

CHAT_TEMPLATE = (
    "<|user|>\n{{ messages[0]['content'] }}\n{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in milliseconds: round-trips any text, realistic multi-byte tokens."""
    corpus = [
        "The grass is green. The sky is blue. The sun is warm. Here we go again. " * 4,
        "The pass key is 12345. Remember it. What is the special magic number for apple? VAR ABCDE = 1.",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if chat:
        hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer(chat=False)


class ReadingGenerator:
    """Test double for the model: answers with every number and VAR name the prompt contains
    (in order, deduplicated), or only the first number when ``first_only``."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, max_prompt_tokens: int, first_only: bool = False) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.first_only = first_only
        self.calls: list[tuple[str, tuple[int, int] | None, int]] = []

    def generate(
        self, prompt: str, *, question_span: tuple[int, int] | None = None, max_new_tokens: int = 32
    ) -> GenerationResult:
        self.calls.append((prompt, question_span, max_new_tokens))
        context = prompt[: question_span[0]] if question_span is not None else prompt
        found = list(dict.fromkeys(re.findall(r"\b\d{5,}\b|(?<=VAR )[A-Z]{5}\b", context)))
        text = " " + (found[0] if self.first_only else ", ".join(found))
        n_prompt = count_prompt_tokens(self.tokenizer, prompt)
        return GenerationResult(
            text=text,
            token_ids=self.tokenizer(text)["input_ids"][:max_new_tokens],
            prompt_tokens=n_prompt,
            kv_bytes=n_prompt * 64,
            kv_bytes_fp16_full=n_prompt * 64,
            avg_bits=16.0,
            tokens_kept_per_layer=[n_prompt],
            ttft_s=0.01,
            decode_tokens_per_s=100.0,
            peak_rss_bytes=1,
        )


@pytest.mark.parametrize("probe", PROBES)
def test_probe_prompt_shape(tok: PreTrainedTokenizerFast, probe: str) -> None:
    ex = build_probe(probe, tok, 300, 0.5, seed=3)
    assert ex.prompt_tokens == count_prompt_tokens(tok, ex.prompt)
    # As long as whole filler sentences allow: the gap is less than one more sentence.
    longest = max(len(tok(" " + s)["input_ids"]) for s in Filler.default().sentences)
    assert 300 - longest - 2 < ex.prompt_tokens <= 300
    question = ex.prompt[ex.question_span[0] : ex.question_span[1]]
    assert question.endswith("?") or question.endswith("above.")
    # Every gold answer is in the context, and the question comes after all of them.
    for answer in ex.answers:
        assert 0 <= ex.prompt.find(answer) < ex.question_span[0]
    assert ex.prompt.rstrip().endswith(("is", "are", "are:"))


def test_depth_moves_the_needle_through_the_context(tok: PreTrainedTokenizerFast) -> None:
    places = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        ex = build_probe("passkey", tok, 600, depth, seed=1)
        places.append(ex.prompt.find(f"The pass key is {ex.answers[0]}") / ex.question_span[0])
    assert places == sorted(places)
    assert places[0] < 0.2 and places[-1] > 0.85
    assert places[2] == pytest.approx(0.5, abs=0.1)


def test_probes_are_deterministic_by_seed(tok: PreTrainedTokenizerFast) -> None:
    a = build_probe("multi_needle", tok, 300, 0.3, seed=7, index=2)
    b = build_probe("multi_needle", tok, 300, 0.3, seed=7, index=2)
    assert a == b
    assert build_probe("multi_needle", tok, 300, 0.3, seed=8, index=2).answers != a.answers
    # The same fact is hidden at every length and depth of a sweep.
    assert build_probe("multi_needle", tok, 500, 0.9, seed=7, index=2).answers == a.answers


def test_multi_needle_has_distractors_and_variable_chain_is_in_order(tok: PreTrainedTokenizerFast) -> None:
    ex = build_probe("multi_needle", tok, 400, 0.5, seed=0, n_needles=5)
    assert len(re.findall(r"special magic numbers for \w+ is: \d{7}", ex.prompt)) == 5
    vt = build_probe("variable_tracking", tok, 400, 0.2, seed=0, chain_length=3, n_distractor_chains=2)
    assert len(vt.answers) == 3 and len(re.findall(r"VAR [A-Z]{5} =", vt.prompt)) == 9
    # Each variable of the chain is defined before it is used.
    positions = [vt.prompt.find(f"VAR {name} =") for name in vt.answers]
    assert positions == sorted(positions)


def test_probe_scoring() -> None:
    ex = ProbeExample("multi_value", "p", (0, 1), ("1234567", "7654321"), 10, 10, 0.5, 0, 0)
    assert ex.score(" 1234567 and 7654321.") == 1.0
    assert ex.score(" 1234567") == 0.5
    assert ex.score(" 12345678") == 0.0  # a longer number is not the answer
    names = ProbeExample("variable_tracking", "p", (0, 1), ("ABCDE",), 10, 10, 0.5, 0, 0)
    assert names.score("ABCDE, XYZZY") == 1.0 and names.score("ABCDEF") == 0.0


@pytest.mark.skipif(not HAYSTACK.is_dir(), reason=f"haystack essays not present at {HAYSTACK}")
def test_haystack_filler_from_real_essays(tok: PreTrainedTokenizerFast) -> None:
    filler = Filler.from_dir(HAYSTACK)
    assert len(filler.sentences) > 1000
    ex = build_probe("passkey", tok, 1500, 0.5, seed=0, filler=filler)
    assert 1400 <= ex.prompt_tokens <= 1500
    assert "The grass is green." not in ex.prompt


def test_filler_and_builder_refuse_bad_input(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none"))):
        Filler.from_dir(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=r"no \*\.txt files"):
        Filler.from_dir(tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        Filler([" ", ""])
    with pytest.raises(ValueError, match="unknown probe 'needle'.*passkey"):
        build_probe("needle", tok, 300, 0.5)
    with pytest.raises(ValueError, match="depth must be in"):
        build_probe("passkey", tok, 300, 1.5)
    with pytest.raises(ValueError, match="too short for probe 'passkey'"):
        build_probe("passkey", tok, 20, 0.5)
    with pytest.raises(ValueError, match="no chat template"):
        build_probe("passkey", tok, 300, 0.5, use_chat_template=True)


@settings(max_examples=25, deadline=None)
@given(length=st.integers(400, 900), depth=st.floats(0.0, 1.0), probe=st.sampled_from(PROBES))
def test_probe_never_exceeds_its_length(length: int, depth: float, probe: str) -> None:
    tok = make_tokenizer(chat=True)
    ex = build_probe(probe, tok, length, depth, use_chat_template=True)
    assert ex.prompt_tokens <= length
    assert ex.prompt.startswith("<|user|>\n") and "<|assistant|>\n" in ex.prompt[ex.question_span[1] :]


def test_evaluator_sweep_rows_and_summary(tok: PreTrainedTokenizerFast) -> None:
    gen = ReadingGenerator(tok, 1000)
    ev = ProbeEvaluator(gen, probe="passkey", lengths=[200, 400], depths=[0, 0.5, 1], n_per_cell=2, progress=False)
    summary = ev.evaluate()
    assert len(ev.rows) == 12 and len(gen.calls) == 12
    assert summary["probe"] == "passkey" and summary["n"] == 12 and summary["mean_score"] == 1.0
    assert set(summary["by_length"]) == {200, 400} and set(summary["by_depth"]) == {0.0, 0.5, 1.0}
    assert len(summary["cells"]) == 6 and all(c["n"] == 2 for c in summary["cells"])
    prompt, span, max_new = gen.calls[0]
    assert prompt[span[0] : span[1]] == "What is the pass key?" and max_new == 12
    row = ev.rows[0]
    assert {"length", "depth", "index", "score", "prediction", "answers", "prompt_tokens", "kv_bytes"} <= set(row)
    assert row["prompt_tokens"] <= 200
    json.dumps(ev.rows)


def test_evaluator_multi_needle_partial_and_span_switch(tok: PreTrainedTokenizerFast) -> None:
    # Answering with the first number found is right only when the asked key comes first.
    gen = ReadingGenerator(tok, 1000, first_only=True)
    ev = ProbeEvaluator(gen, probe="multi_needle", lengths=[400], depths=[0.0, 1.0], n_per_cell=3, progress=False)
    summary = ev.evaluate()
    assert summary["by_depth"][0.0] == 1.0  # depth 0: the asked needle is the first fact
    assert summary["by_depth"][1.0] == 0.0  # depth 1: distractors come first
    rows = list(
        ProbeEvaluator(
            ReadingGenerator(tok, 1000), probe="variable_tracking", lengths=[400], depths=[0.5],
            n_per_cell=1, use_question_span=False, progress=False,
        ).iter_examples()
    )
    assert rows[0]["question_span"] is None and rows[0]["score"] == 1.0


def test_evaluator_refuses_bad_configs(tok: PreTrainedTokenizerFast) -> None:
    gen = ReadingGenerator(tok, 500)
    with pytest.raises(ValueError, match=r"lengths \[800\] exceed the generator's max_prompt_tokens=500"):
        ProbeEvaluator(gen, lengths=[300, 800])
    with pytest.raises(ValidationError, match="probe"):
        ProbeEvaluator(gen, probe="needle")
    with pytest.raises(ValidationError, match=r"depths must lie in \[0, 1\]"):
        ProbeEvaluator(gen, depths=[0.5, 2.0])
    with pytest.raises(ValidationError, match="n_per_cell"):
        ProbeEvaluator(gen, n_per_cell=0)
    with pytest.raises(ValidationError, match="unknown_option"):
        ProbeEvaluator(gen, unknown_option=3)
    with pytest.raises(ValueError, match="no chat template"):
        ProbeEvaluator(gen, lengths=[300], use_chat_template=True)
    with pytest.raises(ValueError, match="no rows"):
        summarize_probe_rows([])


def test_chat_template_is_used_when_the_tokenizer_has_one(tok: PreTrainedTokenizerFast) -> None:
    chat_tok = make_tokenizer(chat=True)
    wrapped = build_probe("passkey", chat_tok, 300, 0.5)
    assert wrapped.prompt.startswith("<|user|>\n") and wrapped.prompt.endswith("<|assistant|>\nThe pass key is")
    assert not build_probe("passkey", chat_tok, 300, 0.5, use_chat_template=False).prompt.startswith("<|user|>")
    assert build_probe("passkey", tok, 300, 0.5).prompt.endswith("\nAnswer: The pass key is")
