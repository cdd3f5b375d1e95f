"""Put our config and quantizer into diffusers' auto mappings (replacing the factory that needs ``sdnq``)."""

from __future__ import annotations


def register(sidecar: bool = True) -> None:
    """Idempotent. diffusers reads these dicts at call time, so registering any time before loading works.

    ``sidecar`` also teaches model configs to read ``quantization_config.json`` (it imports diffusers' model
    base class, so the import hook does that step separately, once that module is ready)."""
    from ..config_args import note_other_implementation, reference_imported
    from ..upstream import resolve
    from .config import SDNQDiffusersConfig
    from .quantizer import SDNQDiffusersQuantizer

    quantizers = resolve("diffusers.quantizers.auto:AUTO_QUANTIZER_MAPPING")
    configs = resolve("diffusers.quantizers.auto:AUTO_QUANTIZATION_CONFIG_MAPPING")
    for method in ("sdnq", "sdnq_training"):
        quantizers[method] = SDNQDiffusersQuantizer
        configs[method] = SDNQDiffusersConfig
    if reference_imported():
        note_other_implementation("the sdnq package was imported before it registered")
    from ...quantize import register_config_attacher

    register_config_attacher(attach_config)
    if sidecar:
        from ..sidecar import install_diffusers

        install_diffusers()


def attach_config(model, data: dict) -> bool:
    """The writer's final config into a diffusers model's config (what ``save_pretrained`` writes)."""
    from diffusers.models.modeling_utils import ModelMixin

    from .config import SDNQDiffusersConfig

    if not isinstance(model, ModelMixin):
        return False
    model.register_to_config(quantization_config=SDNQDiffusersConfig.from_dict(data))
    return True
