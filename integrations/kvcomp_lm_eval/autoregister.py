"""Make ``--model kvcomp-llama`` known to lm-evaluation-harness without a wrapper script.

lm-eval 0.4.13 has a fixed model table (``lm_eval.models.MODEL_MAPPING``) and reads no entry
points, so a third-party model exists for it only once something has registered it. The wheel
installs ``kvcomp_lm_eval.pth`` into site-packages; at interpreter start it calls
:func:`install_import_hook`, which puts a one-shot finder on ``sys.meta_path``. When (and only
when) ``lm_eval.api.registry`` is imported, the finder lets the real module load and then calls
:func:`register_with_lm_eval`.

Two rules keep lm-eval's own models working:

- ``lm_eval.api.registry.get_model`` imports ``lm_eval.models`` (which fills the built-in table)
  only while the table is *empty*. Registering ``kvcomp-llama`` first would make it non-empty and
  hide ``hf``, ``vllm``, ...; so the built-in table is filled first, then ours is added.
- ``kvcomp-llama`` is registered as a lazy ``"module:Class"`` placeholder, so torch and the model
  code are imported only when someone asks for ``kvcomp-llama``.

This module imports nothing but the standard library: it runs in every interpreter that has the
package installed. Set ``KVCOMP_LM_EVAL_AUTOREGISTER=0`` to switch the hook off.
"""

from __future__ import annotations

import importlib.util
import os
import sys

TYPE_CHECKING = False  # typing/logging/importlib.abc cost milliseconds at every interpreter start
if TYPE_CHECKING:
    import types
    from collections.abc import Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec

MODEL_NAME = "kvcomp-llama"
MODEL_TARGET = "kvcomp_lm_eval.model:KVCompLM"
REGISTRY_MODULE = "lm_eval.api.registry"
DISABLE_ENV = "KVCOMP_LM_EVAL_AUTOREGISTER"


def _warn(message: str, *args: object) -> None:
    import logging

    logging.getLogger(__name__).warning(message, *args)


def register_with_lm_eval(target: object = MODEL_TARGET) -> None:
    """Add ``kvcomp-llama`` to lm-eval's model registry, keeping lm-eval's own models.

    Args:
        target: the class, or a lazy ``"module:Class"`` placeholder string.

    Idempotent: registering the same target again (or upgrading the placeholder to the class it
    names) is accepted; a *different* object already registered under ``kvcomp-llama`` is left
    alone and logged.
    """
    import lm_eval.models  # noqa: F401  (fills the built-in table; see the module docstring)
    from lm_eval.api.registry import model_registry

    current = dict(model_registry.items()).get(MODEL_NAME)  # raw entries: nothing is imported
    if current is not None and not isinstance(current, str) and isinstance(target, str):
        return  # the class itself is already there; a placeholder would be a downgrade
    try:
        model_registry.register(MODEL_NAME, target=target)
    except ValueError as exc:  # someone else registered another model under our name
        _warn("kvcomp: not registering %r with lm-eval: %s", MODEL_NAME, exc)


class _RegistryLoader:
    """Runs the real loader of ``lm_eval.api.registry``, then registers ``kvcomp-llama``."""

    def __init__(self, inner: Loader) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:  # get_source, is_package, ...: the real loader's
        return getattr(self.inner, name)

    def create_module(self, spec: ModuleSpec) -> types.ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.inner.exec_module(module)  # type: ignore[attr-defined]
        try:
            register_with_lm_eval()
        except Exception as exc:  # never break lm-eval's own import because of us
            _warn("kvcomp: could not register %r with lm-eval: %s", MODEL_NAME, exc)


class LmEvalRegistryFinder:
    """One-shot ``sys.meta_path`` finder that wraps the loader of ``lm_eval.api.registry``."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname != REGISTRY_MODULE:
            return None
        uninstall_import_hook()  # one shot; also stops find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegistryLoader(spec.loader)
        return spec


def install_import_hook() -> None:
    """Put the finder on ``sys.meta_path`` (idempotent; registers at once if lm-eval is loaded)."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if REGISTRY_MODULE in sys.modules:  # installed late, e.g. from a running program
        try:
            register_with_lm_eval()
        except Exception as exc:
            _warn("kvcomp: could not register %r with lm-eval: %s", MODEL_NAME, exc)
        return
    if not any(isinstance(f, LmEvalRegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LmEvalRegistryFinder())


def uninstall_import_hook() -> None:
    """Remove the finder from ``sys.meta_path`` (no error if absent)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, LmEvalRegistryFinder)]
