"""What the SDNQ config classes of both libraries share: the field names a user may type, and reading the fields of
any config object that carries them.

Two ways a config comes into being, with two rules:

* typed by a user in code (``SDNQConfig(weights_dtype="uint4")``, ``PipelineQuantizationConfig(quant_kwargs=...)``):
  an unknown keyword is a mistake and raises ``TypeError`` naming it and the closest field (:func:`check_keywords`);
* read from a saved file (``from_dict``): an unknown field may come from a newer sdnq release, so it is kept and
  warned about (forward compatibility, :meth:`~diffusers_sdnq.format.config.QuantConfig.from_dict`).
"""

from __future__ import annotations

import difflib
import enum
import logging
import sys
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from ..format.config import QuantConfig

logger = logging.getLogger("diffusers_sdnq")

#: Field names of a ``quantization_config`` (the reference's names).
FIELDS = tuple(f.name for f in fields(QuantConfig) if f.name not in ("extra", "writer_versions"))
#: Keys the reference writes that are derived from ``weights_dtype``; accepted and recomputed.
DERIVED = ("is_integer", "is_unsigned")


def check_keywords(kwargs: Mapping[str, Any], owner: str) -> None:
    """Raise ``TypeError`` for the first keyword that is not an SDNQ config field, suggesting the closest one."""
    for key in kwargs:
        if key in FIELDS or key in DERIVED:
            continue
        close = difflib.get_close_matches(str(key), FIELDS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; the fields are: {', '.join(FIELDS)}"
        raise TypeError(f"{owner} got an unexpected keyword argument {key!r}{hint}")


def config_fields(config: Any) -> dict[str, Any]:
    """The fields of an SDNQ config given as a dict or as any object carrying them (``to_dict()`` or attributes):
    our classes, the reference package's ``SDNQConfig``, ``diffusers.SDNQConfig``. Enum values become strings."""
    if isinstance(config, Mapping):
        data = dict(config)
    else:
        to_dict = getattr(config, "to_dict", None)
        data = to_dict() if callable(to_dict) else {k: v for k, v in vars(config).items() if not k.startswith("_")}
        if not isinstance(data, Mapping):
            raise TypeError(f"{type(config).__name__}.to_dict() returned {type(data).__name__}, not a dict of SDNQ "
                            "config fields")
        data = dict(data)
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in data.items()}


_noted: set[str] = set()


def note_other_implementation(reason: str) -> None:
    """Say once per process which implementation serves ``quant_method="sdnq"`` when the ``sdnq`` package (the
    reference implementation) is installed and imported next to this one."""
    if "sdnq" in _noted:
        return
    _noted.add("sdnq")
    logger.warning(
        "diffusers-sdnq serves quant_method 'sdnq' in diffusers and transformers (%s); the imported 'sdnq' package "
        "is not used for loading or quantizing. To use the sdnq package instead, run with DIFFUSERS_SDNQ_AUTOLOAD=0 "
        "and without importing diffusers_sdnq (docs/loading.md).", reason)


def is_from_reference(obj: Any) -> bool:
    """True for objects (or classes) of the ``sdnq`` package."""
    cls = obj if isinstance(obj, type) else type(obj)
    return (cls.__module__ or "").split(".")[0] == "sdnq"


def reference_imported() -> bool:
    return sys.modules.get("sdnq") is not None
