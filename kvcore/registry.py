"""Component registry: component *name* -> factory, with provenance and parameter validation."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from kvcore.plugins import PluginManager, get_plugin_manager
from kvcore.protocols import COMPONENT_KINDS

NONE_COMPONENT = "none"
"""The name that selects no component (identity) for any kind; never registrable."""


class ComponentError(ValueError):
    """A component could not be registered, found or configured."""


@dataclass(frozen=True)
class ComponentSpec:
    """One registered component."""

    kind: str
    name: str
    factory: Callable[..., Any]
    config_model: type[BaseModel] | None
    description: str
    distribution: str
    module: str
    plugin: str

    def as_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "module": self.module,
            "plugin": self.plugin,
            "description": self.description,
        }


class ComponentRegistry:
    """Maps ``(kind, name)`` to a :class:`ComponentSpec`."""

    def __init__(self) -> None:
        self._specs: dict[tuple[str, str], ComponentSpec] = {}

    @classmethod
    def from_plugin_manager(cls, pm: PluginManager) -> "ComponentRegistry":
        """Call every plugin's ``register_components`` hook, attributing each component."""
        registry = cls()
        for impl in pm.hook.register_components.get_hookimpls():
            info = pm.info(impl.plugin_name)

            def register(
                kind: str,
                name: str,
                factory: Callable[..., Any],
                config_model: type[BaseModel] | None = None,
                description: str = "",
                _info: Any = info,
            ) -> None:
                module = getattr(factory, "__module__", None) or _info.module
                registry.add(
                    ComponentSpec(kind, name, factory, config_model, description, _info.distribution, module, _info.name)
                )

            try:
                impl.function(register=register)
            except ComponentError:
                raise
            except Exception as exc:  # a plugin's own bug must still say whose it is
                raise ComponentError(
                    f"plugin {info.name!r} from distribution {info.distribution!r} ({info.module}) failed in "
                    f"register_components: {type(exc).__name__}: {exc}"
                ) from exc
        return registry

    def add(self, spec: ComponentSpec) -> None:
        if spec.kind not in COMPONENT_KINDS:
            raise ComponentError(
                f"plugin {spec.plugin!r} ({spec.distribution}) registered {spec.name!r} with unknown kind "
                f"{spec.kind!r}; kinds are {sorted(COMPONENT_KINDS)}"
            )
        if spec.name == NONE_COMPONENT:
            raise ComponentError(f"plugin {spec.plugin!r} ({spec.distribution}): the name 'none' is reserved")
        other = self._specs.get((spec.kind, spec.name))
        if other is not None:
            raise ComponentError(
                f"{spec.kind} {spec.name!r} is registered twice: by distribution {other.distribution!r} "
                f"(module {other.module}) and by distribution {spec.distribution!r} (module {spec.module}); "
                f"uninstall one or narrow the plugins with KVCOMP_PLUGINS"
            )
        self._specs[(spec.kind, spec.name)] = spec

    def specs(self, kind: str | None = None) -> list[ComponentSpec]:
        """All specs (of one kind), sorted by kind then name."""
        return sorted(
            (s for s in self._specs.values() if kind is None or s.kind == kind), key=lambda s: (s.kind, s.name)
        )

    def names(self, kind: str) -> list[str]:
        return [s.name for s in self.specs(kind)]

    def get(self, kind: str, name: str) -> ComponentSpec:
        if kind not in COMPONENT_KINDS:
            raise ComponentError(f"unknown component kind {kind!r}; kinds are {sorted(COMPONENT_KINDS)}")
        spec = self._specs.get((kind, name))
        if spec is None:
            choices = ", ".join(f"{s.name} ({s.distribution})" for s in self.specs(kind)) or "(none registered)"
            raise ComponentError(f"unknown {kind} {name!r}; registered {kind}s: {NONE_COMPONENT}, {choices}")
        return spec

    def validate_params(self, kind: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Validate a component's parameters; errors name ``kind.field`` and the bad value."""
        if name == NONE_COMPONENT:
            if params:
                raise ComponentError(f"{kind} 'none' takes no parameters, got {sorted(params)}")
            return {}
        spec = self.get(kind, name)
        if spec.config_model is None:
            return dict(params)
        try:
            model = spec.config_model.model_validate(params)
        except ValidationError as exc:
            raise ComponentError(f"invalid parameters for {kind} {name!r}:\n{format_validation_error(exc, kind)}") from exc
        return model.model_dump()

    def create(self, kind: str, name: str, params: dict[str, Any]) -> Any:
        """Build the component (``None`` for ``none``) from validated parameters."""
        checked = self.validate_params(kind, name, params)
        if name == NONE_COMPONENT:
            return None
        spec = self.get(kind, name)
        component = spec.factory(**checked)
        protocol = COMPONENT_KINDS[kind]
        if not isinstance(component, protocol):
            raise ComponentError(
                f"{kind} {name!r} from {spec.distribution!r} ({spec.module}) does not implement the "
                f"{protocol.__name__} protocol"
            )
        return component


def format_validation_error(exc: ValidationError, prefix: str | None = None) -> str:
    """One line per problem: ``field.path: message (got value)``, the path under ``prefix``.

    A check written as a validator (pydantic's ``value_error``) names the values it refuses in its
    own message, and its input is often the whole section: that input is not repeated.
    """
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in ([prefix] if prefix else []) + list(err["loc"])) or "(top level)"
        if err["type"] == "value_error":
            lines.append(f"  {loc}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def get_registry() -> ComponentRegistry:
    """The process-wide registry built from the process-wide plugin manager."""
    return ComponentRegistry.from_plugin_manager(get_plugin_manager())


def reset_registry() -> None:
    """Forget the cached plugin manager and registry (after ``sys.path`` or env changes)."""
    get_registry.cache_clear()
    get_plugin_manager.cache_clear()
