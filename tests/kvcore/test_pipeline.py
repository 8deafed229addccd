"""KVCompPipeline: prompts in, text and measured cache cost out (tiny random LLaMA)."""

from __future__ import annotations

import pytest
import torch

from kvcore.config import CompressionConfig
from kvcore.registry import ComponentError
from kvcore.pipeline import KVCompPipeline

from tiny_models import SHORT_PROMPT_PROPAGATION

PROMPT = "the quick brown fox jumps over the lazy dog. " * 10 + "What does the fox do?"


@pytest.fixture()
def pipe(model_pair, tokenizer):
    ours, _ = model_pair
    pipeline = KVCompPipeline(ours, tokenizer, CompressionConfig.from_preset("full"))
    yield pipeline
    ours.set_compression(CompressionConfig())


def test_question_span_becomes_the_token_window(pipe):
    start = PROMPT.index("What")
    ids, window = pipe.encode(PROMPT, (start, len(PROMPT)))
    assert ids.shape == (1, len(PROMPT))  # one token per character
    assert window.tolist() == list(range(start, len(PROMPT)))


def test_middle_truncation_keeps_both_ends_and_moves_the_window(pipe):
    long = "a" * 1500 + "b" * 1500 + "Q?"
    with pytest.raises(ValueError, match="middle truncation"):
        pipe.encode(long, max_new_tokens=8)
    ids, window = pipe.encode(long, (len(long) - 2, len(long)), max_new_tokens=8, truncate="middle")
    text = "".join(pipe.tokenizer.convert_ids_to_tokens(ids[0].tolist()))
    assert ids.shape[1] == 2048 - 8 and text.startswith("a" * 100) and text.endswith("b" * 100 + "Q?")
    assert window.tolist() == [2038, 2039]


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_prompt_is_refused(pipe, bad):
    with pytest.raises(ValueError, match="empty"):
        pipe.generate(bad)


