"""The validated config: strict fields, presets, files, overrides, and lossless YAML/JSON round trips."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcore.config import CompressionConfig, ConfigError, load_config, preset_names
from kvcore.plugins import PLUGINS_ENV
from kvcore.registry import NONE_COMPONENT, ComponentError, get_registry, reset_registry

@pytest.fixture(autouse=True, scope="module")
def _builtin_registry() -> Iterator[None]:
    """Only the built-in components (whatever ``KVCOMP_PLUGINS`` says outside)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(PLUGINS_ENV, raising=False)
        reset_registry()
        yield
    reset_registry()


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECTIONS = ("scorer", "quantizer", "propagator")


# -- strategies: valid parameters of the built-in components ---------------------------------------------
def _optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict holding any subset of ``fields`` (unset ones take the component's default)."""
    return st.fixed_dictionaries({}, optional=fields)


_unit = st.floats(0.0, 1.0, allow_nan=False)
_weight = st.floats(0.0, 10.0, allow_nan=False)
_odd = st.integers(0, 7).map(lambda k: 2 * k + 1)
_fraction = st.floats(1e-4, 1.0, allow_nan=False)


@st.composite
def _tier_fractions(draw: st.DrawFn) -> dict[str, float]:
    # Multiples of 1/20 sum to 1 well inside the 1e-6 tolerance.
    cuts = sorted(draw(st.lists(st.integers(0, 20), min_size=3, max_size=3)))
    parts = [cuts[0], cuts[1] - cuts[0], cuts[2] - cuts[1], 20 - cuts[2]]
    return dict(zip(("frac_8bit", "frac_4bit", "frac_2bit", "frac_drop"), (p / 20 for p in parts)))


@st.composite
def _schedule(draw: st.DrawFn) -> dict[int, float]:
    layers = sorted(draw(st.sets(st.integers(0, 63), min_size=1, max_size=4)))
    ratio = st.floats(0.01, 1.0, allow_nan=False)
    ratios = sorted(draw(st.lists(ratio, min_size=len(layers), max_size=len(layers))), reverse=True)
    return dict(zip(layers, ratios))


_TIERED = dict(
    group_size=st.sampled_from([8, 16, 32, 64]),
    key_mode=st.sampled_from(["channel", "token"]),
    residual_length=st.integers(0, 512),
    flush_tokens=st.none() | st.integers(1, 256),
    flush_bits=st.sampled_from([2, 4, 8]),
    flush_key_mode=st.none() | st.sampled_from(["channel", "token"]),
    protected_bits=st.sampled_from([2, 4, 8, 16]),
    residual_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    backend=st.sampled_from(["auto", "torch", "triton"]),
)

PARAMS: dict[tuple[str, str], st.SearchStrategy[dict[str, Any]]] = {
    ("scorer", "prompt_guided"): _optional(
        alpha=_weight, beta=_weight, pool_kernel=_odd, pool=st.sampled_from(["max", "avg"]), recency_fraction=_fraction
    ).map(lambda p: {**p, "gamma": 0.5}),  # gamma > 0 keeps alpha + beta + gamma > 0
    ("scorer", "snapkv"): _optional(pool_kernel=_odd, pool=st.sampled_from(["max", "avg"])),
    ("scorer", "key_norm"): st.just({}),
    ("scorer", "streaming"): _optional(recency_fraction=_fraction),
    ("scorer", "random"): _optional(seed=st.integers(0, 2**31)),
    ("quantizer", "mixed_precision"): st.tuples(
        _optional(**_TIERED), st.one_of(_tier_fractions(), st.builds(lambda b: {"avg_bits": b}, st.floats(0.0, 8.0)))
    ).map(lambda t: {**t[0], **t[1]}),
    ("quantizer", "uniform"): _optional(bits=st.sampled_from([2, 4, 8]), **_TIERED),
    ("propagator", "selective"): st.builds(
        lambda s, agg: {"keep_ratio_by_layer": s, **agg},
        _schedule(),
        _optional(aggregation=st.sampled_from(["mean", "max"])),
    ),
}


def _section(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """``{name, **params}`` for ``none`` or any registered component of ``kind``."""
    registry = get_registry()
    options = [st.just({"name": NONE_COMPONENT})]
    for name in registry.names(kind):
        if (kind, name) in PARAMS:
            options.append(PARAMS[(kind, name)].map(lambda p, n=name: {"name": n, **p}))
        else:  # a component added later: its defaults, if it has complete ones
            try:
                registry.validate_params(kind, name, {})
            except ComponentError:
                continue
            options.append(st.just({"name": name}))
    return st.one_of(options)


def configs() -> st.SearchStrategy[CompressionConfig]:
    """Valid configs over the registered components (looked up when the test runs, not at import)."""
    return st.deferred(lambda: st.builds(
        lambda fields, sections: CompressionConfig.from_dict({**fields, **sections}),
        _optional(
            description=st.text(max_size=40),
            window_size=st.integers(1, 4096),
            n_sink=st.integers(0, 1024),
            weights=st.sampled_from(["none", "int8"]),
        ),
        st.fixed_dictionaries({kind: _section(kind) for kind in SECTIONS}),
    ))


# -- round trips -----------------------------------------------------------------------------------------
@SETTINGS
@given(config=configs())
def test_yaml_round_trip_is_lossless(config: CompressionConfig) -> None:
    back = CompressionConfig.from_dict(yaml.safe_load(config.to_yaml()))
    assert back == config
    assert back.to_dict() == config.to_dict()
    assert back.resolved().to_dict() == config.resolved().to_dict()


@SETTINGS
@given(config=configs())
def test_json_round_trip_is_lossless_after_validation(config: CompressionConfig) -> None:
    # JSON turns the int layer keys of a schedule into strings; component validation turns them back.
    back = CompressionConfig.from_dict(json.loads(config.to_json()))
    resolved = config.resolved()
    assert back.resolved().to_dict() == resolved.to_dict()
    assert CompressionConfig.from_dict(json.loads(resolved.to_json())).resolved() == resolved


@SETTINGS
@given(config=configs())
def test_resolved_is_idempotent_and_keeps_choices(config: CompressionConfig) -> None:
    resolved = config.resolved()
    assert resolved.resolved() == resolved
    for kind, section in config.sections().items():
        full = resolved.sections()[kind]
        assert full.name == section.name
        for key, value in section.params.items():
            assert key in full.params
            if isinstance(value, float) and not isinstance(full.params[key], float):
                pytest.fail(f"{kind}.{key}: {value!r} came back as {full.params[key]!r}")


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("preset", preset_names())
def test_presets_survive_files(tmp_path: Path, preset: str, suffix: str) -> None:
    config = CompressionConfig.from_preset(preset)
    path = tmp_path / f"{preset}{suffix}"
    path.write_text(config.to_json() if suffix == ".json" else config.to_yaml(), encoding="utf-8")
    assert CompressionConfig.from_file(path).resolved() == config.resolved()
    assert load_config(config_file=path).resolved() == config.resolved()


# -- presets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_validates_against_the_registry(preset: str) -> None:
    config = CompressionConfig.from_preset(preset)
    resolved = config.resolved()
    assert config.description.strip(), f"preset {preset} has no description"
    for kind, section in resolved.sections().items():
        if section.name != NONE_COMPONENT:
            spec = get_registry().get(kind, section.name)
            assert set(section.params) == set(spec.config_model.model_fields)  # type: ignore[union-attr]


def test_expected_presets_ship() -> None:
    assert {"default", "full", "fast"} <= set(preset_names())
    assert CompressionConfig.from_preset("full").is_uncompressed
    assert not CompressionConfig.from_preset("default").is_uncompressed
    assert load_config() == CompressionConfig.from_preset("default")


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError) as info:
        CompressionConfig.from_preset("defualt")
    assert str(info.value) == f"unknown preset 'defualt'; presets: {', '.join(preset_names())}"


def test_preset_and_file_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="either a preset or a config file"):
        load_config(preset="default", config_file=tmp_path / "x.yaml")


