"""The component registry: names -> factories, provenance, and every refusal explained."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from kvcore.config import CompressionConfig
from kvcore.hookspecs import hookimpl
from kvcore.plugins import PluginManager
from kvcore.protocols import COMPONENT_KINDS, Propagator, Quantizer, Scorer
from kvcore.registry import NONE_COMPONENT, ComponentError, ComponentRegistry, get_registry

from ._support import FAKE_DIST, FAKE_SCORER


class ZeroConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    offset: float = Field(0.0, ge=0.0)


class ZeroScorer:
    """Scores every token ``offset``: ``[B, H_kv, N]`` float32."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def score(self, obs: Any) -> torch.Tensor:
        return torch.full(obs.keys.shape[:3], self.offset)


class NotAScorer:
    def __init__(self, **params: Any) -> None:
        pass


class HandPlugin:
    """A plugin registered by hand (no entry point) that registers ``components``."""

    def __init__(self, *components: tuple[Any, ...]) -> None:
        self.components = components

    @hookimpl
    def register_components(self, register: Any) -> None:
        for component in self.components:
            register(*component)


def registry_of(**plugins: HandPlugin) -> ComponentRegistry:
    pm = PluginManager()
    for name, plugin in plugins.items():
        pm.register(plugin, name=name)
    return ComponentRegistry.from_plugin_manager(pm)


# -- lookups -------------------------------------------------------------------------------------------
def test_builtins_cover_every_kind_and_implement_their_protocol(clean_registry: None) -> None:
    registry = get_registry()
    for kind in COMPONENT_KINDS:
        assert registry.names(kind), f"no built-in {kind}"
    for spec in registry.specs():
        assert spec.distribution == "kvcomp"
        assert spec.config_model is not None, f"{spec.kind} {spec.name} has no config model"
        assert spec.config_model.model_config.get("extra") == "forbid", spec.name
        assert spec.config_model.model_config.get("strict") is True, spec.name


def test_unknown_component_lists_names_and_distributions(fake_plugin: Path) -> None:
    registry = get_registry()
    with pytest.raises(ComponentError) as info:
        registry.get("scorer", "value_nrom")
    message = str(info.value)
    assert message.startswith("unknown scorer 'value_nrom'; registered scorers: none, ")
    for spec in registry.specs("scorer"):
        assert f"{spec.name} ({spec.distribution})" in message
    assert f"{FAKE_SCORER} ({FAKE_DIST})" in message
    assert "prompt_guided (kvcomp)" in message
    assert "mixed_precision" not in message  # only the asked-for kind


def test_unknown_component_through_a_config(clean_registry: None) -> None:
    config = CompressionConfig.from_dict({"quantizer": {"name": "nf4"}})
    with pytest.raises(ComponentError, match=r"unknown quantizer 'nf4'; registered quantizers: none, .*\(kvcomp\)"):
        config.validate_components()


def test_unknown_kind_lists_kinds(clean_registry: None) -> None:
    pattern = r"unknown component kind 'pruner'; kinds are \['propagator', 'quantizer', 'scorer'\]"
    with pytest.raises(ComponentError, match=pattern):
        get_registry().get("pruner", "x")


def test_none_selects_nothing_and_takes_no_parameters(clean_registry: None) -> None:
    registry = get_registry()
    for kind in COMPONENT_KINDS:
        assert registry.create(kind, NONE_COMPONENT, {}) is None
    with pytest.raises(ComponentError, match=r"scorer 'none' takes no parameters, got \['alpha'\]"):
        registry.validate_params("scorer", NONE_COMPONENT, {"alpha": 0.5})


# -- parameters -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "name", "params", "field"),
    [
        ("scorer", "prompt_guided", {"alpha": "0.5"}, "scorer.alpha"),
        ("scorer", "prompt_guided", {"alpha": -1.0}, "scorer.alpha"),
        ("scorer", "prompt_guided", {"alpah": 0.5}, "scorer.alpah"),
        ("scorer", "prompt_guided", {"pool_kernel": 4}, "scorer.pool_kernel"),
        ("scorer", "random", {"seed": True}, "scorer.seed"),
        ("quantizer", "uniform", {"bits": 3}, "quantizer.bits"),
        ("quantizer", "mixed_precision", {"group_size": "32"}, "quantizer.group_size"),
        ("propagator", "selective", {}, "propagator.keep_ratio_by_layer"),
        ("propagator", "selective", {"keep_ratio_by_layer": {8: "0.5"}}, "propagator.keep_ratio_by_layer.8"),
    ],
)
def test_parameter_errors_name_kind_and_field(
    clean_registry: None, kind: str, name: str, params: dict[str, Any], field: str
) -> None:
    with pytest.raises(ComponentError) as info:
        get_registry().validate_params(kind, name, params)
    message = str(info.value)
    assert message.startswith(f"invalid parameters for {kind} {name!r}:")
    assert re.search(rf"^  {re.escape(field)}: ", message, re.MULTILINE), message
    # create() validates first, so a bad parameter never reaches the factory.
    with pytest.raises(ComponentError, match=re.escape(field)):
        get_registry().create(kind, name, params)


