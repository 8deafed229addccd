"""Validated configuration: which components run, with which parameters.

A config selects components by name::

    scorer: {name: prompt_guided, alpha: 0.6}
    quantizer: {name: mixed_precision, frac_8bit: 0.1, frac_4bit: 0.3, frac_2bit: 0.0, frac_drop: 0.6}
    propagator: {name: none}

Fields are strict: an unknown field or a value of the wrong type is refused, never coerced.
Component parameters are validated against the component's own pydantic model through the
registry (:meth:`CompressionConfig.validate_components`): when a file is read and when overrides
are applied, so a typo is refused where it was written; a config built with :meth:`from_dict`
is checked when it is first used.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvcore.registry import NONE_COMPONENT, ComponentError, ComponentRegistry, format_validation_error, get_registry

PRESET_PACKAGE = "kvcore.presets"

MAX_TOKEN_COUNT = 1 << 17
"""Upper bound of every token-count field (residual length, flush size, keep floors): 131,072,
the longest context of the LLaMA family. Past it a count can only mean "never compress" (or
overflow a tensor shape), so it is refused as a typo rather than accepted silently."""


def layer_index_keys(value: Any) -> Any:
    """A ``{layer: x}`` mapping with its keys read as layer indices: integers >= 0, or their digit
    strings (``"8"``, as JSON writes keys). Anything else raises ``ValueError`` naming the key;
    a value that is not a dict is returned as it is (strict validation then reports its type).
    For the ``mode="before"`` validators of per-layer fields."""
    if not isinstance(value, dict):
        return value
    out: dict[Any, Any] = {}
    for key, item in value.items():
        if isinstance(key, str) and key.isascii() and key.lstrip("-").isdigit() and key.count("-") <= 1:
            layer: Any = int(key)
        elif isinstance(key, int) and not isinstance(key, bool):
            layer = key
        else:
            raise ValueError(f"layer {key!r} is not a layer index; use an integer >= 0 (or its digit string, e.g. '8')")
        if layer < 0:
            raise ValueError(f"layer {layer} is negative; layer indices are integers >= 0")
        if layer in out:
            raise ValueError(f"layer {layer} appears twice (as {key!r} and as an earlier key)")
        out[layer] = item
    return out


def refuse_missing_layers(field: str, layers: Any, num_layers: int) -> None:
    """Raise ``ValueError`` if the per-layer ``field`` (its keys ``layers``) names a layer index
    the model's ``num_layers`` do not reach; for components' ``check_model``."""
    too_deep = [layer for layer in layers if layer >= num_layers]
    if too_deep:
        raise ValueError(
            f"{field} names layer(s) {too_deep}, but the model has {num_layers} layers; use indices 0..{num_layers - 1}"
        )


class ConfigError(ValueError):
    """A configuration file or preset could not be read or validated."""


class ComponentSection(BaseModel):
    """``{name: ..., **params}``: one component chosen by name with its parameters."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    name: str = Field(default=NONE_COMPONENT, min_length=1)

    @property
    def params(self) -> dict[str, Any]:
        """Everything but ``name``."""
        return dict(self.model_extra or {})