# -- bad fields ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "field", "pattern"),
    [
        ({"window_sise": 32}, "window_sise", "Extra inputs are not permitted"),
        ({"window_size": "32"}, "window_size", "valid integer"),
        ({"window_size": 0}, "window_size", "greater than or equal to 1"),
        ({"n_sink": -1}, "n_sink", "greater than or equal to 0"),
        ({"weights": "int4"}, "weights", "none|int8"),
        ({"scorer": {"name": 5}}, "scorer.name", "valid string"),
        ({"scorer": {"name": ""}}, "scorer.name", "at least 1 character"),
        ({"scorer": 5}, "scorer", "valid dictionary"),
        ({"description": ["a"]}, "description", "valid string"),
    ],
)
def test_config_errors_name_the_field(data: dict[str, Any], field: str, pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        CompressionConfig.from_dict(data)
    message = str(info.value)
    assert message.startswith("config is invalid:")
    line = next((ln for ln in message.splitlines()[1:] if ln.startswith(f"  {field}: ")), None)
    assert line is not None, message
    assert re.search(pattern, line), line


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        CompressionConfig.from_dict({"window_size": "32", "n_sink": 4.0, "bogus": 1})
    assert {ln.split(":")[0].strip() for ln in str(info.value).splitlines()[1:]} == {"window_size", "n_sink", "bogus"}


def test_shorthand_section_is_a_name() -> None:
    assert CompressionConfig.from_dict({"scorer": "snapkv"}).scorer.name == "snapkv"


# -- invalid values are rejected, never coerced -----------------------------------------------------------
_not_an_int = st.one_of(
    st.integers(1, 4096).map(str),
    st.integers(1, 4096).map(float),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
)


@SETTINGS
@given(
    field=st.sampled_from(["window_size", "n_sink"]),
    value=_not_an_int | st.integers(max_value=-1) | st.integers(min_value=4097),
)
def test_top_level_ints_reject_every_non_int(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"\n  {field}: "):
        CompressionConfig.from_dict({field: value})


# (kind, name, field, valid value): fields whose type is known, to be fed ill-typed variants.
TYPED_FIELDS = [
    ("scorer", "prompt_guided", "alpha", 0.5),
    ("scorer", "prompt_guided", "pool_kernel", 7),
    ("scorer", "prompt_guided", "pool", "max"),
    ("scorer", "snapkv", "pool_kernel", 5),
    ("scorer", "random", "seed", 3),
    ("scorer", "streaming", "recency_fraction", 0.1),
    ("quantizer", "mixed_precision", "group_size", 32),
    ("quantizer", "mixed_precision", "residual_length", 64),
    ("quantizer", "mixed_precision", "avg_bits", 4.0),
    ("quantizer", "uniform", "group_size", 16),
    ("quantizer", "uniform", "key_mode", "token"),
    ("propagator", "selective", "aggregation", "max"),
]


def _ill_typed(good: Any) -> st.SearchStrategy[Any]:
    if isinstance(good, str):
        return st.one_of(st.integers(), st.booleans(), st.just([good]), st.just(good.upper() + "x"))
    if isinstance(good, int):  # strict ints refuse floats (even integral ones), bools and digit strings
        return st.sampled_from([str(good), float(good), float(good) + 0.5, True, False, [good]])
    return st.sampled_from([str(good), True, False, [good], {"value": good}])  # floats


@SETTINGS
@given(data=st.data(), case=st.sampled_from(TYPED_FIELDS))
def test_component_fields_reject_ill_typed_values(data: st.DataObject, case: tuple[Any, ...]) -> None:
    kind, name, field, good = case
    base: dict[str, Any] = {"keep_ratio_by_layer": {4: 0.5}} if name == "selective" else {}
    bad = data.draw(_ill_typed(good), label="bad value")
    config = CompressionConfig.from_dict({kind: {"name": name, **base, field: bad}})
    with pytest.raises(ComponentError) as info:
        config.resolved()
    assert f"  {kind}.{field}: " in str(info.value)
    # The valid value itself is accepted unchanged.
    accepted = CompressionConfig.from_dict({kind: {"name": name, **base, field: good}}).resolved()
    assert accepted.sections()[kind].params[field] == good


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"name": "uniform", "bits": 4.0}, "bits"),
        ({"name": "uniform", "flush_bits": 8.0}, "flush_bits"),
        ({"name": "mixed_precision", "flush_bits": 2.0}, "flush_bits"),
    ],
)
def test_bit_widths_reject_integral_floats(section: dict[str, Any], field: str) -> None:
    with pytest.raises(ComponentError, match=rf"quantizer\.{field}"):
        CompressionConfig.from_dict({"quantizer": section}).resolved()


