"""Registers diffusers-sdnq with diffusers, transformers and PEFT as they are imported, with no import of ours.

Started by ``diffusers_sdnq.pth`` (installed with the package) at interpreter start-up. It only puts a small
finder on ``sys.meta_path``; nothing else is imported until one of the watched modules finishes importing,
and then only that library's adapter is set up. So an SDNQ checkpoint is never read as dense weights just
because ``import diffusers_sdnq`` was forgotten. Opt out with ``DIFFUSERS_SDNQ_AUTOLOAD=0``.

Standard library only: this runs in every Python process of the environment.
"""

from __future__ import annotations

import os
import sys

#: module whose import completes -> step to run (see diffusers_sdnq.integrations.hooks)
WATCHED = (
    "diffusers.quantizers.auto",
    "diffusers.models.modeling_utils",
    "transformers.quantizers.auto",
    "transformers.configuration_utils",
    "peft",
)


class _NotifyingLoader:
    """Wraps a module's loader; after the module has executed, runs our step for it."""

    def __init__(self, loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def __getattr__(self, attr):
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader  # tools that inspect the loader see the real one
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        notify(self._name)


def notify(name: str) -> None:
    """Run diffusers-sdnq's step for ``name``; a failure is logged, never raised into the user's import (whatever
    it is: a package removed but this file left behind, a broken install, a bad ``DIFFUSERS_SDNQ_*`` value)."""
    try:
        from diffusers_sdnq.integrations.hooks import on_import
    except ImportError as exc:
        if getattr(exc, "name", None) == "diffusers_sdnq":  # the package was removed but this file was left behind
            return
        _report(name, exc)
        return
    except Exception as exc:  # noqa: BLE001 - never break the user's import
        _report(name, exc)
        return
    try:
        on_import(name)
    except Exception as exc:  # noqa: BLE001 - on_import logs its own failures; this is the last line of defence
        _report(name, exc)


def _report(name: str, exc: BaseException) -> None:
    """One log line (the traceback at debug level): SDNQ checkpoints will then fail loudly when loaded."""
    import logging

    logger = logging.getLogger("diffusers_sdnq")
    logger.error("diffusers-sdnq could not set itself up after %s was imported (%s: %s); SDNQ checkpoints may not "
                 "load until this is fixed (DIFFUSERS_SDNQ_AUTOLOAD=0 turns this start-up hook off)", name,
                 type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG))


class SDNQImportHook:
    """``sys.meta_path`` finder that only reacts to the modules in :data:`WATCHED`."""

    diffusers_sdnq_hook = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in WATCHED:
            return None
        try:
            return self._find_spec(fullname, path, target)
        except Exception:  # noqa: BLE001 - the import system then asks the other finders itself, as without us
            return None

    def _find_spec(self, fullname, path, target):
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "diffusers_sdnq_hook", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _NotifyingLoader(spec.loader, fullname)
        return spec

    def invalidate_caches(self) -> None:
        pass


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(getattr(f, "diffusers_sdnq_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, SDNQImportHook())


def opted_out() -> bool:
    """``DIFFUSERS_SDNQ_AUTOLOAD=0`` turns off the start-up hook (``import diffusers_sdnq`` still sets it up).
    Any other value keeps it on (a value that is not a yes/no word is reported once by diffusers_sdnq._env)."""
    return os.environ.get("DIFFUSERS_SDNQ_AUTOLOAD", "1").strip().lower() in ("0", "false", "no", "off")


try:  # runs in every Python process of the environment (diffusers_sdnq.pth): it must never fail
    if not opted_out():
        install()
except Exception:  # noqa: BLE001, S110
    pass