def test_validated_parameters_have_defaults_filled(clean_registry: None) -> None:
    params = get_registry().validate_params("scorer", "prompt_guided", {"alpha": 1})
    assert params["alpha"] == 1.0 and isinstance(params["alpha"], float)
    model = get_registry().get("scorer", "prompt_guided").config_model
    assert model is not None and set(params) == set(model.model_fields)


def test_create_builds_protocol_instances(clean_registry: None) -> None:
    registry = get_registry()
    assert isinstance(registry.create("scorer", "key_norm", {}), Scorer)
    assert isinstance(registry.create("quantizer", "uniform", {"bits": 4}), Quantizer)
    assert isinstance(registry.create("propagator", "selective", {"keep_ratio_by_layer": {2: 0.5}}), Propagator)


# -- registration by hand -----------------------------------------------------------------------------
def test_hand_registered_plugin_is_attributed_in_process() -> None:
    registry = registry_of(mine=HandPlugin(("scorer", "zero", ZeroScorer, ZeroConfig, "all zero")))
    spec = registry.get("scorer", "zero")
    assert (spec.distribution, spec.plugin, spec.module, spec.description) == (
        "(registered in-process)", "mine", __name__, "all zero"
    )
    assert registry.create("scorer", "zero", {"offset": 2}).offset == 2.0


def test_duplicate_names_from_two_plugins_name_both() -> None:
    with pytest.raises(ComponentError) as info:
        registry_of(
            first=HandPlugin(("scorer", "zero", ZeroScorer, ZeroConfig)),
            second=HandPlugin(("scorer", "zero", ZeroScorer)),
        )
    message = str(info.value)
    assert "scorer 'zero' is registered twice" in message
    assert message.count("by distribution '(registered in-process)'") == 2


def test_same_name_for_different_kinds_is_fine() -> None:
    registry = registry_of(mine=HandPlugin(("scorer", "zero", ZeroScorer), ("quantizer", "zero", ZeroScorer)))
    assert registry.names("scorer") == registry.names("quantizer") == ["zero"]


@pytest.mark.parametrize(
    ("component", "pattern"),
    [
        (
            ("pruner", "zero", ZeroScorer),
            r"plugin 'mine' \(\(registered in-process\)\) registered 'zero' with unknown kind 'pruner'",
        ),
        (("scorer", "none", ZeroScorer), r"plugin 'mine' \(\(registered in-process\)\): the name 'none' is reserved"),
    ],
)
def test_bad_registrations_name_the_plugin(component: tuple[Any, ...], pattern: str) -> None:
    with pytest.raises(ComponentError, match=pattern):
        registry_of(mine=HandPlugin(component))


def test_factory_not_implementing_the_protocol_is_refused() -> None:
    registry = registry_of(mine=HandPlugin(("scorer", "hollow", NotAScorer)))
    pattern = r"scorer 'hollow' from '\(registered in-process\)' .* does not implement the Scorer protocol"
    with pytest.raises(ComponentError, match=pattern):
        registry.create("scorer", "hollow", {})


def test_specs_are_sorted_by_kind_then_name() -> None:
    registry = registry_of(
        mine=HandPlugin(("scorer", "b", ZeroScorer), ("scorer", "a", ZeroScorer), ("propagator", "z", ZeroScorer))
    )
    assert [(s.kind, s.name) for s in registry.specs()] == [("propagator", "z"), ("scorer", "a"), ("scorer", "b")]
    assert registry.specs("quantizer") == []
    with pytest.raises(ComponentError, match=r"registered quantizers: none, \(none registered\)"):
        registry.get("quantizer", "x")
