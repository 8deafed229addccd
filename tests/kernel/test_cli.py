"""The ``kvcomp`` command line: config display, plugin listing, and clean refusals of bad input.

Most checks call :func:`kvcore.cli.main` in-process (fast); one runs the installed script to
prove the exit status and stderr that a shell sees.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kvcore import cli
from kvcore.config import CompressionConfig, preset_names
from kvcore.plugins import PLUGINS_ENV
from kvcore.registry import get_registry, reset_registry

from ._support import run_kvcomp


@pytest.fixture(autouse=True)
def _builtin_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    reset_registry()
    yield
    monkeypatch.undo()
    reset_registry()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``kvcomp ARGV``; argparse's own exits count as statuses."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


# -- config show -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", preset_names())
def test_config_show_prints_each_resolved_preset(capsys: pytest.CaptureFixture[str], preset: str) -> None:
    status, out, err = run(capsys, "config", "show", "--preset", preset)
    assert (status, err) == (0, "")
    assert yaml.safe_load(out) == CompressionConfig.from_preset(preset).resolved().to_dict()


def test_config_show_default_is_the_default_preset(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "config", "show", "--json")
    assert status == 0
    assert json.loads(out) == json.loads(CompressionConfig.from_preset("default").resolved().to_json())


def test_config_show_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "config", "show", "--preset", "default", "--set", "scorer.alpha=0.5")
    assert status == 0
    shown = yaml.safe_load(out)
    default = CompressionConfig.from_preset("default").resolved().to_dict()
    assert default["scorer"]["alpha"] != 0.5
    assert shown["scorer"] == {**default["scorer"], "alpha": 0.5}
    others = ("scorer", "description")
    assert {k: v for k, v in shown.items() if k not in others} == {k: v for k, v in default.items() if k not in others}
    # The preset's measured claims no longer describe the changed config: the description says so.
    assert shown["description"] == f"Overridden (scorer.alpha=0.5); before the overrides: {default['description']}"


def test_config_show_reads_files_and_several_overrides(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(CompressionConfig.from_preset("fast").to_json(), encoding="utf-8")
    argv = ["config", "show", "--json", "--config", str(path), "--set", "propagator.keep_ratio_by_layer={4: 0.5}",
            "--set", "quantizer=uniform", "--set", "quantizer.bits=2", "--set", "n_sink=0"]  # fmt: skip
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    shown = json.loads(out)
    assert shown["propagator"]["keep_ratio_by_layer"] == {"4": 0.5}
    assert (shown["quantizer"]["name"], shown["quantizer"]["bits"], shown["n_sink"]) == ("uniform", 2, 0)


def test_config_presets_lists_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "config", "presets")
    assert status == 0
    listed = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert listed == preset_names()
    assert max(map(len, out.splitlines())) <= 120  # wrapped, whatever the descriptions' length


def test_plugins_lists_every_component(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "plugins")
    assert status == 0
    header, rule, *rows = out.splitlines()
    assert header.split() == ["kind", "name", "distribution", "module", "description"]
    assert set(rule) <= {"-", " "}
    assert [tuple(r.split()[:3]) for r in rows] == [(s.kind, s.name, s.distribution) for s in get_registry().specs()]


# -- bad input: exit status 2, a "kvcomp: error:" line, no traceback -----------------------------------------
SHOW = ["config", "show"]
BAD_INPUT = {
    "unknown preset": ([*SHOW, "--preset", "nope"], "unknown preset 'nope'; presets: compact, default"),
    "missing file": ([*SHOW, "--config", "/nonexistent/c.yaml"], "config file /nonexistent/c.yaml does not exist"),
    "set without value": ([*SHOW, "--set", "scorer.alpha"], "--set expects KEY=VALUE, got 'scorer.alpha'"),
    "set with bad YAML": ([*SHOW, "--set", "scorer.alpha=[0.5"], "--set 'scorer.alpha=[0.5': the value is not valid"),
    "unknown field": ([*SHOW, "--set", "window=8"], "window: Extra inputs are not permitted"),
    "ill-typed field": ([*SHOW, "--set", "window_size='8'"], "window_size: Input should be a valid integer (got '8')"),
    "unknown component": ([*SHOW, "--set", "scorer.name=h2o"], "unknown scorer 'h2o'; registered scorers: none, "),
    "bad parameter": ([*SHOW, "--set", "scorer.alpha='0.5'"], "scorer.alpha: Input should be a valid number"),
    "both sources": ([*SHOW, "--preset", "full", "--config", "x.yaml"], "not allowed with argument"),
    "unknown command": (["compress"], "invalid choice: 'compress'"),
    "no command": ([], "the following arguments are required: COMMAND"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_a_clean_error(capsys: pytest.CaptureFixture[str], case: str) -> None:
    argv, expected = BAD_INPUT[case]
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    # argparse's own refusals name the sub-command (``kvcomp config show: error: ...``) after a usage line.
    assert re.search(r"^kvcomp( [a-z-]+)*: error: ", err, re.MULTILINE) and expected in err, err
    assert "Traceback" not in err


def test_bad_config_file_through_the_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("scorer: [", encoding="utf-8")
    status, _, err = run(capsys, "config", "show", "--config", str(path))
    assert status == 2 and err.startswith(f"kvcomp: error: config file {path} is not valid YAML")


def test_installed_script_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    proc = run_kvcomp("config", "show", "--preset", "default", "--set", "scorer.alpha=-1", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("kvcomp: error: invalid parameters for scorer 'prompt_guided':\n  scorer.alpha: ")
    assert "Traceback" not in proc.stderr


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """``kvcomp config presets | true``: the reader is gone before the first write; no traceback."""
    import shlex
    import subprocess
    import sys

    script = Path(sys.executable).with_name("kvcomp")
    command = shlex.join([str(script)] if script.exists() else [sys.executable, "-m", "kvcore.cli"])
    err = tmp_path / "err.txt"
    proc = subprocess.run(["bash", "-c", f"{command} config presets 2>{shlex.quote(str(err))} | true; echo ${{PIPESTATUS[0]}}"],
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert proc.stdout.strip() == "141", (proc.stdout, err.read_text())
    assert err.read_text() == ""


# -- generate --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import save_bpe_llama

    out = tmp_path_factory.mktemp("tiny_bpe_cli")
    save_bpe_llama(out, ["the pass key is 12345. " * 20], vocab_size=300, num_hidden_layers=2, max_position_embeddings=512)
    return out


def test_a_question_not_in_the_prompt_is_asked_after_it(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    """``--question`` absent from the prompt: the same run as with the question written after the
    prompt (a blank line between), and a note on stderr, not in the JSON on stdout."""
    context = "the pass key is 12345. " * 6
    question = "what is the pass key?"
    common = ["--model", str(tiny_model_dir), "--preset", "default", "--max-new-tokens", "3", "--json"]
    status, out, err = run(capsys, "generate", "--prompt", context, "--question", question, *common)
    assert status == 0, err
    assert "--question is not in the prompt (--prompt); asking it after the prompt" in err
    asked = json.loads(out)
    status, out, err = run(capsys, "generate", "--prompt", f"{context.rstrip()}\n\n{question}", "--question", question,
                           *common)  # fmt: skip
    assert status == 0 and "asking it" not in err, err
    written = json.loads(out)
    for key in ("text", "prompt_tokens", "kv_bytes", "tokens_kept_per_layer"):
        assert asked[key] == written[key], key
