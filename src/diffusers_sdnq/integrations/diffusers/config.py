"""``SDNQConfig`` for diffusers: the reference's field names, unknown fields kept, JSON round trip."""

from __future__ import annotations

from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin, QuantizationMethod

from ...format.config import QuantConfig


class SDNQDiffusersConfig(QuantizationConfigMixin):
    """diffusers-side view of an SDNQ ``quantization_config``.

    Every field of :class:`~diffusers_sdnq.format.config.QuantConfig` is an attribute; ``to_dict()`` gives
    back what was read (plus defaults), so ``save_pretrained`` writes a config the reference reads.

    Built by a user (``SDNQDiffusersConfig(weights_dtype="uint4")``) it describes a checkpoint to *write*: fields
    not given take the current sdnq defaults and ``sdnq_version`` names the layout written. Read from a file
    (:meth:`from_dict`) an absent field means the default of the release that wrote it.
    """

    def __init__(self, **kwargs: Any) -> None:
        if not kwargs.get("sdnq_version"):
            from ...quantize.model import WRITER_SDNQ_VERSION

            kwargs["sdnq_version"] = WRITER_SDNQ_VERSION
        self._init(kwargs)

    def _init(self, kwargs: dict[str, Any]) -> None:
        parsed = QuantConfig.from_dict(kwargs)
        self.sdnq = parsed
        for key, value in parsed.to_dict().items():
            if key != "quant_method":
                setattr(self, key, value)
        self.quant_method = QuantizationMethod.SDNQ if parsed.quant_method == "sdnq" else parsed.quant_method

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        config = cls.__new__(cls)
        config._init({**config_dict, **kwargs})
        return (config, {}) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        out = self.sdnq.to_dict()
        for key in out:
            if key not in ("quant_method", "is_integer", "is_unsigned") and hasattr(self, key):
                out[key] = getattr(self, key)
        out["quant_method"] = str(getattr(self.quant_method, "value", self.quant_method))
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def quant_config(self) -> QuantConfig:
        """The parsed config, refreshed from attributes a user may have edited."""
        return QuantConfig.from_dict(self.to_dict())
