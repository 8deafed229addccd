"""LongBench loading, prompt building (middle truncation, chat rule, question span), collator, evaluator."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kvcomp_eval.data.longbench import (
    DATASET2MAXLEN,
    DATASET2PROMPT,
    LONGBENCH_E_TASKS,
    LONGBENCH_TASKS,
    NO_CHAT_TEMPLATE_TASKS,
    LongBenchDataLoader,
    LongBenchExample,
    build_prompt,
    prepare_prompt,
)
from kvcomp_eval.evaluators.longbench import LongBenchEvaluator, summarize_scores_by_length
from kvcomp_eval.evaluators.base import TextGenerator
from kvcomp_eval.runs.suite import BenchExample
from kvcomp_eval.data.tokenization import (
    DataCollator,
    char_span_to_token_span,
    count_prompt_tokens,
    encode_prompt,
)
from kvcore.types import GenerationResult

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
LONGBENCH_DIR = SHARED_DATA / "longbench"
MULTI_NEWS = LONGBENCH_DIR / "multi_news.jsonl"
needs_multi_news = pytest.mark.skipif(
    not MULTI_NEWS.is_file(), reason=f"real LongBench data not present at {MULTI_NEWS}"
)

CHAT_TEMPLATE = (
    "{{ bos_token }}<|user|>\n{{ messages[0]['content'] }}\n{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in milliseconds on a few lines: round-trips any text, adds BOS."""
    corpus = [
        "The grass is green. The sky is blue. Passage 1: news. Paragraph 3. Question: Answer: Summary: " * 4,
        "Now, write a one-page summary of all the news. You are given several news passages.",
        "def foo(x):\n    return x + 1\n# comment 0123456789",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer(chat=False)


@pytest.fixture(scope="module")
def chat_tok() -> PreTrainedTokenizerFast:
    return make_tokenizer(chat=True)


class ReadingGenerator:
    """Test double for the model: answers from the text it is given.

    It answers with the first number written after the question (or the span start) if there
    is one, else with the first ``max_new_tokens`` words of the prompt after its first 20.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, max_prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.calls: list[tuple[str, tuple[int, int] | None, int]] = []
        self.stops: list[tuple[str, ...]] = []

    def generate(
        self, prompt: str, *, question_span: tuple[int, int] | None = None, max_new_tokens: int = 32, stop=()
    ) -> GenerationResult:
        self.calls.append((prompt, question_span, max_new_tokens))
        self.stops.append(tuple(stop))
        n_prompt = count_prompt_tokens(self.tokenizer, prompt)
        assert n_prompt <= self.max_prompt_tokens
        tail = prompt[question_span[0] :] if question_span is not None else prompt
        numbers = re.findall(r"\d+", tail)
        text = numbers[0] if numbers else " ".join(prompt.split()[20 : 20 + max_new_tokens])
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
        full = n_prompt * 2 * 2 * 8 * 2  # layers x (K, V) x head dim x fp16 bytes, uncompressed
        return GenerationResult(
            text=text,
            token_ids=list(ids),
            prompt_tokens=n_prompt,
            kv_bytes=full,
            kv_bytes_fp16_full=full,
            avg_bits=16.0,
            tokens_kept_per_layer=[n_prompt, n_prompt],
            ttft_s=0.01,
            decode_tokens_per_s=100.0,
            peak_rss_bytes=1,
        )


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def example(task: str, context: str, inp: str, answers: list[str] | None = None, **extra: Any) -> LongBenchExample:
    return LongBenchExample(task=task, index=0, input=inp, context=context, answers=tuple(answers or ["x"]), **extra)


# --- official configuration -------------------------------------------------------------------


def test_task_lists_and_official_config() -> None:
    assert len(LONGBENCH_TASKS) == 21
    assert len(LONGBENCH_E_TASKS) == 13 and set(LONGBENCH_E_TASKS) <= set(LONGBENCH_TASKS)
    assert set(DATASET2PROMPT) == set(LONGBENCH_TASKS) == set(DATASET2MAXLEN)
    assert DATASET2MAXLEN["multi_news"] == 512 and DATASET2MAXLEN["hotpotqa"] == 32
    assert NO_CHAT_TEMPLATE_TASKS == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    for template in DATASET2PROMPT.values():
        assert "{context}" in template


@pytest.mark.skipif(not (LONGBENCH_DIR / "config").is_dir(), reason="LongBench config not present in ../shared/data")
def test_shipped_config_equals_the_official_files() -> None:
    for name, table in (("dataset2prompt.json", DATASET2PROMPT), ("dataset2maxlen.json", DATASET2MAXLEN)):
        assert json.loads((LONGBENCH_DIR / "config" / name).read_text(encoding="utf-8")) == table


# --- loading ----------------------------------------------------------------------------------


@needs_multi_news
def test_loads_real_multi_news_with_limit_and_offset() -> None:
    everything = LongBenchDataLoader(LONGBENCH_DIR).load("multi_news")
    assert len(everything) == 150
    assert all(ex.answers and ex.context for ex in everything)
    first = LongBenchDataLoader(LONGBENCH_DIR, limit=3).load("multi_news")
    later = LongBenchDataLoader(LONGBENCH_DIR, limit=3, offset=3).load("multi_news")
    assert [e.index for e in first] == [0, 1, 2] and [e.index for e in later] == [3, 4, 5]
    assert {e.id for e in first}.isdisjoint({e.id for e in later})
    assert later[0] == everything[3]


def test_loader_refuses_unknown_task_and_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown LongBench task 'qaspr'.*qasper.*repobench-p"):
        LongBenchDataLoader(tmp_path).load("qaspr")
    missing_dir = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing_dir))):
        LongBenchDataLoader(missing_dir)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "hotpotqa.jsonl"))):
        LongBenchDataLoader(tmp_path).load("hotpotqa")


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        (json.dumps({"input": "q", "answers": ["a"]}), "line 2: missing field.*context"),
        (json.dumps({"input": "q", "context": "c", "answers": "a"}), "line 2: field 'answers'"),
        (json.dumps({"input": 3, "context": "c", "answers": ["a"]}), "line 2: field 'input' must be a string"),
        (json.dumps(["a"]), "line 2: expected a JSON object"),
    ],
)
def test_loader_names_file_and_line_of_a_bad_row(tmp_path: Path, second_line: str, message: str) -> None:
    good = {"input": "q", "context": "c", "answers": ["a"]}
    path = write_jsonl(tmp_path / "hotpotqa.jsonl", [good, second_line])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ", " + message):
        LongBenchDataLoader(tmp_path).load("hotpotqa")


def test_loader_refuses_bad_limit_and_offset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="limit"):
        LongBenchDataLoader(tmp_path, limit=0)
    with pytest.raises(ValueError, match="offset"):
        LongBenchDataLoader(tmp_path, offset=-1)


# --- prompts ----------------------------------------------------------------------------------


def test_short_prompt_is_the_filled_template_with_the_question_span(tok: PreTrainedTokenizerFast) -> None:
    ex = example("hotpotqa", "Passage 1: Paris is in France.", "Where is Paris?")
    text, span = build_prompt(ex, "hotpotqa", tok, 1000)
    assert text == DATASET2PROMPT["hotpotqa"].format(context=ex.context, input=ex.input)
    assert span is not None and text[span[0] : span[1]] == "Where is Paris?"


def test_middle_truncation_keeps_both_ends_in_tokens(tok: PreTrainedTokenizerFast) -> None:
    context = "START " + " ".join(f"w{i}" for i in range(3000)) + " END"
    ex = example("hotpotqa", context, "Which word comes last?")
    filled = DATASET2PROMPT["hotpotqa"].format(context=context, input=ex.input)
    ids = tok(filled, add_special_tokens=False)["input_ids"]
    prompt = prepare_prompt(ex, "hotpotqa", tok, 300)
    assert prompt.truncated
    assert prompt.prompt_tokens <= 300 and prompt.prompt_tokens == count_prompt_tokens(tok, prompt.text)
    # Budget = 300 - 1 (BOS): the first 149 and last 150 content tokens survive.
    head = tok.decode(ids[:149], skip_special_tokens=True)
    tail = tok.decode(ids[-150:], skip_special_tokens=True)
    assert prompt.text.startswith(head) and prompt.text.endswith(tail)
    assert "START" in prompt.text and "END" in prompt.text and "w1500 " not in prompt.text
    assert prompt.text.startswith("Answer the question based on the given passages.")
    assert prompt.question_span is not None
    assert prompt.text[prompt.question_span[0] : prompt.question_span[1]] == "Which word comes last?"


@settings(max_examples=25, deadline=None)
@given(n_words=st.integers(1, 600), cap=st.integers(60, 400), task=st.sampled_from(["hotpotqa", "trec", "lcc"]))
def test_prompt_never_exceeds_the_cap(n_words: int, cap: int, task: str) -> None:
    tok = make_tokenizer(chat=True)
    ex = example(task, " ".join(f"tok{i}" for i in range(n_words)), "What now?")
    prompt = prepare_prompt(ex, task, tok, cap)
    assert count_prompt_tokens(tok, prompt.text) == prompt.prompt_tokens <= cap
    # Cut exactly when the filled template does not fit next to the chat-template overhead.
    wrapper = "" if task in NO_CHAT_TEMPLATE_TASKS else tok.apply_chat_template(
        [{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True
    )
    filled = DATASET2PROMPT[task].format(context=ex.context, input=ex.input)
    n_content = len(tok(filled, add_special_tokens=False)["input_ids"])
    assert prompt.truncated == (n_content > cap - count_prompt_tokens(tok, wrapper))


def test_chat_template_rule(tok: PreTrainedTokenizerFast, chat_tok: PreTrainedTokenizerFast) -> None:
    ex = example("hotpotqa", "Passage 1: text.", "Who?")
    wrapped, span = build_prompt(ex, "hotpotqa", chat_tok, 500)
    assert wrapped.startswith("<s><|user|>\n") and wrapped.endswith("Answer:\n<|assistant|>\n")
    assert span is not None and wrapped[span[0] : span[1]] == "Who?"
    # The template writes BOS as text: encoding must not add a second one.
    assert encode_prompt(chat_tok, wrapped).count(chat_tok.bos_token_id) == 1
    assert encode_prompt(tok, "plain").count(tok.bos_token_id) == 1
    # Few-shot and code tasks are never wrapped; neither is anything without a chat template.
    for task in ("trec", "triviaqa", "samsum", "lcc", "repobench-p"):
        text, _ = build_prompt(example(task, "ctx", "inp"), task, chat_tok, 500)
        assert not text.startswith("<s><|user|>")
    plain, _ = build_prompt(ex, "hotpotqa", tok, 500)
    assert plain == DATASET2PROMPT["hotpotqa"].format(context=ex.context, input=ex.input)


def test_question_span_when_input_is_empty_or_cut(tok: PreTrainedTokenizerFast) -> None:
    # Summaries have no input: the instruction after the context is the question.
    text, span = build_prompt(example("multi_news", "some news", ""), "multi_news", tok, 500)
    assert span is not None and text[span[0] : span[1]] == "Now, write a one-page summary of all the news.\n\nSummary:"
    # Code completion has no question at all: the caller's last-W window is used.
    assert build_prompt(example("lcc", "def f():\n", ""), "lcc", tok, 500)[1] is None
    # A long repobench input cut by middle truncation is not found any more.
    long_input = "x = compute(" + ", ".join(f"arg{i}" for i in range(400)) + ")\n"
    prompt = prepare_prompt(example("repobench-p", "import os\n" * 50, long_input), "repobench-p", tok, 200)
    assert prompt.truncated and prompt.question_span is None


def test_prepare_prompt_refuses_bad_input(tok: PreTrainedTokenizerFast) -> None:
    ex = example("hotpotqa", "c", "q")
    with pytest.raises(ValueError, match="unknown LongBench task 'hotpot'"):
        prepare_prompt(ex, "hotpot", tok, 100)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        prepare_prompt(ex, "hotpotqa", tok, 0)
    with pytest.raises(ValueError, match="no room"):
        prepare_prompt(ex, "hotpotqa", make_tokenizer(chat=True), 5)


@needs_multi_news
def test_real_multi_news_prompt(chat_tok: PreTrainedTokenizerFast) -> None:
    ex = LongBenchDataLoader(LONGBENCH_DIR, limit=1).load("multi_news")[0]
    prompt = prepare_prompt(ex, "multi_news", chat_tok, 512)
    assert prompt.truncated and prompt.prompt_tokens <= 512
    assert "You are given several news passages." in prompt.text
    assert prompt.text.endswith("Summary:\n<|assistant|>\n")
    assert ex.context[:40] in prompt.text and ex.context[-40:] in prompt.text
    assert prompt.question_span is not None


# --- collator ---------------------------------------------------------------------------------


def test_collator_left_pads_and_maps_question_spans(chat_tok: PreTrainedTokenizerFast) -> None:
    long_text, span_long = build_prompt(example("hotpotqa", "Passage 1: " + "green " * 40, "Who wins?"), "hotpotqa", chat_tok, 500)
    short_text, span_short = build_prompt(example("hotpotqa", "tiny", "Why?"), "hotpotqa", chat_tok, 500)
    batch = DataCollator(chat_tok)([long_text, short_text], [span_long, span_short])
    n_long, n_short = (len(encode_prompt(chat_tok, t)) for t in (long_text, short_text))
    assert batch.input_ids.shape == (2, n_long) and batch.input_ids.dtype == torch.long
    pad = n_long - n_short
    assert batch.attention_mask[1, :pad].sum() == 0 and batch.attention_mask[1, pad:].all()
    assert (batch.input_ids[1, :pad] == chat_tok.pad_token_id).all()
    assert batch.input_ids[1, pad:].tolist() == encode_prompt(chat_tok, short_text)
    for row, question in ((0, "Who wins?"), (1, "Why?")):
        start, end = batch.question_token_spans[row]
        assert question in chat_tok.decode(batch.input_ids[row, start:end])
    assert batch.question_token_spans[1][0] >= pad


def test_collator_refuses_bad_input(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="non-empty sequence"):
        DataCollator(tok)([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        DataCollator(tok)(["a", ""])
    with pytest.raises(ValueError, match="prompt 0 has .* tokens, more than max_prompt_tokens=3"):
        DataCollator(tok, max_prompt_tokens=3)(["a b c d e f g"])
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        DataCollator(tok)(["a"], [None, None])


def test_char_span_to_token_span() -> None:
    offsets = [(0, 0), (0, 3), (3, 4), (4, 9)]  # a special token first
    assert char_span_to_token_span(offsets, (3, 9)) == (2, 4)
    assert char_span_to_token_span(offsets, (1, 2)) == (1, 2)
    assert char_span_to_token_span(offsets, (20, 30)) is None
    with pytest.raises(ValueError, match="span"):
        char_span_to_token_span(offsets, (5, 5))


# --- evaluator --------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    paragraphs = " ".join(f"Paragraph {i}: text number {i}." for i in range(1, 6))
    write_jsonl(
        tmp_path / "passage_retrieval_en.jsonl",
        [
            {"input": f"abstract {k}", "context": paragraphs, "answers": [f"Paragraph {k}"], "_id": f"pr{k}", "length": 30}
            for k in (1, 3, 5)
        ],
    )
    write_jsonl(
        tmp_path / "hotpotqa.jsonl",
        [
            {"input": f"Is it {guess}?", "context": "Passage 1: It had 42 moons.", "answers": ["42"], "_id": f"h{i}"}
            for i, guess in enumerate((42, 7))
        ],
    )
    return tmp_path


def test_generator_double_satisfies_the_protocol(tok: PreTrainedTokenizerFast) -> None:
    assert isinstance(ReadingGenerator(tok, 100), TextGenerator)


def test_evaluator_rows_and_task_means(tok: PreTrainedTokenizerFast, data_dir: Path) -> None:
    gen = ReadingGenerator(tok, 400)
    ev = LongBenchEvaluator(gen, tasks=["passage_retrieval_en", "hotpotqa"], data_dir=data_dir, progress=False)
    scores = ev.evaluate()
    # The double answers the first number of the question: "abstract k" -> "k" is the right
    # paragraph every time; "Is it 42?" -> "42" is right (F1 1), "Is it 7?" -> "7" is wrong (0).
    assert scores == {"passage_retrieval_en": 1.0, "hotpotqa": 0.5}
    assert [r["_id"] for r in ev.rows] == ["pr1", "pr3", "pr5", "h0", "h1"]
    assert [r["score"] for r in ev.rows] == [1.0, 1.0, 1.0, 1.0, 0.0]
    row = ev.rows[0]
    assert row["prediction"] == "1" and row["answers"] == ["Paragraph 1"] and row["length"] == 30
    assert row["prompt_tokens"] == count_prompt_tokens(tok, gen.calls[0][0])
    assert {"kv_bytes", "kv_bytes_fp16_full", "compression_ratio", "avg_bits", "ttft_s", "tokens_kept_per_layer"} <= set(row)
    json.dumps(ev.rows)  # rows are JSON-ready
    prompt, span, max_new = gen.calls[0]
    assert span is not None and prompt[span[0] : span[1]] == "abstract 1"
    assert max_new == DATASET2MAXLEN["passage_retrieval_en"]


def test_few_shot_tasks_stop_at_a_newline_like_lm_eval(tok: PreTrainedTokenizerFast, data_dir: Path) -> None:
    write_jsonl(
        data_dir / "trec.jsonl",
        [{"input": "What is 42?", "context": "Question: What is 7?\nType: Number", "answers": ["Number"], "_id": "t0", "all_classes": ["Number"]}],
    )
    gen = ReadingGenerator(tok, 400)
    LongBenchEvaluator(gen, tasks=["trec", "hotpotqa"], data_dir=data_dir, progress=False).evaluate()
    assert gen.stops == [("\n",), (), ()]
    prepared = next(LongBenchEvaluator(gen, tasks="trec", data_dir=data_dir, progress=False).iter_prepared())
    assert BenchExample.from_longbench(prepared).stop == ("\n",)


def test_evaluator_limit_offset_span_switch_and_token_cap(tok: PreTrainedTokenizerFast, data_dir: Path) -> None:
    gen = ReadingGenerator(tok, 400)
    ev = LongBenchEvaluator(
        gen, tasks="passage_retrieval_en", data_dir=data_dir, limit=1, offset=1,
        use_question_span=False, max_new_tokens=8, progress=False,
    )
    rows = list(ev.iter_examples())
    assert [r["_id"] for r in rows] == ["pr3"] and rows[0]["index"] == 1
    assert gen.calls[0][1] is None and gen.calls[0][2] == 8
    assert rows[0]["question_span"] is None


def test_evaluator_validates_before_any_generation(tok: PreTrainedTokenizerFast, data_dir: Path) -> None:
    gen = ReadingGenerator(tok, 400)
    with pytest.raises(ValueError, match="unknown LongBench task 'nope'"):
        LongBenchEvaluator(gen, tasks=["hotpotqa", "nope"], data_dir=data_dir)
    with pytest.raises(ValidationError, match="limit"):
        LongBenchEvaluator(gen, tasks=["hotpotqa"], data_dir=data_dir, limit="2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator must provide"):
        LongBenchEvaluator(object(), tasks=["hotpotqa"], data_dir=data_dir)  # type: ignore[arg-type]
    # A missing task file is found before the first example of an earlier task is generated.
    ev = LongBenchEvaluator(gen, tasks=["hotpotqa", "qasper"], data_dir=data_dir, progress=False)
    with pytest.raises(FileNotFoundError, match="qasper.jsonl"):
        next(ev.iter_examples())
    assert gen.calls == []


@needs_multi_news
def test_evaluator_on_real_multi_news(chat_tok: PreTrainedTokenizerFast) -> None:
    gen = ReadingGenerator(chat_tok, 600)
    ev = LongBenchEvaluator(gen, tasks=["multi_news"], data_dir=LONGBENCH_DIR, limit=2, max_new_tokens=64, progress=False)
    scores = ev.evaluate()
    # The double copies 64 words of the news: a real, partial ROUGE-L against the reference.
    assert 0.0 < scores["multi_news"] < 1.0
    for row, (prompt, span, max_new) in zip(ev.rows, gen.calls):
        assert row["prompt_tokens"] <= 600 and row["truncated"]
        assert prompt[span[0] : span[1]].startswith("Now, write a one-page summary")
        assert max_new == 64


def test_longbench_e_split_and_length_groups(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    rows = [
        {"input": f"Is it {n}?", "context": "Passage 1: 42.", "answers": ["42"], "length": length}
        for n, length in ((42, 1000), (7, 3000), (42, 5000), (42, 9000))
    ]
    write_jsonl(tmp_path / "hotpotqa_e.jsonl", rows)
    ev = LongBenchEvaluator(ReadingGenerator(tok, 400), tasks=["hotpotqa"], data_dir=tmp_path, longbench_e=True, progress=False)
    assert ev.evaluate() == {"hotpotqa": 0.75}
    assert summarize_scores_by_length(ev.rows) == {"hotpotqa": {"0-4k": 0.5, "4-8k": 1.0, "8k+": 1.0}}
    with pytest.raises(ValueError, match="'musique' has no LongBench-E split"):
        LongBenchEvaluator(ReadingGenerator(tok, 400), tasks=["musique"], data_dir=tmp_path, longbench_e=True)


def test_a_misspelt_task_is_answered_with_the_nearest_name() -> None:
    from kvcomp_eval.data.longbench import unknown_tasks_message

    assert unknown_tasks_message(["multinews"]).startswith("unknown LongBench task 'multinews' (did you mean 'multi_news'?); known: ")
    many = unknown_tasks_message(["qasperr", "zzz"])
    assert many.startswith("unknown LongBench tasks ['qasperr', 'zzz'] (did you mean 'qasperr' -> 'qasper'?); known: ")


def test_no_data_dir_and_no_route_to_the_hub_fails_at_once_naming_the_flag(monkeypatch, tmp_path) -> None:
    """Without ``--data-dir`` the loader reads the hub; unreachable (and nothing cached), it says
    so within seconds instead of after ``datasets``' ~30 s of retries, and leaves ``datasets``
    as it found it."""
    import time

    import datasets.config
    import huggingface_hub

    from kvcomp_eval.data.longbench import LongBenchDataLoader

    def unreachable(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # nothing cached
    offline_before = datasets.config.HF_HUB_OFFLINE
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"the hub cannot be reached and the datasets cache lacks it\); .*--data-dir"):
        LongBenchDataLoader(None).load("multi_news")
    assert time.perf_counter() - start < 20
    assert datasets.config.HF_HUB_OFFLINE == offline_before