def test_bad_span_and_token_budget_are_refused(pipe):
    with pytest.raises(ValueError, match="question_span"):
        pipe.encode(PROMPT, (5, len(PROMPT) + 3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.generate(PROMPT, max_new_tokens=0)


def test_generation_reports_real_cache_cost(pipe):
    full = pipe.generate(PROMPT, max_new_tokens=6)
    pipe.set_config(CompressionConfig.from_preset("default"))
    span = (PROMPT.index("What"), len(PROMPT))
    comp = pipe.generate(PROMPT, max_new_tokens=6, question_span=span)
    n_tokens = len(PROMPT) + 5  # the last generated token is never fed back
    head_dim = 128 // 4
    assert comp.kv_bytes_fp16_full == full.kv_bytes_fp16_full == 2 * 4 * 2 * n_tokens * head_dim * 2
    assert full.kv_bytes == 2 * full.kv_bytes_fp16_full  # the stock cache holds fp32 on CPU
    assert comp.kv_bytes < comp.kv_bytes_fp16_full
    assert comp.avg_bits == pytest.approx(16 * comp.kv_bytes / comp.kv_bytes_fp16_full)
    assert len(comp.tokens_kept_per_layer) == 4 and max(comp.tokens_kept_per_layer) < n_tokens
    assert comp.ttft_s > 0 and comp.peak_rss_bytes > 0 and comp.first_token_logprobs.shape == (98,)


def test_continuation_logprobs_are_exact_for_the_identity_and_close_for_lossless8(pipe):
    cont = [70, 71, 72, 73]
    ref = pipe.continuation_logprobs(PROMPT, cont)
    assert ref.shape == (5, 98)
    pipe.set_config(CompressionConfig.from_preset("lossless8"))
    got = pipe.continuation_logprobs(PROMPT, cont)
    kl = (ref.exp() * (ref - got)).sum(-1)
    assert float(kl.max()) < 1e-3
    # Negative control: a config that throws most of the context away fails the same check.
    pipe.set_config(CompressionConfig.from_preset("default").with_overrides(
        {"quantizer.residual_length": 0, "quantizer.frac_8bit": 0.0, "quantizer.frac_4bit": 0.0,
         "quantizer.frac_2bit": 0.1, "quantizer.frac_drop": 0.9}
    ))
    broken = pipe.continuation_logprobs(PROMPT, cont)
    assert float((ref.exp() * (ref - broken)).sum(-1).max()) >= 1e-3


def test_seeded_sampling_is_reproducible(pipe):
    a = pipe.generate(PROMPT, max_new_tokens=5, do_sample=True, temperature=0.8, top_p=0.9, seed=11)
    b = pipe.generate(PROMPT, max_new_tokens=5, do_sample=True, temperature=0.8, top_p=0.9, seed=11)
    assert a.token_ids == b.token_ids
    # The first draw against a reference written here: nucleus of softmax(logprobs / T), one
    # multinomial draw from a generator seeded the same way.
    probs = torch.softmax(a.first_token_logprobs / 0.8, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    n_keep = int((sorted_p.cumsum(0) < 0.9).sum()) + 1  # the smallest set whose mass reaches top_p
    nucleus = torch.zeros_like(probs)
    nucleus[order[:n_keep]] = sorted_p[:n_keep]
    assert 1 < n_keep < probs.numel(), "the nucleus must cut something for the check to mean anything"
    expected = torch.multinomial(nucleus[None], 1, generator=torch.Generator().manual_seed(11))
    assert a.token_ids[0] == int(expected)
    # top_p so small that only the argmax survives: sampling must equal greedy decoding.
    greedy = pipe.generate(PROMPT, max_new_tokens=5)
    assert pipe.generate(PROMPT, max_new_tokens=5, do_sample=True, top_p=1e-9, seed=3).token_ids == greedy.token_ids
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"question_span": ("a", "b")}, TypeError, r"question_span must be a \(start, end\) pair of int.*\('a', 'b'\)"),
        ({"question_span": (True, 5)}, TypeError, "question_span"),
        ({"question_span": (1, 2, 3)}, TypeError, "question_span"),
        ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an int, got float 2.5"),
        ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an int"),
        ({"seed": 1.5}, TypeError, "seed must be an int, got float 1.5"),
        ({"truncate": "left"}, ValueError, "truncate must be 'error' or 'middle', got 'left'"),
    ],
)
def test_ill_typed_arguments_are_refused_by_name(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe.generate(PROMPT, **kwargs)


@pytest.mark.parametrize(("prompt", "match"), [(["a b", "c d"], "a list of 2 items: several prompts go to generate_batch"), (b"abc", "got bytes")])
def test_a_prompt_that_is_not_one_str_is_refused(pipe, prompt, match):
    with pytest.raises(TypeError, match=match):
        pipe.generate(prompt)


def test_a_config_that_is_neither_a_config_nor_a_preset_is_refused_before_loading(pipe, monkeypatch):
    import kvcore.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "resolve_model", lambda *a: pytest.fail("the model was resolved first"))
    with pytest.raises(TypeError, match="config must be a CompressionConfig, a preset name .* got int 123"):
        KVCompPipeline.from_pretrained("smollm2-135m", config=123)
    with pytest.raises(TypeError, match=r"got dict .*CompressionConfig\.from_dict\(mapping\)"):
        pipe.set_config({"scorer": "snapkv"})


def test_a_config_file_is_read_and_its_components_checked_before_loading(tmp_path, monkeypatch):
    import kvcore.pipeline as pipeline_module

    class _Stop(Exception):
        """Raised where the model would be resolved and loaded: every check before it passed."""

    def stop(*args):
        raise _Stop()

    monkeypatch.setattr(pipeline_module, "resolve_model", stop)
    good = tmp_path / "good.yaml"
    good.write_text(CompressionConfig.from_preset("default").to_yaml(), encoding="utf-8")
    for config in (str(good), good):  # read as a file, then stopped where the model would load
        with pytest.raises(_Stop):
            KVCompPipeline.from_pretrained("smollm2-135m", config=config)
    typo = tmp_path / "typo.yaml"
    typo.write_text(good.read_text(encoding="utf-8").replace("frac_8bit", "frac_8bt"), encoding="utf-8")
    with pytest.raises(ComponentError, match=rf"(?s)config file {typo}: invalid parameters .*quantizer\.frac_8bt"):
        KVCompPipeline.from_pretrained("smollm2-135m", config=str(typo))
    # A config built in code is checked there too, before the weights.
    section = dict(CompressionConfig.from_preset("default").to_dict()["quantizer"], frac_8bit=0.2)
    unchecked = CompressionConfig.from_dict({**CompressionConfig.from_preset("default").to_dict(), "quantizer": section})
    with pytest.raises(ComponentError, match="quantizer"):
        KVCompPipeline.from_pretrained("smollm2-135m", config=unchecked)


