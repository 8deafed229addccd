"""Plugin discovery: a third-party distribution on ``sys.path`` is found, listed and selectable.

The distribution is the example of ``docs/plugins.md`` (files copied from the page verbatim),
put on ``sys.path`` as a bare ``*.dist-info`` folder: nothing is installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch

from kvcore import cli
from kvcore.compressor import RealTimePrefillCompressor
from kvcore.config import CompressionConfig
from kvcore.hookspecs import ENTRY_POINT_GROUP
from kvcore.plugins import PLUGINS_ENV, PluginLoadError, create_plugin_manager
from kvcore.protocols import Scorer
from kvcore.registry import ComponentError, get_registry, reset_registry
from kvcore.types import LayerObservation

from ._support import (
    FAKE_DIST,
    FAKE_ENTRY_POINT,
    FAKE_MODULE,
    FAKE_SCORER,
    doc_files,
    run_kvcomp,
    write_doc_dist,
)

BUILTIN_ENTRY_POINTS = {"scorers", "quantizers", "propagators"}


def make_obs(*, layer_idx: int = 8, n_tokens: int = 24, head_dim: int = 32, window: int = 4) -> LayerObservation:
    """A random one-row observation: 2 KV heads, 4 query heads, the last ``window`` tokens the window."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return LayerObservation(
        layer_idx=layer_idx,
        keys=rand(1, 2, n_tokens, head_dim),
        values=rand(1, 2, n_tokens, head_dim),
        queries=rand(1, 4, window, head_dim),
        keys_pre_rope=rand(1, 2, n_tokens, head_dim),
        queries_pre_rope=rand(1, 4, window, head_dim),
        window_idx=torch.arange(n_tokens - window, n_tokens),
        positions=torch.arange(n_tokens)[None],
        n_original=n_tokens,
        n_sink=2,
    )


# -- discovery and listing ---------------------------------------------------------------------------
def test_fake_distribution_is_listed_by_the_cli(tmp_path: Path) -> None:
    write_doc_dist(tmp_path)
    proc = run_kvcomp("plugins", "--json", extra_path=[tmp_path])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    fake = [r for r in rows if r["name"] == FAKE_SCORER]
    assert fake == [
        {
            "kind": "scorer",
            "name": FAKE_SCORER,
            "distribution": FAKE_DIST,
            "module": FAKE_MODULE,
            "plugin": FAKE_ENTRY_POINT,
            "description": "L2 norm of the value vector",
        }
    ]
    # The built-ins come through the very same entry-point group, from the kvcomp distribution.
    builtin = [r for r in rows if r["name"] != FAKE_SCORER]
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    kvcomp_eps = {ep.name for ep in eps if ep.dist is not None and ep.dist.name == "kvcomp"}
    assert BUILTIN_ENTRY_POINTS <= {r["plugin"] for r in builtin} <= kvcomp_eps
    assert {r["distribution"] for r in builtin} == {"kvcomp"}
    assert all(r["module"].startswith("kvcomp_plugins.") for r in builtin)


def test_fake_distribution_is_found_in_process(fake_plugin: Path) -> None:
    spec = get_registry().get("scorer", FAKE_SCORER)
    assert (spec.distribution, spec.module, spec.plugin) == (FAKE_DIST, FAKE_MODULE, FAKE_ENTRY_POINT)
    assert sys.modules[FAKE_MODULE].__file__ == str(fake_plugin / f"{FAKE_MODULE}.py")


def test_plugin_is_gone_once_off_sys_path(sys_path_dists) -> None:
    sys_path_dists.add_doc_example()
    assert FAKE_SCORER in get_registry().names("scorer")
    sys_path_dists.monkeypatch.undo()
    reset_registry()
    assert FAKE_SCORER not in get_registry().names("scorer")