@pytest.mark.parametrize("bits", ["4", True, 3, 16, [4]])
def test_bit_widths_reject_other_values(bits: Any) -> None:
    with pytest.raises(ComponentError, match=r"quantizer\.bits"):
        CompressionConfig.from_dict({"quantizer": {"name": "uniform", "bits": bits}}).resolved()


@SETTINGS
@given(
    fractions=st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=4, max_size=4).filter(
        lambda f: abs(math.fsum(f) - 1) > 1e-3
    )
)
def test_tier_fractions_not_summing_to_one_are_rejected(fractions: list[float]) -> None:
    section = dict(zip(("frac_8bit", "frac_4bit", "frac_2bit", "frac_drop"), fractions))
    with pytest.raises(ComponentError, match="must sum to 1"):
        CompressionConfig.from_dict({"quantizer": {"name": "mixed_precision", **section}}).resolved()


@SETTINGS
@given(schedule=st.dictionaries(st.integers(0, 40), st.floats(), min_size=1, max_size=4))
def test_propagation_schedules_are_accepted_only_when_valid(schedule: dict[int, float]) -> None:
    ordered = [schedule[k] for k in sorted(schedule)]
    valid = all(0 < r <= 1 for r in ordered) and all(a >= b for a, b in zip(ordered, ordered[1:]))
    config = CompressionConfig.from_dict({"propagator": {"name": "selective", "keep_ratio_by_layer": schedule}})
    if valid:
        assert config.resolved().propagator.params["keep_ratio_by_layer"] == schedule
    else:
        with pytest.raises(ComponentError, match="propagator.keep_ratio_by_layer"):
            config.resolved()