# The presets' per-layer schedules name layers of a 30-layer model; the test model has 4.
FOUR_LAYERS = {
    "fast": {"propagator.keep_ratio_by_layer": {1: 0.5, 2: 0.25}, **SHORT_PROMPT_PROPAGATION},
    "tiny": {"quantizer.budget_by_layer": {0: 0.25, 1: 1.4, 3: 1.0}},
}


def _preset(name: str) -> CompressionConfig:
    return CompressionConfig.from_preset(name).with_overrides(FOUR_LAYERS.get(name, {}))


@pytest.mark.parametrize("preset", ["default", "compact", "fast", "tiny"])
def test_a_one_token_prompt_simply_works(pipe, preset):
    pipe.set_config(_preset(preset))
    result = pipe.generate("h", max_new_tokens=3)
    assert result.prompt_tokens == 1 and len(result.token_ids) >= 1
    assert result.tokens_kept_per_layer == [1 + len(result.token_ids) - 1] * 4


def test_stop_strings_end_decoding(pipe):
    free = pipe.generate(PROMPT, max_new_tokens=12)
    ids = free.token_ids
    assert len(ids) >= 4 and 2 not in ids  # no EOS: the run went the full length
    k = len(ids) // 2
    stop = pipe.tokenizer.decode(ids[k - 1 : k + 1])  # spans two tokens
    needed = next(n for n in range(1, len(ids) + 1) if stop in pipe.tokenizer.decode(ids[:n]))
    got = pipe.generate(PROMPT, max_new_tokens=12, stop=["never appears \x7f", stop])
    # Decoding ended at the token that completed the stop string, well before max_new_tokens.
    assert got.token_ids == ids[:needed] and needed < len(ids)
    assert got.text == free.text[: free.text.find(stop)]
    assert pipe.generate(PROMPT, max_new_tokens=12, stop=["never appears \x7f"]).token_ids == ids


@pytest.mark.parametrize("bad", ["x", [""], [3], None])
def test_bad_stop_strings_are_refused(pipe, bad):
    with pytest.raises(ValueError, match="stop must be a sequence of non-empty strings"):
        pipe.generate(PROMPT, max_new_tokens=2, stop=bad)


BATCH = [
    ("the lazy dog sleeps while the fox runs. " * 6 + "Who sleeps?", "Who sleeps?"),
    ("a short one. " * 2 + "Why?", "Why?"),
    (PROMPT, None),
]


@pytest.mark.parametrize("preset", ["full", "default", "lossless8", "fast", "tiny"])
def test_a_batch_gives_each_prompt_what_it_gets_alone(pipe, preset):
    pipe.set_config(_preset(preset))
    _assert_batch_rows_match_single_runs(pipe)


def test_a_batch_keeps_both_tiers_of_one_width(pipe):
    """Protected tokens stored at 4 bit beside a 4-bit context tier: stacking the rows keeps both
    tiers (matching tiers by width alone once dropped the second)."""
    config = CompressionConfig.from_preset("default").with_overrides(
        {"quantizer.protected_bits": 4, "quantizer.residual_length": 0}
    )
    pipe.set_config(config)
    _assert_batch_rows_match_single_runs(pipe)


