"""Adapters into diffusers and transformers (and PEFT). Thin: they translate, ``layers``/``format`` compute."""

from __future__ import annotations

import importlib.util


def register_all() -> list[str]:
    """Register the SDNQ backend in every installed library; idempotent. Returns the libraries registered."""
    done = []
    if importlib.util.find_spec("diffusers") is not None:
        from .diffusers import register as register_diffusers

        register_diffusers()
        done.append("diffusers")
    if importlib.util.find_spec("transformers") is not None:
        try:
            from .transformers import register as register_transformers
        except ImportError:  # transformers integration unavailable in this install
            pass
        else:
            register_transformers()
            done.append("transformers")
    return done
