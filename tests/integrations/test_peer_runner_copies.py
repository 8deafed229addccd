"""``bench/peers/run_peer.py`` runs in the peers' own environment and cannot import kvcomp, so it
keeps copies of the prompt encoder, the question-span rule and the fp16-bytes formula. These
tests hold each copy to the kernel's original (:mod:`kvcore.text`, :mod:`kvcore.accounting`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import char_tokenizer, tiny_config

from kvcore.accounting import kv_bytes_fp16_for_model
from kvcore.text import encode_prompt, encode_prompt_with_offsets, tokens_in_char_span

RUNNER = Path(__file__).resolve().parents[2] / "bench" / "peers" / "run_peer.py"


@pytest.fixture(scope="module")
def runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvcomp_run_peer_under_test", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the module's annotations through it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("text", ["plain text, then the question: who?", "</s>starts with a special token"])
def test_runner_encodes_and_finds_the_question_like_the_kernel(runner: ModuleType, text: str) -> None:
    tokenizer = char_tokenizer()
    tokenizer.bos_token = "</s>"  # a BOS written as text must not be added a second time
    start = text.index("who") if "who" in text else 5
    ids, first = runner.encode(tokenizer, runner.PromptSpec(id="p", text=text, question_span=(start, len(text))))
    kernel_ids, offsets = encode_prompt_with_offsets(tokenizer, text)
    assert ids == kernel_ids == encode_prompt(tokenizer, text)
    assert first == tokens_in_char_span(offsets, (start, len(text)))[0]


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 80),
    kv_heads=st.integers(1, 16),
    group=st.integers(1, 8),
    head_dim=st.sampled_from([32, 64, 96, 128]),
    tokens=st.integers(0, 100_000),
    explicit_head_dim=st.booleans(),
)
def test_runner_fp16_bytes_equal_the_kernel_formula(
    runner: ModuleType, layers: int, kv_heads: int, group: int, head_dim: int, tokens: int, explicit_head_dim: bool
) -> None:
    heads = kv_heads * group
    extra = {"head_dim": head_dim} if explicit_head_dim else {}
    config = tiny_config(
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * head_dim, **extra
    )
    assert runner.fp16_full_bytes(config, tokens) == kv_bytes_fp16_for_model(config, tokens)


@settings(max_examples=50, deadline=None)
@given(text=st.text("ab\n.", max_size=12), stop=st.lists(st.text("ab\n.", min_size=1, max_size=3), max_size=3))
def test_runner_cuts_at_stop_strings_like_the_kernel(runner: ModuleType, text: str, stop: list[str]) -> None:
    from kvcore.pipeline import cut_at_stop

    assert runner._stop_index(text, stop) == cut_at_stop(text, stop)


def test_stop_strings_travel_in_the_job_and_bad_ones_are_refused(runner: ModuleType, tmp_path: Path) -> None:
    import json

    from kvcomp_eval.peers.methods import PeerMethod, PeerPrompt

    tiny_config().save_pretrained(tmp_path)  # parse_job checks the folder holds a LLaMA config
    prompt = PeerPrompt("p0", "Q: what?\nA:", stop=("\n",))
    job = {"model_path": str(tmp_path), "prompts": [prompt.to_json()], "methods": [PeerMethod("full", {}).to_json()]}
    assert runner.parse_job(json.dumps(job)).prompts[0].stop == ["\n"]
    job["prompts"][0]["stop"] = [""]
    with pytest.raises(ValueError, match="stop"):
        runner.parse_job(json.dumps(job))
    with pytest.raises(ValueError, match="stop of prompt 'p0' must be a sequence of non-empty strings"):
        PeerPrompt("p0", "text", stop="\n")  # type: ignore[arg-type]
