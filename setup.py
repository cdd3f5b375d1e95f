"""Build hooks: ship ``diffusers_sdnq.pth`` at the root of site-packages (regular and editable installs).

The .pth line imports ``diffusers_sdnq_autoload``, a standard-library-only finder that registers the SDNQ
backend when diffusers / transformers / peft are imported (see that module; opt out with
``DIFFUSERS_SDNQ_AUTOLOAD=0``). Everything else about the build is in pyproject.toml.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PTH = "diffusers_sdnq.pth"


def _pth_text() -> str:
    with open(os.path.join(HERE, "src", PTH), encoding="utf-8") as fh:
        return fh.read()


class BuildPyWithPth(build_py):
    """Regular wheels: put the .pth beside the packages, so it lands in site-packages."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_lib, PTH)
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(_pth_text())


cmdclass: dict[str, type] = {"build_py": BuildPyWithPth}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover - very old setuptools: no PEP 660 editable installs
    pass
else:

    class _StrategyWithPth:
        """Wraps setuptools' editable strategy to add our .pth to the editable wheel."""

        def __init__(self, strategy) -> None:
            self._strategy = strategy

        def __enter__(self):
            self._strategy.__enter__()
            return self

        def __exit__(self, *exc):
            return self._strategy.__exit__(*exc)

        def __call__(self, wheel, files, mapping) -> None:
            self._strategy(wheel, files, mapping)
            wheel.writestr(PTH, _pth_text())

    class EditableWheelWithPth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _StrategyWithPth(super()._select_strategy(*args, **kwargs))

    cmdclass["editable_wheel"] = EditableWheelWithPth

setup(cmdclass=cmdclass)