# -- selection by name ---------------------------------------------------------------------------------
def test_fake_scorer_is_selected_by_name_from_the_doc_config(fake_plugin: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "value-norm.yaml"
    config_file.write_text(doc_files()["value-norm.yaml"], encoding="utf-8")
    config = CompressionConfig.from_file(config_file)
    assert config.resolved().scorer.params == {"key_weight": 0.5}

    compressor = RealTimePrefillCompressor.from_config(config)
    module = sys.modules[FAKE_MODULE]
    assert isinstance(compressor.scorer, module.ValueNormScorer)
    assert isinstance(compressor.scorer, Scorer)
    assert compressor.scorer.key_weight == 0.5

    obs = make_obs(layer_idx=8)
    result = compressor.compress_layer_kv_cache(obs)

    # The scores are the plugin's, computed here independently.
    expected = obs.values.norm(dim=-1) - 0.5 * obs.keys.norm(dim=-1)
    assert result.scores is not None and result.scores.dtype == torch.float32
    torch.testing.assert_close(result.scores, expected)

    # They drove the propagator: protected tokens plus the best others by head-mean score continue.
    protected = obs.protected_mask[0]
    assert result.keep_idx is not None
    kept = torch.zeros_like(protected)
    kept[result.keep_idx[0]] = True
    assert result.keep_idx.shape == (1, 12)  # ceil(0.5 * 24)
    assert bool(kept[protected].all())
    mean = expected.mean(dim=1)[0]
    assert mean[kept & ~protected].min() > mean[~kept].max()

    # ...and the quantizer: per head, every 8-bit token outscores every 4-bit token, which
    # outscores every dropped one.
    tiers = {t.bits: t.positions[0].long() for t in result.compressed.tiers}
    assert result.compressed.dropped_tokens > 0
    for head in range(2):
        s = expected[0, head]
        stored = torch.zeros(obs.positions.shape[1], dtype=torch.bool)
        stored[result.compressed.residual_positions[0, head].long()] = True
        for pos in tiers.values():
            stored[pos[head]] = True
        if 8 in tiers and 4 in tiers:
            assert s[tiers[8][head]].min() >= s[tiers[4][head]].max()
        lowest_stored = min(s[pos[head]].min() for pos in tiers.values())
        assert lowest_stored >= s[~stored].max()


def test_fake_scorer_is_selected_with_cli_overrides(fake_plugin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["config", "show", "--json", "--set", f"scorer.name={FAKE_SCORER}", "--set", "scorer.key_weight=0.25"]
    assert cli.main(argv) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["scorer"] == {"name": FAKE_SCORER, "key_weight": 0.25}


# -- KVCOMP_PLUGINS ----------------------------------------------------------------------------------
@pytest.mark.parametrize("allowed", [FAKE_ENTRY_POINT, f"{FAKE_DIST}:{FAKE_ENTRY_POINT}", f" {FAKE_ENTRY_POINT} ,"])
def test_kvcomp_plugins_narrows_to_the_fake(
    fake_plugin: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], allowed: str
) -> None:
    assert len(get_registry().specs()) > 1
    monkeypatch.setenv(PLUGINS_ENV, allowed)
    reset_registry()
    assert [(s.kind, s.name) for s in get_registry().specs()] == [("scorer", FAKE_SCORER)]
    assert cli.main(["plugins", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == [FAKE_SCORER]
    # Built-ins are gone for configs too, and the error says what is left.
    with pytest.raises(ComponentError, match=r"unknown scorer 'prompt_guided'; registered scorers: none, value_norm"):
        CompressionConfig.from_preset("default").validate_components()


def test_kvcomp_plugins_can_leave_the_fake_out(fake_plugin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLUGINS_ENV, "scorers,propagators")
    reset_registry()
    kinds = {s.kind for s in get_registry().specs()}
    assert kinds == {"scorer", "propagator"}
    assert FAKE_SCORER not in get_registry().names("scorer")
    assert FAKE_MODULE not in sys.modules  # not even imported


def test_empty_kvcomp_plugins_loads_nothing(fake_plugin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLUGINS_ENV, "")
    reset_registry()
    assert get_registry().specs() == []


# -- register_commands --------------------------------------------------------------------------------
def test_plugin_adds_a_cli_command(fake_plugin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["value-norm-rank", "[[3, 4], [1, 0], [0, 2]]"]) == 0
    assert capsys.readouterr().out == "0 2 1\n"
    assert cli.main(["value-norm-rank", "[[3, 4], [1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvcomp: error: values must be a JSON list of token vectors")
    assert "Traceback" not in err


# -- the doc's pyproject.toml really builds this distribution -----------------------------------------
def test_doc_pyproject_builds_the_distribution_the_tests_fake(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    pip = pytest.importorskip("pip")
    import subprocess

    files = doc_files()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", f"{FAKE_MODULE}.py"):
        (src / name).write_text(files[name], encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "wheel"), str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"pip {pip.__version__}: {proc.stderr}"
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    fake = write_doc_dist(tmp_path / "fake")
    with zipfile.ZipFile(wheel) as zf:
        built_meta = Parser().parsestr(zf.read(f"{fake.name}/METADATA").decode())
        built_eps = zf.read(f"{fake.name}/entry_points.txt").decode()
        assert f"{FAKE_MODULE}.py" in zf.namelist()
    fake_meta = Parser().parsestr((fake / "METADATA").read_text())
    assert (built_meta["Name"], built_meta["Version"]) == (fake_meta["Name"], fake_meta["Version"])
    assert _entry_points(built_eps) == _entry_points((fake / "entry_points.txt").read_text())


def _entry_points(text: str) -> dict[str, str]:
    import configparser

    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # entry-point names are case-sensitive
    parser.read_string(text)
    return dict(parser[ENTRY_POINT_GROUP])


# -- clashes and broken plugins ----------------------------------------------------------------------
OTHER_SCORER_SOURCE = '''
import torch
from kvcore.hookspecs import hookimpl


class LastTokenScorer:
    def score(self, obs):
        return obs.positions.float()[:, None, :].expand(obs.keys.shape[:3]).clone()


@hookimpl
def register_components(register):
    register("scorer", "value_norm", LastTokenScorer)
'''


def test_same_component_name_from_two_distributions_names_both(sys_path_dists) -> None:
    sys_path_dists.add_doc_example()
    sys_path_dists.add("other", "other-kvcomp-plugin", "2.0", {"other": "other_kvcomp_plugin"},
                       {"other_kvcomp_plugin": OTHER_SCORER_SOURCE})  # fmt: skip
    with pytest.raises(ComponentError) as info:
        get_registry()
    message = str(info.value)
    assert "scorer 'value_norm' is registered twice" in message
    assert f"distribution '{FAKE_DIST}' (module {FAKE_MODULE})" in message
    assert "distribution 'other-kvcomp-plugin' (module other_kvcomp_plugin)" in message
    assert PLUGINS_ENV in message


def test_clash_reaches_the_cli_as_a_clean_error(sys_path_dists, capsys: pytest.CaptureFixture[str]) -> None:
    sys_path_dists.add_doc_example()
    sys_path_dists.add("other", "other-kvcomp-plugin", "2.0", {"other": "other_kvcomp_plugin"},
                       {"other_kvcomp_plugin": OTHER_SCORER_SOURCE})  # fmt: skip
    assert cli.main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvcomp: error: scorer 'value_norm' is registered twice")
    assert FAKE_DIST in err and "other-kvcomp-plugin" in err and "Traceback" not in err


def test_same_entry_point_name_in_two_distributions_loads_both(sys_path_dists) -> None:
    # Entry-point names are unique only within one distribution: a second one must not be skipped.
    sys_path_dists.add_doc_example()
    sys_path_dists.add("other", "other-kvcomp-plugin", "2.0", {FAKE_ENTRY_POINT: "other_kvcomp_plugin"},
                       {"other_kvcomp_plugin": OTHER_SCORER_SOURCE})  # fmt: skip
    pm = create_plugin_manager()
    sources = {pm.info(name).distribution for name, _ in pm.list_name_plugin()}
    assert {FAKE_DIST, "other-kvcomp-plugin", "kvcomp"} <= sources
    with pytest.raises(ComponentError, match="other-kvcomp-plugin"):
        get_registry()


def test_third_party_entry_point_may_reuse_a_builtin_entry_point_name(sys_path_dists) -> None:
    files = doc_files()
    sys_path_dists.add("third", FAKE_DIST, "1.0", {"scorers": FAKE_MODULE}, {FAKE_MODULE: files[f"{FAKE_MODULE}.py"]})
    names = get_registry().names("scorer")
    assert FAKE_SCORER in names and "prompt_guided" in names
    # Whichever is found second gets the distribution-qualified plugin name.
    plugins = {get_registry().get("scorer", name).plugin for name in (FAKE_SCORER, "prompt_guided")}
    assert plugins in ({"scorers", f"{FAKE_DIST}:scorers"}, {"scorers", "kvcomp:scorers"})


def test_same_command_from_two_distributions_names_both(sys_path_dists, capsys: pytest.CaptureFixture[str]) -> None:
    source = doc_files()[f"{FAKE_MODULE}.py"].replace('"value_norm"', '"value_norm_copy"')
    sys_path_dists.add_doc_example()
    sys_path_dists.add("copy", "copy-kvcomp-plugin", "1.0", {"copy": "copy_kvcomp_plugin"},
                       {"copy_kvcomp_plugin": source})  # fmt: skip
    with pytest.raises(PluginLoadError, match="adds the command 'value-norm-rank', which plugin"):
        cli.build_parser()
    assert cli.main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert "copy-kvcomp-plugin" in err and FAKE_DIST in err and "Traceback" not in err


def test_plugin_command_may_not_shadow_a_builtin_command(sys_path_dists) -> None:
    source = '''
from kvcore.hookspecs import hookimpl


@hookimpl
def register_commands(add_command):
    add_command("plugins", "my own listing", lambda args: 0)
'''
    sys_path_dists.add("shadow", "shadow-kvcomp-plugin", "1.0", {"shadow": "shadow_kvcomp_plugin"},
                       {"shadow_kvcomp_plugin": source})  # fmt: skip
    with pytest.raises(PluginLoadError, match=r"shadow-kvcomp-plugin.*adds the command 'plugins', which kvcomp itself"):
        cli.build_parser()


def test_broken_plugin_names_itself(sys_path_dists, capsys: pytest.CaptureFixture[str]) -> None:
    sys_path_dists.add("broken", "broken-kvcomp-plugin", "0.1", {"broken": "broken_kvcomp_plugin"},
                       {"broken_kvcomp_plugin": "import numpy_extra_that_does_not_exist\n"})  # fmt: skip
    with pytest.raises(PluginLoadError) as info:
        get_registry()
    message = str(info.value)
    assert "kvcomp plugin 'broken' from distribution 'broken-kvcomp-plugin' failed to load" in message
    assert "ModuleNotFoundError" in message and PLUGINS_ENV in message
    assert cli.main(["config", "presets"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvcomp: error: kvcomp plugin 'broken'") and "Traceback" not in err


def test_exception_inside_register_components_names_the_plugin(sys_path_dists) -> None:
    source = '''
from kvcore.hookspecs import hookimpl


@hookimpl
def register_components(register):
    register("scorer", "half_done")  # forgot the factory
'''
    sys_path_dists.add("buggy", "buggy-kvcomp-plugin", "0.1", {"buggy": "buggy_kvcomp_plugin"},
                       {"buggy_kvcomp_plugin": source})  # fmt: skip
    with pytest.raises(ComponentError, match=r"plugin 'buggy' from distribution 'buggy-kvcomp-plugin'.*TypeError"):
        get_registry()
