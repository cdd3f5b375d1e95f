"""What to set up when each library (or the part of it we extend) finishes importing.

``import diffusers_sdnq`` sets up the libraries already imported and leaves a finder (``diffusers_sdnq_autoload``)
that sets up the others the moment they are imported, so the import order of diffusers, transformers, peft and
diffusers-sdnq never matters, and importing diffusers-sdnq does not import them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

logger = logging.getLogger("diffusers_sdnq")


def _diffusers_mapping() -> None:
    from .diffusers.register import register

    register(sidecar=False)


def _diffusers_sidecar() -> None:
    from .sidecar import install_diffusers

    install_diffusers()


def _transformers_mapping() -> None:
    from .transformers.register import register

    register(sidecar=False)


def _transformers_sidecar() -> None:
    from .sidecar import install_transformers

    install_transformers()


def _peft() -> None:
    from .peft import install

    install()


#: watched module -> (library label, step). The module must have finished importing before the step runs.
STEPS: dict[str, tuple[str, Callable[[], None]]] = {
    "diffusers.quantizers.auto": ("diffusers", _diffusers_mapping),
    "diffusers.models.modeling_utils": ("diffusers", _diffusers_sidecar),
    "transformers.quantizers.auto": ("transformers", _transformers_mapping),
    "transformers.configuration_utils": ("transformers", _transformers_sidecar),
    "peft": ("peft", _peft),
}
_done: set[str] = set()


_pending: set[str] = set()


def on_import(name: str, _exclude: str = "") -> None:
    """Run the step for ``name`` once. Errors are logged: a broken adapter must not break the user's import.

    When the library module finished importing *while one of our adapter modules was itself being imported*
    (our adapter imports the library, which imports the watched module), the step is deferred until our
    module is complete: :func:`retry_pending` runs at the end of each adapter package's ``__init__``."""
    if name in _done or name not in STEPS:
        return
    if _ours_initializing(_exclude):
        _pending.add(name)
        return
    _done.add(name)
    _pending.discard(name)
    try:
        STEPS[name][1]()
    except Exception:  # pragma: no cover - reported, and loading an SDNQ checkpoint then fails loudly
        _done.discard(name)
        logger.exception("diffusers-sdnq could not set up %s after importing %s", STEPS[name][0], name)


def _ours_initializing(exclude: str = "") -> bool:
    return any(mod_name.startswith("diffusers_sdnq.integrations.") and mod_name != exclude and _initializing(mod)
               for mod_name, mod in list(sys.modules.items()))


def _initializing(module: object) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def retry_pending(package: str) -> None:
    """Run the steps deferred by :func:`on_import`; called as the last line of an adapter ``package``'s
    ``__init__`` (whose own import is the only one still running then)."""
    for name in sorted(_pending):
        on_import(name, _exclude=package)


def _ready(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and not _initializing(module)


def setup() -> list[str]:
    """Set up every library already imported and watch for the rest. Returns the libraries set up now."""
    try:
        import diffusers_sdnq_autoload
    except ImportError:  # the package was vendored without its top-level hook module: set everything up now
        return setup_now()
    diffusers_sdnq_autoload.install()
    for name in STEPS:
        if _ready(name):
            on_import(name)
    return sorted({STEPS[n][0] for n in _done})


def setup_now() -> list[str]:
    """Import and set up every installed library immediately (what ``diffusers_sdnq.register()`` does)."""
    import importlib
    import importlib.util

    for name, (library, _) in STEPS.items():
        if importlib.util.find_spec(library) is not None:
            importlib.import_module(name)
            on_import(name)
    return sorted({STEPS[n][0] for n in _done})