# -- overrides -------------------------------------------------------------------------------------------
def test_overrides_change_only_what_they_name() -> None:
    base = CompressionConfig.from_preset("default")
    changed = base.with_overrides({"scorer.alpha": 0.5, "window_size": 16})
    assert changed.scorer.params == {**base.scorer.params, "alpha": 0.5}
    assert changed.window_size == 16
    assert changed.quantizer == base.quantizer


def test_new_component_name_starts_from_its_defaults_whatever_the_order() -> None:
    base = CompressionConfig.from_preset("default")
    both_orders = (
        {"quantizer.name": "uniform", "quantizer.bits": 2},
        {"quantizer.bits": 2, "quantizer.name": "uniform"},
    )
    for overrides in both_orders:
        assert base.with_overrides(overrides).quantizer.params == {"bits": 2}
    assert base.with_overrides({"scorer": "snapkv", "scorer.pool": "avg"}).scorer.params == {"pool": "avg"}


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"window_size.x": 1}, r"only scorer\.\*, quantizer\.\*, propagator\.\* take sub-fields"),
        ({"scorer": 5, "scorer.alpha": 0.5}, r"scorer was set to 5, which has no fields"),
        ({"window_size": "16"}, r"window_size: Input should be a valid integer"),
        ({"colour": "red"}, r"colour: Extra inputs are not permitted"),
    ],
)
def test_bad_overrides_are_config_errors(overrides: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        CompressionConfig.from_preset("default").with_overrides(overrides)


# -- config files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("bad.yaml", "scorer: {name: [unclosed\n", "is not valid YAML"),
        ("bad.json", '{"scorer": ', "is not valid JSON"),
        ("list.yaml", "- scorer\n- quantizer\n", "expected a mapping at the top level, got list"),
        ("scalar.json", "3", "expected a mapping at the top level, got int"),
        ("empty.yaml", "", "expected a mapping at the top level, got NoneType"),
        ("field.yaml", "window_size: 1.5\n", r"is invalid:\n  window_size: "),
    ],
)
def test_bad_config_files_are_named(tmp_path: Path, name: str, content: str, pattern: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=pattern) as info:
        CompressionConfig.from_file(path)
    assert str(path) in str(info.value)


def test_missing_and_binary_config_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(missing))} does not exist"):
        CompressionConfig.from_file(missing)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00scorer")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(binary))} is not UTF-8 text"):
        CompressionConfig.from_file(binary)


def test_the_docs_list_every_shipped_preset() -> None:
    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    lm_eval_row = next(line for line in (repo / "docs" / "lm_eval.md").read_text(encoding="utf-8").splitlines()
                       if line.startswith("| `preset` |"))
    for name in preset_names():
        assert f"| `{name}` |" in readme, f"README's preset table lacks {name}"
        assert f"`{name}`" in lm_eval_row, f"docs/lm_eval.md's preset list lacks {name}"


def test_a_misspelt_component_parameter_is_refused_where_it_was_written(tmp_path: Path) -> None:
    """Files and overrides are checked against the registry at once, not when the config is used."""
    typo = tmp_path / "typo.yaml"
    typo.write_text(CompressionConfig.from_preset("default").to_yaml().replace("frac_8bit", "frac_8bt"), encoding="utf-8")
    with pytest.raises(ComponentError, match=rf"(?s)config file {typo}: .*quantizer\.frac_8bt: Extra inputs are not permitted"):
        CompressionConfig.from_file(typo)
    with pytest.raises(ComponentError, match="quantizer"):
        CompressionConfig.from_preset("default").with_overrides({"quantizer.frac_8bit": 0.2})  # fractions sum to 1.1
    # Related fields go in one call.
    both = CompressionConfig.from_preset("default").with_overrides({"quantizer.frac_8bit": 0.2, "quantizer.frac_4bit": 0.45})
    assert both.quantizer.params["frac_8bit"] == 0.2


def test_overrides_keep_a_set_description_and_mark_the_inherited_one() -> None:
    base = CompressionConfig.from_preset("default")
    assert base.with_overrides({"scorer.alpha": 0.5}).description.startswith("Overridden (scorer.alpha=0.5); before")
    assert base.with_overrides({"scorer.alpha": 0.5, "description": "mine"}).description == "mine"
    assert base.with_overrides({}).description == base.description
