"""The SDNQ config classes: :class:`SDNQConfig` (diffusers and transformers alike, the reference's name and keyword
arguments) and :class:`SDNQDiffusersConfig`, what diffusers' ``"sdnq"`` entry builds from a saved config."""

from __future__ import annotations

from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin, QuantizationMethod

from ...format.config import QuantConfig
from ..config_args import check_keywords


class SDNQDiffusersConfig(QuantizationConfigMixin):
    """diffusers-side view of an SDNQ ``quantization_config``.

    Every field of :class:`~diffusers_sdnq.format.config.QuantConfig` is an attribute; ``to_dict()`` gives
    back what was read (plus defaults), so ``save_pretrained`` writes a config the reference reads.

    Built by a user (``SDNQDiffusersConfig(weights_dtype="uint4")``) it describes a checkpoint to *write*: fields
    not given take the current sdnq defaults and ``sdnq_version`` names the layout written. Read from a file
    (:meth:`from_dict`) an absent field means the default of the release that wrote it.
    """

    def __init__(self, **kwargs: Any) -> None:
        check_keywords(kwargs, type(self).__name__)  # typed in code: a misspelt field is an error
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


class SDNQConfig(SDNQDiffusersConfig):
    """Quantize with SDNQ while loading, in diffusers and in transformers alike.

    The drop-in for the reference's ``SDNQConfig`` (``from sdnq import SDNQConfig`` / ``diffusers.SDNQConfig``):
    the same name and keyword arguments, accepted by a diffusers model's ``from_pretrained(quantization_config=...)``,
    by ``PipelineQuantizationConfig(quant_mapping={...})`` for diffusers and transformers components, and by
    transformers' ``from_pretrained(quantization_config=...)``::

        from diffusers_sdnq import SDNQConfig
        config = SDNQConfig(weights_dtype="uint4", use_svd=True, svd_rank=32)
        transformer = Flux2Transformer2DModel.from_pretrained(repo, subfolder="transformer", quantization_config=config)
        text_encoder = Qwen3ForCausalLM.from_pretrained(repo, subfolder="text_encoder", quantization_config=config)

    Every field of ``quantization_config`` (docs/quantizing.md) is a keyword; a keyword that is not a field raises
    ``TypeError`` naming the closest one. Fields not given take the current sdnq defaults.
    """

    def __init__(self, weights_dtype: str = "int8", group_size: int = 0, use_svd: bool = False, svd_rank: int = 32,
                 use_quantized_matmul: bool = False, modules_to_not_convert: list[str] | None = None,
                 modules_dtype_dict: dict[str, list[str]] | None = None, **kwargs: Any) -> None:
        super().__init__(weights_dtype=weights_dtype, group_size=group_size, use_svd=use_svd, svd_rank=svd_rank,
                         use_quantized_matmul=use_quantized_matmul,
                         modules_to_not_convert=list(modules_to_not_convert or []),
                         modules_dtype_dict=dict(modules_dtype_dict or {}), **kwargs)