def _assert_batch_rows_match_single_runs(pipe: KVCompPipeline) -> None:
    prompts = [p for p, _ in BATCH]
    spans = [None if q is None else (p.rindex(q), len(p)) for p, q in BATCH]
    batch = pipe.generate_batch(prompts, question_spans=spans, max_new_tokens=8)
    for prompt, span, got in zip(prompts, spans, batch):
        alone = pipe.generate(prompt, question_span=span, max_new_tokens=8)
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert got.prompt_tokens == alone.prompt_tokens and got.kv_bytes_fp16_full == alone.kv_bytes_fp16_full
        assert torch.allclose(got.first_token_logprobs, alone.first_token_logprobs, atol=1e-4)
    assert len({r.kv_bytes for r in batch}) == 1, "the batch's cache is shared out evenly"


def test_each_row_of_a_batch_stops_on_its_own(pipe):
    pipe.set_config(CompressionConfig.from_preset("default"))
    prompts = [p for p, _ in BATCH]
    free = pipe.generate_batch(prompts, max_new_tokens=10)
    ids = free[0].token_ids
    stop = pipe.tokenizer.decode(ids[2:4])
    got = pipe.generate_batch(prompts, max_new_tokens=10, stop=[stop])
    needed = next(n for n in range(1, len(ids) + 1) if stop in pipe.tokenizer.decode(ids[:n]))
    assert got[0].token_ids == ids[:needed] < ids and stop not in got[0].text
    for row, ref in zip(got[1:], free[1:]):  # the others run on, unless the string shows up there too
        text = pipe.tokenizer.decode(ref.token_ids)
        assert row.token_ids == ref.token_ids or stop in text


@pytest.mark.parametrize(
    ("prompts", "kwargs", "error", "match"),
    [
        ("one str", {}, TypeError, "non-empty list of str"),
        ([], {}, TypeError, "non-empty list of str"),
        (["a b", "c d"], {"question_spans": [None]}, ValueError, "1 question spans for 2 prompts"),
        (["a b", ""], {}, ValueError, "empty"),
    ],
)
def test_a_bad_batch_is_refused_before_any_work(pipe, prompts, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe.generate_batch(prompts, **kwargs)


@pytest.mark.triton
def test_decoding_through_the_triton_kernel_gives_the_torch_backends_tokens(pipe, monkeypatch):
    pytest.importorskip("triton")
    from kvcomp_plugins.quantizers import triton_attend, triton_kernels

    if not torch.cuda.is_available() and not triton_kernels.INTERPRETED:
        pytest.skip("no GPU and triton was imported without TRITON_INTERPRET=1")
    calls = []
    kernel = triton_attend.attend_layer
    monkeypatch.setattr(triton_attend, "attend_layer", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    tokens = {}
    for backend in ("torch", "triton"):  # on a CPU tensor, 'triton' runs the kernels in the interpreter
        pipe.set_config(CompressionConfig.from_preset("default").with_overrides({"quantizer.backend": backend, "quantizer.residual_length": 8}))
        tokens[backend] = pipe.generate(PROMPT, max_new_tokens=6).token_ids
    assert calls, "the triton backend decoded through the kernel"
    assert tokens["triton"] == tokens["torch"]


@pytest.mark.parametrize("preset", ["default", "lossless8"])
def test_the_cpu_decode_kernel_is_autos_choice_and_gives_the_torch_backends_tokens(pipe, monkeypatch, preset):
    import shutil

    from kvcomp_plugins.quantizers import native

    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine: the CPU decode kernel cannot be built")
    assert native.available(), "a C compiler is on this machine, so the CPU decode kernel must build"
    calls = []
    kernel = native.attend_layer
    monkeypatch.setattr(native, "attend_layer", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    tokens = {}
    for backend in ("torch", "auto"):
        overrides = {"quantizer.backend": backend, "quantizer.residual_length": 8}
        pipe.set_config(CompressionConfig.from_preset(preset).with_overrides(overrides))
        tokens[backend] = pipe.generate(PROMPT, max_new_tokens=8).token_ids
    assert calls, "on a CPU, backend 'auto' decoded through the C kernel"
    assert tokens["auto"] == tokens["torch"]
