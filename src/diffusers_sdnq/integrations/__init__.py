"""Adapters into diffusers, transformers and PEFT. Thin: they translate, ``layers``/``format`` compute.

:func:`setup` (run by ``import diffusers_sdnq``) sets up the libraries already imported and watches for the
others; :func:`register_all` imports and sets up every installed library at once.
"""

from __future__ import annotations

from .hooks import setup, setup_now


def register_all() -> list[str]:
    """Register the SDNQ backend in every installed library now; idempotent. Returns the libraries set up."""
    return setup_now()


__all__ = ["register_all", "setup"]
