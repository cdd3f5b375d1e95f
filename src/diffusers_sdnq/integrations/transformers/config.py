"""The transformers-side quantization config: the checkpoint's ``quantization_config`` dict, kept verbatim."""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ...format.config import QuantConfig
from ..config_args import check_keywords, config_fields

_KNOWN_FIELDS = frozenset(f.name for f in fields(QuantConfig)) - {"extra"}


class SDNQTransformersConfig(QuantizationConfigMixin):
    """An SDNQ ``quantization_config`` for transformers (``quant_method`` "sdnq" or "sdnq_training").

    The instance holds exactly the fields it was given, as attributes; :meth:`to_dict` returns them unchanged
    (unknown fields included), so ``save_pretrained`` writes back what was read. A field the dict does not
    have reads as the default of the sdnq release that wrote it (e.g. ``dequantize_fp32`` for 0.1.x files).
    Validation and per-layer decisions go through :class:`~diffusers_sdnq.format.config.QuantConfig`.
    """

    def __init__(self, **kwargs: Any) -> None:
        # named like SDNQDiffusersConfig's, so PipelineQuantizationConfig(quant_backend="sdnq") accepts both
        check_keywords(kwargs, type(self).__name__)  # typed in code: a misspelt field is an error
        self._init(kwargs)

    def _init(self, config: dict[str, Any]) -> None:
        if "quant_method" not in config:
            config["quant_method"] = "sdnq_training" if config.get("is_training") else "sdnq"
        method = config["quant_method"]
        config["quant_method"] = getattr(method, "value", method)
        QuantConfig.from_dict(config)  # validate now: a bad config fails before the model is built
        self.__dict__.update(config)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Read a saved config (or any SDNQ config object): unknown fields are kept, with a warning."""
        config = cls.__new__(cls)
        config._init({**config_fields(config_dict), **{k: v for k, v in kwargs.items() if k in _KNOWN_FIELDS}})
        unused = {k: v for k, v in kwargs.items() if k not in _KNOWN_FIELDS}
        return (config, unused) if return_unused_kwargs else config

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not in __dict__: fall back to the parsed config's (version-aware) default.
        if name.startswith("__") or name not in _KNOWN_FIELDS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.sdnq_config, name)

    @property
    def sdnq_config(self) -> QuantConfig:
        """The parsed config (re-read on each access, so later ``update()`` calls are seen)."""
        return QuantConfig.from_dict(self.__dict__)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()
