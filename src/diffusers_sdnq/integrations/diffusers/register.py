"""Put our config and quantizer into diffusers' auto mappings (replacing the factory that needs ``sdnq``)."""

from __future__ import annotations


def register(sidecar: bool = True) -> None:
    """Idempotent. diffusers reads these dicts at call time, so registering any time before loading works.

    ``sidecar`` also teaches model configs to read ``quantization_config.json`` (it imports diffusers' model
    base class, so the import hook does that step separately, once that module is ready)."""
    from diffusers.quantizers import auto

    from .config import SDNQDiffusersConfig
    from .quantizer import SDNQDiffusersQuantizer

    for method in ("sdnq", "sdnq_training"):
        auto.AUTO_QUANTIZER_MAPPING[method] = SDNQDiffusersQuantizer
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[method] = SDNQDiffusersConfig
    if sidecar:
        from ..sidecar import install_diffusers

        install_diffusers()
