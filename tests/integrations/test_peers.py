"""Peers adapter: parsing the runner's JSON lines, the runner's refusals, and real peer runs.

The peers' environment (``make peers-venv``) is not built in CI; the tests that need it are
skipped with the reason. The runner's protocol, its refusals and its uncompressed path also run
under this environment's Python, so they are tested everywhere.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import char_tokenizer, tiny_config
from transformers import DynamicCache, LlamaForCausalLM

from kvcomp_eval.metrics.fidelity import FidelityMetrics
from kvcomp_eval.metrics.summary import CompressionMetrics, generation_metrics
from kvcomp_eval.peers.methods import (
    PEER_METHODS,
    PeerJobError,
    PeerMethod,
    PeerPrompt,
    PeerRunnerError,
    PeersUnavailable,
    parse_peer_spec,
    peers_available,
)
from kvcomp_eval.peers.runner import PeerGenerator, PeerRunner
from kvcomp_eval.peers.protocol import parse_output, parse_row
from kvcomp_eval.runs.suite import BenchSuite
from kvcomp_eval.runs.benchmark import CompressionBenchmark
from kvcomp_eval.runs.store import peer_hash, read_results
from kvcore.config import CompressionConfig
from kvcore.types import GenerationResult

LAYERS, H_KV, HEAD_DIM = 4, 2, 32  # tiny_config(): hidden 128 / 4 heads, 2 KV heads


def _fp16(n_tokens: int) -> int:
    return 2 * LAYERS * H_KV * n_tokens * HEAD_DIM * 2


def _row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "event": "row",
        "id": "p0",
        "method": "snapkv",
        "params": {"compression_ratio": 0.5, "compress_question": False},
        "text": " 12345",
        "token_ids": [220, 33, 34],
        "prompt_tokens": 100,
        "compressed_tokens": 90,
        "ttft_s": 0.5,
        "decode_tokens_per_s": 20.0,
        "kv_bytes": _fp16(57),
        "kv_bytes_actual": 2 * _fp16(57),
        "kv_bytes_fp16_full": _fp16(102),
        "avg_bits": 16.0 * 57 / 102,
        "tokens_kept_per_layer": [57] * LAYERS,
        "kv_bytes_prefill": _fp16(55),
        "kv_bytes_prefill_actual": 2 * _fp16(55),
        "kv_bytes_fp16_full_prefill": _fp16(100),
        "peak_rss_bytes": 10**9,
    }
    row.update(overrides)
    return row


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------
def test_parse_row_into_kvcomp_schema() -> None:
    row = parse_row(_row())
    assert row.prediction == " 12345"
    assert row.label == "snapkv r=0.5"
    assert row.kv_fraction == pytest.approx(57 / 102)
    assert row.kv_fraction_prefill == pytest.approx(55 / 100)
    result = row.to_generation_result()
    assert isinstance(result, GenerationResult)
    assert result.token_ids == [220, 33, 34]
    assert result.compression_ratio == pytest.approx(102 / 57)
    assert result.first_token_logprobs is None
    out = row.to_dict()
    # Same field names and values as a kvcomp row's cost fields.
    for key, value in generation_metrics(result).items():
        assert out[key] == value
    assert {"method", "params", "prediction", "token_ids", "kl_first", "kv_bytes_actual"} <= set(out)
    json.dumps(out)  # JSON-ready


def test_rows_aggregate_like_kvcomp_results() -> None:
    rows = [parse_row(_row(id=f"p{i}")) for i in range(3)]
    metrics = CompressionMetrics.from_results([r.to_generation_result() for r in rows])
    assert metrics.n == 3
    assert metrics.kv_fraction == pytest.approx(57 / 102)


def test_parse_row_loads_first_token_logprobs(tmp_path: Path) -> None:
    logprobs = torch.log_softmax(torch.randn(50), dim=-1)
    torch.save(logprobs, tmp_path / "lp.pt")
    row = parse_row(_row(first_token_logprobs_path=str(tmp_path / "lp.pt")))
    assert row.first_token_logprobs is not None and torch.equal(row.first_token_logprobs, logprobs)
    ref = GenerationResult(**{**row.to_generation_result().__dict__})
    assert FidelityMetrics.from_pair(ref, row.to_generation_result()).next_token_kl == pytest.approx(0.0, abs=1e-9)
    assert parse_row(_row(first_token_logprobs_path=str(tmp_path / "lp.pt")), load_logprobs=False).first_token_logprobs is None


def test_parse_row_fidelity_fields() -> None:
    row = parse_row(_row(reference="self", kl_first=0.25, kl_mean=0.5, kl_steps=[0.25, 0.75], teacher_argmax_agreement=1))
    assert (row.reference, row.kl_first, row.kl_mean, row.kl_steps) == ("self", 0.25, 0.5, [0.25, 0.75])
    assert row.teacher_argmax_agreement == 1.0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kv_bytes": None}, "kv_bytes"),
        ({"prompt_tokens": True}, "prompt_tokens"),
        ({"ttft_s": "fast"}, "ttft_s"),
        ({"method": "h2o"}, "unknown method"),
        ({"token_ids": [1, "2"]}, "token_ids"),
    ],
)
def test_parse_row_refuses_bad_fields(change: dict[str, Any], match: str) -> None:
    with pytest.raises(PeerRunnerError, match=match):
        parse_row(_row(**change))


def test_parse_row_names_a_missing_field() -> None:
    row = _row()
    del row["kv_bytes_fp16_full"]
    with pytest.raises(PeerRunnerError, match="kv_bytes_fp16_full"):
        parse_row(row)


def _lines(*objs: Any) -> list[str]:
    return [o if isinstance(o, str) else json.dumps(o) for o in objs]


def test_parse_output_events() -> None:
    lines = _lines({"event": "start", "versions": {}}, "", _row(id="a"), _row(id="b"), {"event": "done", "n_rows": 2})
    assert [r.id for r in parse_output(lines)] == ["a", "b"]


def test_parse_output_stops_at_done() -> None:
    lines = iter(_lines({"event": "start"}, _row(id="a"), {"event": "done"}, _row(id="next-job")))
    assert [r.id for r in parse_output(lines)] == ["a"]
    assert json.loads(next(lines))["id"] == "next-job"  # the next job's lines are left unread


@pytest.mark.parametrize(
    ("lines", "error", "match"),
    [
        (_lines({"event": "error", "message": "unknown method 'x'"}), PeerJobError, "refused the job: unknown method"),
        (_lines({"event": "start"}, {"event": "error", "message": "boom", "during": "run"}), PeerRunnerError, "failed: boom"),
        (_lines({"event": "start"}, _row()), PeerRunnerError, "ended before"),
        (_lines("Traceback (most recent call last):"), PeerRunnerError, "not JSON"),
        (_lines({"event": "progress"}), PeerRunnerError, "unknown event"),
    ],
)
def test_parse_output_failures(lines: list[str], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        list(parse_output(lines))


@settings(max_examples=30, deadline=None)
@given(
    kept=st.integers(min_value=1, max_value=4096),
    extra=st.integers(min_value=0, max_value=4096),
    tokens=st.lists(st.integers(min_value=0, max_value=50_000), min_size=1, max_size=16),
)
def test_parse_row_keeps_bytes_and_tokens(kept: int, extra: int, tokens: list[int]) -> None:
    obj = _row(kv_bytes=_fp16(kept), kv_bytes_fp16_full=_fp16(kept + extra), token_ids=tokens)
    row = parse_row(obj)
    out = row.to_dict()
    assert out["kv_bytes"] == _fp16(kept) and out["kv_bytes_fp16_full"] == _fp16(kept + extra)
    assert out["token_ids"] == tokens
    assert out["compression_ratio"] == pytest.approx((kept + extra) / kept)
    assert 0 < row.kv_fraction <= 1


# ------------------------------------------------------------------------------------------------
# Job inputs
# ------------------------------------------------------------------------------------------------
def test_peer_method_and_prompt_validation() -> None:
    with pytest.raises(ValueError, match="unknown peer method 'h2o'"):
        PeerMethod("h2o")
    with pytest.raises(ValueError, match="mapping"):
        PeerMethod("knorm", [("compression_ratio", 0.5)])  # type: ignore[arg-type]
    assert PeerMethod("quantized_cache", {"backend": "hqq", "nbits": 2}).label == "hqq 2-bit"
    assert PeerMethod("snapkv", {"compression_ratio": 0.25, "compress_question": True}).label == "snapkv+question r=0.25"
    assert PeerMethod("full").label == "full"
    assert set(PEER_METHODS) >= {"snapkv", "streaming_llm", "expected_attention", "knorm", "tova", "quantized_cache"}
    with pytest.raises(ValueError, match="empty"):
        PeerPrompt("a", "   ")
    with pytest.raises(ValueError, match="question_span"):
        PeerPrompt("a", "short", (2, 10))
    assert PeerPrompt("a", "What?", (0, 5)).to_json() == {"id": "a", "text": "What?", "question_span": [0, 5]}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaMA saved as a Hugging Face folder (model + character tokenizer)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).eval().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


PROMPT = "The grass is green. The key is 4711. The sky is blue. " * 2 + "\nQuestion: What is the key?\nAnswer:"
SPAN = (PROMPT.index("What is the key?"), PROMPT.index("What is the key?") + len("What is the key?"))


def test_build_job(tiny_model_dir: Path) -> None:
    runner = PeerRunner(model=str(tiny_model_dir), python=sys.executable, threads=1)
    job = runner.build_job([PeerPrompt("a", PROMPT, SPAN)], [PeerMethod("knorm", {"compression_ratio": 0.5})], 4,
                           teacher_tokens={"a": [5, 6]})
    assert job["model_path"] == str(tiny_model_dir)
    assert job["prompts"][0]["question_span"] == list(SPAN)
    assert job["methods"] == [{"name": "knorm", "params": {"compression_ratio": 0.5}}]
    assert job["teacher_tokens"] == {"a": [5, 6]} and job["threads"] == 1
    with pytest.raises(ValueError, match="unique"):
        runner.build_job([PeerPrompt("a", "x"), PeerPrompt("a", "y")], [PeerMethod("full")])
    with pytest.raises(ValueError, match="max_new_tokens"):
        runner.build_job([PeerPrompt("a", "x")], [PeerMethod("full")], 0)
    with pytest.raises(ValueError, match="no peer methods"):
        runner.build_job([PeerPrompt("a", "x")], [])


def test_missing_environment_is_reported(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = PeerRunner(model=str(tiny_model_dir), python=tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(PeersUnavailable, match="make peers-venv"):
        runner.run([PeerPrompt("a", PROMPT)], [PeerMethod("full")])
    ok, reason = peers_available(tmp_path / "no-venv" / "bin" / "python")
    assert not ok and "make peers-venv" in reason


# ------------------------------------------------------------------------------------------------
# The real runner under this environment's Python: its refusals and its uncompressed path
# ------------------------------------------------------------------------------------------------
BAD_METHODS = [
    (PeerMethod("knorm", {"compression_ratio": 1.5}), "compression_ratio"),
    (PeerMethod("knorm", {"compression_ratio": 0.5, "window": 3}), "window"),
    (PeerMethod("snapkv", {"compression_ratio": "half"}), "compression_ratio"),
    (PeerMethod("quantized_cache", {"backend": "quanto", "nbits": 8}), r"nbits=8 .*quanto"),
    (PeerMethod("quantized_cache", {"backend": "bnb"}), "backend"),
    (PeerMethod("snapkv", {"compression_ratio": 0.5, "window_size": 500}), "window_size=500"),
]


def test_runner_refuses_bad_jobs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Every refusal comes back as an error line before any work; one ``--serve`` process answers all."""
    runner = PeerRunner(model=str(tiny_model_dir), python=sys.executable, threads=1)
    prompt = PeerPrompt("a", PROMPT, SPAN)
    cases: list[tuple[dict[str, Any], str]] = [
        (runner.build_job([prompt], [method], 2), match) for method, match in BAD_METHODS
    ]
    cases.append((runner.build_job([prompt], [PeerMethod("full")], 2, teacher_tokens={"zz": [1]}), "not in the job"))
    cases.append((runner.build_job([prompt], [PeerMethod("full")], 5000), "positions"))
    cases.append(({**runner.build_job([prompt], [PeerMethod("full")], 2), "model_path": "/nonexistent"}, "config.json"))
    cases.append(({**runner.build_job([prompt], [PeerMethod("full")], 2), "prompts": []}, "prompts"))
    bad_reference = tmp_path / "ref.pt"
    torch.save(torch.zeros(3, 98), bad_reference)  # 3 rows for 1 teacher token (at most 2)
    cases.append((runner.build_job([prompt], [PeerMethod("full")], 2, teacher_tokens={"a": [5]},
                                   reference_files={"a": str(bad_reference)}), r"\[R, V\]"))
    proc = subprocess.run(
        [sys.executable, str(runner.runner), "--serve"],
        input="".join(json.dumps(job) + "\n" for job, _ in cases),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = iter(proc.stdout.splitlines())
    for job, match in cases:
        with pytest.raises(PeerJobError, match=match):
            list(parse_output(lines))
    assert next(lines, None) is None


def _greedy_reference(model_dir: Path, prompt: str, n: int) -> tuple[list[int], torch.Tensor]:
    """Plain transformers greedy decoding and the teacher-forced log-probs ``[n + 1, V]``."""
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([char_tokenizer()(prompt)["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        cache = out.cache
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
            cache = out.cache
            tokens.append(int(out.logits[0, -1].argmax()))
        logits = model(input_ids=torch.cat([ids, torch.tensor([tokens])], dim=1)).logits[0, ids.shape[1] - 1 :]
    return tokens, torch.log_softmax(logits.float(), dim=-1)


def test_runner_full_matches_plain_greedy(tiny_model_dir: Path) -> None:
    """The runner's uncompressed path: same tokens as plain transformers, fp16 bytes, KL ~ 0."""
    tokens, ref = _greedy_reference(tiny_model_dir, PROMPT, 4)
    runner = PeerRunner(model=str(tiny_model_dir), python=sys.executable, threads=1)
    rows = runner.run(
        [PeerPrompt("a", PROMPT, SPAN), PeerPrompt("b", PROMPT), PeerPrompt("broken", PROMPT, SPAN)],
        [PeerMethod("full")],
        max_new_tokens=4,
        teacher_tokens={"a": tokens, "b": tokens, "broken": tokens},
        # Negative control: a reference whose vocabulary is reversed must fail the KL check below.
        reference_logprobs={"a": ref, "broken": ref.flip(-1)},
        with_logprobs=True,
    )
    broken = rows.pop()
    assert broken.kl_first is not None and broken.kl_first > 1e-2 and broken.kl_mean > 1e-2
    assert [r.id for r in rows] == ["a", "b"]
    n = len(PROMPT)
    for row in rows:
        assert row.token_ids == tokens
        assert row.prompt_tokens == n
        assert row.kv_bytes_prefill == _fp16(n) == row.kv_bytes_fp16_full_prefill
        assert row.kv_bytes == _fp16(n + 3) == row.kv_bytes_fp16_full  # the last token is never fed back
        assert row.kv_bytes_actual == 2 * row.kv_bytes  # fp32 model
        assert row.tokens_kept_per_layer == [n + 3] * LAYERS
        assert row.first_token_logprobs is not None and row.first_token_logprobs.shape == (98,)
        assert torch.allclose(row.first_token_logprobs, ref[0], atol=1e-4)
        assert row.kl_first is not None and row.kl_first < 1e-6 and row.kl_mean is not None and row.kl_mean < 1e-6
        assert row.kl_steps is not None and len(row.kl_steps) == 5
    assert rows[0].reference == "file" and rows[1].reference == "self"
    assert rows[0].compressed_tokens == PROMPT.index("What") and rows[1].compressed_tokens == n
    assert runner.versions is not None and "transformers" in runner.versions


# ------------------------------------------------------------------------------------------------
# The real peers' environment (skipped where it is not built)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peers_env() -> None:
    """Skip unless the peers' environment is built (``make peers-venv``; CI does not build it)."""
    ok, reason = peers_available()
    if not ok:
        pytest.skip(f"peers environment unavailable: {reason}")


def _quant_bytes(n_tokens: int, bits: int, group: int, backend: str) -> int:
    """fp16-equivalent bytes of K and V quantised per group: codes plus fp16 scale and zero.

    quanto packs the ``[groups, group]`` codes along the groups, padding them to whole bytes;
    HQQ's packing comes out exact here.
    """
    groups = H_KV * n_tokens * HEAD_DIM // group  # per layer and per K or V
    per_byte = 8 // bits
    packed_rows = -(-groups // per_byte) if backend == "quanto" else groups / per_byte
    codes = int(packed_rows * group)
    return 2 * LAYERS * (codes + groups * 2 * 2)


@pytest.mark.usefixtures("peers_env")
def test_peers_venv_runs_every_method(tiny_model_dir: Path) -> None:
    n = len(PROMPT)
    n_ctx = PROMPT.index("What")
    n_q = n - n_ctx
    methods = [
        PeerMethod("full"),
        PeerMethod("knorm", {"compression_ratio": 0.5}),
        PeerMethod("snapkv", {"compression_ratio": 0.5, "window_size": 16}),
        PeerMethod("snapkv", {"compression_ratio": 0.5, "window_size": 16, "compress_question": True}),
        PeerMethod("streaming_llm", {"compression_ratio": 0.25}),
        PeerMethod("expected_attention", {"compression_ratio": 0.75}),
        PeerMethod("tova", {"compression_ratio": 0.5}),
        PeerMethod("quantized_cache", {"backend": "quanto", "nbits": 2, "q_group_size": 32}),
        PeerMethod("quantized_cache", {"backend": "hqq", "nbits": 4, "q_group_size": 32}),
        PeerMethod("quantized_cache", {"backend": "hqq", "nbits": 8, "q_group_size": 32}),
    ]
    tokens, _ = _greedy_reference(tiny_model_dir, PROMPT, 3)
    runner = PeerRunner(model=str(tiny_model_dir), threads=1)
    # "b" is "a" without teacher forcing: forcing runs on the prefilled cache and restores it,
    # so greedy decoding and bytes must come out the same.
    prompts = [PeerPrompt("a", PROMPT, SPAN), PeerPrompt("b", PROMPT, SPAN)]
    rows = runner.run(prompts, methods, max_new_tokens=3, teacher_tokens={"a": tokens})
    assert runner.versions is not None and runner.versions["kvpress"] == "0.5.5"
    by_label = {r.label: r for r in rows if r.id == "a"}
    assert len(by_label) == len(methods)
    for row_a, row_b in zip(rows[::2], rows[1::2]):
        assert (row_a.id, row_b.id) == ("a", "b")
        assert row_a.token_ids == row_b.token_ids, row_a.label
        assert row_a.kv_bytes == row_b.kv_bytes and row_a.kv_bytes_prefill == row_b.kv_bytes_prefill
        assert row_b.kl_first is None

    full = by_label["full"]
    assert full.token_ids == tokens and full.kl_mean is not None and full.kl_mean < 1e-6
    for label, ratio in [("knorm r=0.5", 0.5), ("snapkv r=0.5", 0.5), ("streaming_llm r=0.25", 0.25),
                         ("expected_attention r=0.75", 0.75), ("tova r=0.5", 0.5)]:
        row = by_label[label]
        kept = int(n_ctx * (1 - ratio)) + n_q  # kvpress keeps int(n * (1 - r)); the question is not compressed
        assert row.compressed_tokens == n_ctx
        assert row.kv_bytes_prefill == _fp16(kept), label
        assert row.kv_bytes_prefill_actual == 2 * _fp16(kept), label
        assert row.kl_first is not None and row.kl_first >= 0.0
    with_question = by_label["snapkv+question r=0.5"]
    assert with_question.compressed_tokens == n
    assert with_question.kv_bytes_prefill == _fp16(int(n * 0.5))
    # kvpress compresses after each layer's attention: the prompt's own last logits are untouched.
    assert with_question.kl_first is not None and with_question.kl_first < 1e-6

    for label, bits in [("quanto 2-bit", 2), ("hqq 4-bit", 4), ("hqq 8-bit", 8)]:
        row = by_label[label]
        # The context is quantised at prefill; the question's tokens sit in the fp residual.
        assert row.kv_bytes_prefill == _quant_bytes(n_ctx, bits, 32, label.split()[0]) + _fp16(n_q), label
        assert row.kv_bytes_prefill_actual > row.kv_bytes_prefill  # fp32 scales and residual
        assert row.tokens_kept_per_layer == [n + 2] * LAYERS
    assert by_label["hqq 8-bit"].kl_mean < by_label["quanto 2-bit"].kl_mean


@pytest.mark.usefixtures("peers_env")
def test_peer_generator_serves_jobs(tiny_model_dir: Path) -> None:
    method = PeerMethod("quantized_cache", {"backend": "quanto", "nbits": 4})
    with PeerGenerator(method, model=str(tiny_model_dir), threads=1) as gen:
        assert gen.max_prompt_tokens == 2048
        first = gen.generate(PROMPT, question_span=SPAN, max_new_tokens=5)
        second = gen.generate(PROMPT, question_span=SPAN, max_new_tokens=5)
        with pytest.raises(PeerJobError, match="positions"):
            gen.generate(PROMPT, question_span=SPAN, max_new_tokens=5000)
        again = gen.generate(PROMPT, max_new_tokens=2)  # the server survives a refused job
    assert first.token_ids == second.token_ids and first.kv_bytes == second.kv_bytes
    assert first.prompt_tokens == len(PROMPT)
    assert 0 < first.kv_bytes < first.kv_bytes_fp16_full
    assert first.first_token_logprobs is not None and math.isfinite(float(first.first_token_logprobs.max()))
    assert 1 <= len(again.token_ids) <= 2
    with pytest.raises(RuntimeError, match="closed"):
        gen.generate(PROMPT)


# ------------------------------------------------------------------------------------------------
# Peers inside `kvcomp bench`
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "name", "params"),
    [
        ("tova:0.5", "tova", {"compression_ratio": 0.5}),
        ("snapkv+question:0.25", "snapkv", {"compression_ratio": 0.25, "compress_question": True}),
        ("expected_attention:0", "expected_attention", {"compression_ratio": 0.0}),
        ("hqq:4", "quantized_cache", {"backend": "hqq", "nbits": 4}),
        ("quanto:2", "quantized_cache", {"backend": "quanto", "nbits": 2}),
        ("full", "full", {}),
    ],
)
def test_parse_peer_spec(spec: str, name: str, params: dict[str, Any]) -> None:
    method = parse_peer_spec(spec)
    assert (method.name, dict(method.params)) == (name, params)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("tova", "needs a compression ratio"),
        ("tova:1.0", r"outside \[0, 1\)"),
        ("tova:half", "needs a compression ratio"),
        ("quanto:8", r"bit width in \(2, 4\)"),
        ("snapkv+questions:0.5", "unknown option"),
        ("h2o:0.5", "unknown peer 'h2o:0.5'"),
    ],
)
def test_parse_peer_spec_refuses_and_says_what_is_accepted(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_peer_spec(spec)
    assert "accepted" in str(info.value) or "outside" in str(info.value)


def _probe_bench(model: Path, out: Path, peers: list[PeerMethod], python: str | None) -> CompressionBenchmark:
    return CompressionBenchmark(
        {"default": CompressionConfig.from_preset("default")},
        BenchSuite.parse("passkey", lengths=[300], depths=[0.5], limit=1),
        out,
        model=str(model),
        max_new_tokens=4,
        kl_steps=3,
        peers=peers,
        peer_threads=1,
        peer_python=python,
        progress=False,
    )


def test_bench_runs_a_peer_on_the_same_prompts(tiny_model_dir: Path, tmp_path: Path, one_torch_thread: None) -> None:
    """The runner's uncompressed peer (it needs transformers only) under this Python, inside a bench run:
    same prompt, same greedy tokens, KL ~ 0 against kvcomp's own reference, rows and report like a config."""
    out = tmp_path / "run"
    outcome = _probe_bench(tiny_model_dir, out, [PeerMethod("full")], sys.executable).run()
    rows = read_results(out / "results.jsonl")
    assert [r["config"] for r in rows] == ["full", "default", "peer:full"]
    full, _, peer = rows
    assert peer["prompt_tokens"] == full["prompt_tokens"] and peer["token_ids"] == full["token_ids"]
    assert peer["exact_match"] is True and peer["prefix_agreement"] == 1.0
    assert len(peer["kl_per_step"]) == 3 and max(peer["kl_per_step"]) < 1e-5
    # Negative control: the compressing config of the same run fails that check.
    assert len(rows[1]["kl_per_step"]) == 3 and max(rows[1]["kl_per_step"]) > 1e-5
    assert peer["kv_fraction"] == 1.0  # peers count float tensors at fp16 size; kvcomp's full is fp32 (2.0)
    assert peer["config_hash"] == peer_hash(PeerMethod("full"))
    run = json.loads((out / "run.json").read_text())
    assert list(run["configs"]) == ["full", "default", "peer:full"]
    assert run["configs"]["peer:full"]["config"]["name"] == "full"
    assert "transformers" in run["runs"][-1]["peer_versions"]
    assert "| `peer:full` |" in outcome.summary.read_text(encoding="utf-8")
    # Resuming finds every row, the peer's included, and starts no runner.
    again = _probe_bench(tiny_model_dir, out, [PeerMethod("full")], sys.executable).run()
    assert (again.written, again.skipped) == (0, 3)


def test_bench_refuses_presses_without_the_peers_environment(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # This Python has transformers but no kvpress: a press cannot run here.
    with pytest.raises(PeersUnavailable, match="kvpress not installed"):
        _probe_bench(tiny_model_dir, out, [PeerMethod("tova", {"compression_ratio": 0.5})], sys.executable).run()
    with pytest.raises(PeersUnavailable, match="make peers-venv"):
        _probe_bench(tiny_model_dir, out, [PeerMethod("full")], str(tmp_path / "none" / "python")).run()
    assert not out.exists()


@pytest.mark.usefixtures("peers_env")
def test_bench_runs_presses_and_quantized_caches(tiny_model_dir: Path, tmp_path: Path, one_torch_thread: None) -> None:
    peers = [parse_peer_spec(s) for s in ("tova:0.5", "hqq:4")]
    out = tmp_path / "run"
    _probe_bench(tiny_model_dir, out, peers, None).run()
    rows = {r["config"]: r for r in read_results(out / "results.jsonl")}
    assert set(rows) == {"full", "default", "peer:tova r=0.5", "peer:hqq 4-bit"}
    for name in ("peer:tova r=0.5", "peer:hqq 4-bit"):
        assert 0 < rows[name]["kv_fraction"] < 1 and rows[name]["kl_mean"] >= 0
        assert rows[name]["prompt_tokens"] == rows["full"]["prompt_tokens"]