class CompressionConfig(BaseModel):
    """The whole compression set-up for one run."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    description: str = ""
    scorer: ComponentSection = ComponentSection()
    quantizer: ComponentSection = ComponentSection()
    propagator: ComponentSection = ComponentSection()
    window_size: int = Field(default=32, ge=1, le=4096)
    """Prompt-window tokens (the last W prompt tokens) when the caller gives no question span."""
    n_sink: int = Field(default=4, ge=0, le=1024)
    """First positions treated as attention sinks: always kept, never quantised."""
    weights: str = Field(default="none", pattern="^(none|int8)$")
    """Weight-only quantisation of the model's linear layers: ``none`` or ``int8``."""

    @model_validator(mode="before")
    @classmethod
    def _sections_from_mappings(cls, data: Any) -> Any:
        # ``scorer: prompt_guided`` is shorthand for ``scorer: {name: prompt_guided}``.
        if isinstance(data, dict):
            data = {
                k: ({"name": v} if k in ("scorer", "quantizer", "propagator") and isinstance(v, str) else v)
                for k, v in data.items()
            }
        return data

    @property
    def is_uncompressed(self) -> bool:
        """True when every component is ``none``: the model runs its ordinary cache."""
        return all(s.name == NONE_COMPONENT for s in (self.scorer, self.quantizer, self.propagator))

    def sections(self) -> dict[str, ComponentSection]:
        return {"scorer": self.scorer, "quantizer": self.quantizer, "propagator": self.propagator}

    def validate_components(self, registry: ComponentRegistry | None = None) -> dict[str, dict[str, Any]]:
        """Check each section against the registry; returns the full parameters (defaults filled)."""
        registry = registry or get_registry()
        return {
            kind: registry.validate_params(kind, section.name, section.params)
            for kind, section in self.sections().items()
        }

    def resolved(self, registry: ComponentRegistry | None = None) -> "CompressionConfig":
        """A copy whose component sections list every parameter, defaults included."""
        params = self.validate_components(registry)
        data = self.to_dict()
        for kind, values in params.items():
            data[kind] = {"name": data[kind]["name"], **values}
        return CompressionConfig.from_dict(data)

    def check_components(self, source: str | None = None) -> "CompressionConfig":
        """This config, once every component section has passed :meth:`validate_components`; a
        :class:`ComponentError` names ``source`` (a file, say) when given."""
        try:
            self.validate_components()
        except ComponentError as exc:
            if source is None:
                raise
            raise ComponentError(f"{source}: {exc}") from exc
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> "CompressionConfig":
        """Apply dotted overrides such as ``{"scorer.alpha": 0.5, "quantizer.name": "uniform"}``.

        The result is checked whole, components included: a misspelt parameter or fractions that
        no longer sum to 1 are refused here, so several related fields go in one call. Unless the
        overrides set ``description``, the description says what was overridden: a preset's
        measured claims describe the preset, not the changed config.
        """
        data = self.to_dict()
        if "description" not in overrides and self.description and overrides:
            changed = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
            data["description"] = f"Overridden ({changed}); before the overrides: {self.description}"

        def order(dotted: str) -> int:
            # Whole sections, then component names, then parameters: a name change resets the
            # section to that component's defaults, which must not wipe a parameter given with it.
            return 0 if "." not in dotted else 1 if dotted.endswith(".name") else 2

        for dotted, value in sorted(overrides.items(), key=lambda item: order(item[0])):
            head, _, tail = dotted.partition(".")
            if tail:
                if head not in ("scorer", "quantizer", "propagator"):
                    raise ConfigError(f"override {dotted!r}: only scorer.*, quantizer.*, propagator.* take sub-fields")
                section = data[head]
                if not isinstance(section, dict):
                    raise ConfigError(f"override {dotted!r}: {head} was set to {section!r}, which has no fields")
                if tail == "name" and value != section.get("name"):
                    data[head] = {"name": value}  # a new component starts from its own defaults
                else:
                    section[tail] = value
            elif head in ("scorer", "quantizer", "propagator") and isinstance(value, str):
                data[head] = {"name": value}  # the shorthand, spelt out so sub-field overrides can extend it
            else:
                data[head] = dict(value) if isinstance(value, dict) else value
        return CompressionConfig.from_dict(data).check_components()

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for kind, section in self.sections().items():
            data[kind] = {"name": section.name, **section.params}
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> "CompressionConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source} is invalid:\n{format_validation_error(exc)}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> "CompressionConfig":
        """Load YAML (``.yaml``/``.yml``) or JSON (``.json``), components checked against the
        registry (a component of a plugin must be registered before its config is read)."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; give a .yaml, .yml or .json file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text: {exc}") from exc
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
        return cls.from_dict(data, source=str(path)).check_components(source=f"config file {path}")

    @classmethod
    def from_preset(cls, name: str) -> "CompressionConfig":
        presets = preset_names()
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(presets)}")
        text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        return cls.from_dict(yaml.safe_load(text), source=f"preset {name!r}")


def preset_names() -> list[str]:
    """Names of the presets shipped with kvcomp."""
    files = resources.files(PRESET_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def load_config(preset: str | None = None, config_file: str | Path | None = None) -> CompressionConfig:
    """The config named by a preset or a file (exactly one may be given; neither -> ``default``)."""
    if preset and config_file:
        raise ConfigError("give either a preset or a config file, not both")
    if config_file:
        return CompressionConfig.from_file(config_file)
    return CompressionConfig.from_preset(preset or "default")


__all__ = [
    "ComponentError",
    "ComponentSection",
    "CompressionConfig",
    "ConfigError",
    "format_validation_error",
    "layer_index_keys",
    "load_config",
    "preset_names",
    "refuse_missing_layers",
]
