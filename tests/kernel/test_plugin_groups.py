"""Two entry-point groups: components (``kvcomp.components``) and CLI commands (``kvcomp.commands``).

The registry never imports a command plugin; a command plugin that fails to import is left out
of the CLI with a warning naming it, and ``generate``, ``plugins`` and ``config`` keep working.
The old shared group ``kvcomp.plugins`` still works, with a deprecation warning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_bpe_llama

from kvcore import cli
from kvcore.hookspecs import COMMANDS_ENTRY_POINT_GROUP, LEGACY_ENTRY_POINT_GROUP
from kvcore.plugins import LegacyEntryPointWarning, PluginLoadWarning
from kvcore.registry import get_registry

from ._support import FAKE_MODULE, doc_files, run_kvcomp, write_dist

BROKEN = "broken_kvcomp_commands"
BROKEN_SOURCE = "import numpy_extra_that_does_not_exist\n"
COMMANDS_ONLY = '''
from kvcore.hookspecs import hookimpl


@hookimpl
def register_commands(add_command):
    add_command("hello-kvcomp", "say hello", lambda args: print("hello") or 0)
'''
LEGACY_SOURCE = '''
from kvcore.hookspecs import hookimpl


@hookimpl
def register_components(register):
    register("scorer", "legacy_norm", lambda: None)


@hookimpl
def register_commands(subparsers, add_command):
    assert subparsers is not None
    add_command("legacy-hello", "say hello the old way", lambda args: print("old hello") or 0)
'''


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_bpe")
    save_bpe_llama(out, ["the pass key is 12345. " * 20], vocab_size=300, num_hidden_layers=2, max_position_embeddings=512)
    return out


def test_a_broken_command_plugin_leaves_generate_plugins_and_config_working(
    sys_path_dists, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sys_path_dists.add("broken", "broken-kvcomp-commands", "0.1", {"broken_cmds": BROKEN}, {BROKEN: BROKEN_SOURCE},
                       group=COMMANDS_ENTRY_POINT_GROUP)  # fmt: skip
    # The registry does not even import it.
    assert get_registry().names("scorer")
    assert BROKEN not in sys.modules

    argv = ["generate", "--prompt", "the pass key is 12345. what is the pass key?", "--model", str(tiny_model_dir),
            "--preset", "default", "--max-new-tokens", "2", "--json"]  # fmt: skip
    with pytest.warns(PluginLoadWarning, match=r"'broken_cmds' from distribution 'broken-kvcomp-commands'"):
        assert cli.main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["prompt_tokens"] > 0 and record["kv_bytes"] > 0
    for other in (["plugins", "--json"], ["config", "presets"], ["config", "show", "--preset", "default"]):
        with pytest.warns(PluginLoadWarning, match="broken_cmds"):
            assert cli.main(other) == 0, other
    # The other command plugins still add their commands.
    with pytest.warns(PluginLoadWarning):
        assert "bench" in cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def test_the_broken_command_plugin_is_named_on_stderr(tmp_path: Path) -> None:
    write_dist(tmp_path, "broken-kvcomp-commands", "0.1", {"broken_cmds": BROKEN}, {BROKEN: BROKEN_SOURCE},
               group=COMMANDS_ENTRY_POINT_GROUP)  # fmt: skip
    proc = run_kvcomp("config", "presets", extra_path=[tmp_path])
    assert proc.returncode == 0, proc.stderr
    assert "default" in proc.stdout
    assert "'broken_cmds' from distribution 'broken-kvcomp-commands' failed to load" in proc.stderr
    assert "ModuleNotFoundError" in proc.stderr and "Traceback" not in proc.stderr


def test_a_commands_only_plugin_adds_its_command_and_no_component(
    sys_path_dists, capsys: pytest.CaptureFixture[str]
) -> None:
    sys_path_dists.add("hello", "hello-kvcomp", "1.0", {"hello": "hello_kvcomp"}, {"hello_kvcomp": COMMANDS_ONLY},
                       group=COMMANDS_ENTRY_POINT_GROUP)  # fmt: skip
    assert {s.distribution for s in get_registry().specs()} == {"kvcomp"}
    assert "hello_kvcomp" not in sys.modules
    assert cli.main(["hello-kvcomp"]) == 0
    assert capsys.readouterr().out == "hello\n"


def test_the_old_group_and_hook_signature_still_work_with_a_deprecation_warning(
    sys_path_dists, capsys: pytest.CaptureFixture[str]
) -> None:
    sys_path_dists.add("legacy", "legacy-kvcomp", "0.9", {"legacy": "legacy_kvcomp"}, {"legacy_kvcomp": LEGACY_SOURCE},
                       group=LEGACY_ENTRY_POINT_GROUP)  # fmt: skip
    with pytest.warns(LegacyEntryPointWarning, match=r"'legacy' from distribution 'legacy-kvcomp'.*kvcomp\.plugins"):
        spec = get_registry().get("scorer", "legacy_norm")
    assert spec.distribution == "legacy-kvcomp"
    with pytest.warns(LegacyEntryPointWarning, match=r"register_commands\(subparsers, add_command\) is deprecated"):
        assert cli.main(["legacy-hello"]) == 0
    assert capsys.readouterr().out == "old hello\n"


def test_the_doc_example_declares_the_components_group() -> None:
    assert '[project.entry-points."kvcomp.components"]' in doc_files()["pyproject.toml"]
    assert "def register_commands(add_command" in doc_files()[f"{FAKE_MODULE}.py"]


def test_building_the_registry_imports_no_evaluation_code(tmp_path: Path) -> None:
    script = """
import json, sys
for name in [m for m in sys.modules if m.split(".")[0] in ("kvcomp_eval", "kvcomp_lm_eval")]:
    del sys.modules[name]
from kvcore.registry import get_registry
names = [s.name for s in get_registry().specs()]
print(json.dumps({"components": names, "eval": sorted(m for m in sys.modules if m.split(".")[0] == "kvcomp_eval")}))
"""
    env = {k: v for k, v in os.environ.items() if k != "KVCOMP_PLUGINS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "prompt_guided" in result["components"]
    assert result["eval"] == []
