"""PEFT adapters (LoRA, DoRA, LoKr, LoHa) on SDNQ-quantized layers; :func:`install` is run when PEFT is imported.

Importing this subpackage does not import PEFT: the layer classes load on first access, so :func:`install` can
run from the import hook while PEFT itself is still finishing its import.
"""

from __future__ import annotations

import importlib
from typing import Any

from .dispatch import MIN_PEFT, dispatch_sdnq, dispatch_sdnq_lycoris, install, sdnq_base_of
from .errors import SDNQAdapterError, SDNQFuseError

_LAZY = {
    "SDNQLoraLinear": ".lora",
    "SDNQDoraLinearVariant": ".lora",
    "check_lora_config": ".lora",
    "SDNQLoKrLinear": ".lycoris",
    "SDNQLoHaLinear": ".lycoris",
    "fuse_blockers": ".merge",
    "prepare_model_for_sdnq_training": ".training",
    "sdnq_stored_tensors": ".training",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MIN_PEFT",
    "SDNQAdapterError",
    "SDNQFuseError",
    *_LAZY,
    "dispatch_sdnq",
    "dispatch_sdnq_lycoris",
    "install",
    "sdnq_base_of",
]
