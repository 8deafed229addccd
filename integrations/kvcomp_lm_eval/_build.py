"""Build step that installs ``kvcomp_lm_eval.pth`` next to the packages (wheel and editable installs).

setuptools has no setting for a file at the root of site-packages, so ``build_py`` is extended
(``[tool.setuptools.cmdclass]`` in ``pyproject.toml``):

- wheel (``pip install .``, ``pip wheel .``): the file is written to ``build_lib``, whose contents
  become the root of the wheel, i.e. site-packages;
- editable (``pip install -e .``, PEP 660): setuptools points the ``install`` command's
  ``install_lib`` at the folder that becomes the editable wheel's root, so the file goes there
  (``build_lib`` is a throw-away folder in that mode).

The ``.pth`` line only imports :mod:`kvcomp_lm_eval.autoregister` (standard library only) and
installs an import hook; see that module. The file name sorts after setuptools'
``__editable__.*.pth``, so in an editable install the package is importable when it runs.
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py

PTH_NAME = "kvcomp_lm_eval.pth"
PTH_LINE = (
    'import importlib.util as u; u.find_spec("kvcomp_lm_eval") and '
    '__import__("kvcomp_lm_eval.autoregister").autoregister.install_import_hook()\n'
)


class BuildPyWithPth(build_py):
    """``build_py`` plus the ``.pth`` file that registers ``kvcomp-llama`` with lm-eval."""

    def run(self) -> None:
        super().run()
        target = self._pth_dir()
        os.makedirs(target, exist_ok=True)
        path = os.path.join(target, PTH_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(PTH_LINE)

    def _pth_dir(self) -> str:
        if self.editable_mode:
            return str(self.get_finalized_command("install").install_lib)
        return str(self.build_lib)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:  # type: ignore[override]
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs
