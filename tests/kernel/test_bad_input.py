"""Bad input to ``kvcomp generate``/``config`` and to the loaders: exit status 2, one
``kvcomp: error:`` line naming the bad value, no traceback, no model load and no file touched."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest

from kvcore import cli
from kvcore.config import ConfigError, CompressionConfig
from kvcore.pipeline import KVCompPipeline
from kvcore.plugins import PLUGINS_ENV
from kvcore.registry import ComponentError, reset_registry


@pytest.fixture(autouse=True)
def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every case here must be refused before the weights load."""
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    reset_registry()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(KVCompPipeline, "from_pretrained", refuse)
    yield
    monkeypatch.undo()
    reset_registry()


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    status = cli.main(argv)
    out, err = capsys.readouterr()
    assert status == 2 and out == "", (status, out, err)
    assert err.startswith("kvcomp: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the context. Question: what?", encoding="utf-8")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n", encoding="utf-8")
    return {"folder": folder, "latin1": latin1, "prompt": prompt, "blank": blank}


CASES = {
    "prompt file is a folder": (["--prompt-file", "{folder}"], "--prompt-file {folder} is a directory"),
    "prompt file not UTF-8": (["--prompt-file", "{latin1}"], "--prompt-file {latin1} is not UTF-8 text (byte 3"),
    "blank prompt file": (["--prompt-file", "{blank}"], "the prompt (--prompt-file {blank}) is empty"),
    "blank prompt": (["--prompt", "  "], "the prompt (--prompt) is empty"),
    "blank question": (["--prompt", "abc", "--question", " "], "--question ' ' is blank"),
    "temperature without --sample": (["--prompt", "abc", "--temperature", "0.5"], "--temperature only apply to sampling; add --sample"),
    "top-p without --sample": (["--prompt", "abc", "--top-p", "0.9", "--temperature", "0.7"], "--temperature, --top-p only apply"),
    "config is a folder": (["--prompt", "abc", "--config", "{folder}"], "config file {folder} is a directory"),
    "no CUDA": (["--prompt", "abc", "--device", "cuda"], "device 'cuda': this machine has no CUDA device"),
    "unknown device": (["--prompt", "abc", "--device", "tpu"], "device 'tpu' is not a torch device"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_generate_refuses_bad_input_before_loading_the_model(capsys, files, monkeypatch, case) -> None:
    if case == "no CUDA":
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    argv, expected = CASES[case]
    snapshot = {p: (p.stat().st_mtime_ns, p.is_dir() or p.read_bytes()) for p in files.values()}
    argv = [a.format(**files) for a in argv]
    err = _one_line_error(capsys, ["generate", *argv])
    assert expected.format(**files) in err, err
    assert snapshot == {p: (p.stat().st_mtime_ns, p.is_dir() or p.read_bytes()) for p in files.values()}


def test_config_show_names_a_folder_given_as_config(capsys, files) -> None:
    err = _one_line_error(capsys, ["config", "show", "--config", str(files["folder"])])
    assert f"config file {files['folder']} is a directory" in err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quantizer.residual_length", 10**27),
        ("quantizer.residual_length", 10**11),
        ("quantizer.flush_tokens", 10**9),
        ("quantizer.group_size", 10**6),
        ("propagator.min_keep_tokens", 10**12),
        ("propagator.keep_first_tokens", 10**12),
    ],
)
def test_token_counts_past_any_context_are_refused_naming_the_field(field, value) -> None:
    base = CompressionConfig.from_preset("fast")
    with pytest.raises((ComponentError, ConfigError), match=rf"{field}: Input should be less than or equal to .*got {value}"):
        base.with_overrides({field: value}).validate_components()


def test_the_largest_allowed_residual_length_is_accepted() -> None:
    CompressionConfig.from_preset("default").with_overrides({"quantizer.residual_length": 1 << 17}).validate_components()


@pytest.mark.parametrize("model", ["llama2-7b", "someone/some-llama"])
@pytest.mark.parametrize("offline", [True, False])
def test_an_uncached_hub_model_without_network_is_refused_at_once(capsys, monkeypatch, model, offline) -> None:
    from kvcore import loading

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(KVCompPipeline, "from_pretrained", lambda name, *a, **k: loading.resolve_model(name))
    start = time.perf_counter()
    err = _one_line_error(capsys, ["generate", "--prompt", "hello", "--model", model])
    assert time.perf_counter() - start < 5
    assert f"model {model!r}" in err and f"kvcomp model fetch {model}" in err
    assert ("HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached") in err


@pytest.mark.parametrize(("name", "read_as"), [("nonexist-model", True), ("llama2-7b", False), ("someone/llama", False)])
def test_fetch_without_the_hub_names_the_model_and_how_it_was_read(capsys, monkeypatch, name, read_as) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args: object, **kwargs: object) -> None:  # what snapshot_download raises with no route to the hub
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened ...")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    err = _one_line_error(capsys, ["model", "fetch", name])
    assert "cannot be downloaded: the hub cannot be reached (ConnectError: [Errno -2] Name or service not known)" in err
    assert ("is not a model preset (smollm2-135m" in err) == read_as, err
