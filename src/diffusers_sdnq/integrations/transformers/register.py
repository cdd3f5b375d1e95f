"""Point transformers' "sdnq" / "sdnq_training" quantization methods at our classes.

transformers 5.24 reads ``transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` and
``AUTO_QUANTIZATION_CONFIG_MAPPING`` (module globals, plain dicts) at each ``from_pretrained`` call, so
overwriting the entries is enough. ``register_quantizer`` / ``register_quantization_config`` refuse an
existing name, so they are not used. The GPL ``sdnq`` package assigns the same entries when it is imported;
to win whichever is imported first, :func:`register` (with ``pin=True``) swaps both globals for a dict
subclass that keeps our classes for these two names when someone else assigns them later.
"""

from __future__ import annotations

import logging

from ..config_args import is_from_reference, note_other_implementation, reference_imported

logger = logging.getLogger("diffusers_sdnq")

METHODS = ("sdnq", "sdnq_training")


class _PinnedMapping(dict):
    """A dict that keeps ``pinned`` values for their keys; every other key behaves normally."""

    def __init__(self, data, pinned):
        super().__init__(data)
        self.pinned = dict(pinned)
        super().update(self.pinned)

    def __setitem__(self, key, value):
        if key in self.pinned and value is not self.pinned[key]:
            logger.info("diffusers-sdnq keeps its %r entry; ignoring %r", key, value)
            if is_from_reference(value):
                note_other_implementation("the sdnq package tried to register itself in transformers after it")
            return
        super().__setitem__(key, value)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]


def register(pin: bool = True, sidecar: bool = True) -> None:
    """Make transformers load SDNQ checkpoints with diffusers-sdnq. Idempotent.

    Existing "sdnq" / "sdnq_training" entries (e.g. from the ``sdnq`` package) are overwritten. With ``pin``
    (the default) later assignments to those two entries are ignored, so importing ``sdnq`` afterwards does
    not take them back; ``pin=False`` just overwrites.
    """
    from transformers.quantizers import auto

    from ..upstream import resolve
    from .config import SDNQTransformersConfig
    from .quantizer import SDNQHfQuantizer

    for attr, cls in (("AUTO_QUANTIZER_MAPPING", SDNQHfQuantizer),
                      ("AUTO_QUANTIZATION_CONFIG_MAPPING", SDNQTransformersConfig)):
        mapping = resolve(f"transformers.quantizers.auto:{attr}")
        ours = dict.fromkeys(METHODS, cls)
        if pin:
            if isinstance(mapping, _PinnedMapping):
                mapping.pinned.update(ours)
                dict.update(mapping, ours)
            else:
                setattr(auto, attr, _PinnedMapping(mapping, ours))
        else:
            dict.update(mapping, ours)
    if reference_imported():
        note_other_implementation("the sdnq package was imported before it registered")
    from ...quantize import register_config_attacher

    register_config_attacher(attach_config)
    if sidecar:  # configs read quantization_config.json too (the import hook does this step separately)
        from ..sidecar import install_transformers

        install_transformers()


def is_registered() -> bool:
    """True when both transformers mappings route "sdnq" and "sdnq_training" to diffusers-sdnq."""
    from transformers.quantizers import auto

    from .config import SDNQTransformersConfig
    from .quantizer import SDNQHfQuantizer

    return all(auto.AUTO_QUANTIZER_MAPPING.get(m) is SDNQHfQuantizer
               and auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(m) is SDNQTransformersConfig for m in METHODS)


def attach_config(model, data: dict) -> bool:
    """The writer's final config into a transformers model's config (what ``save_pretrained`` writes)."""
    from transformers import PreTrainedModel

    from .config import SDNQTransformersConfig

    if not isinstance(model, PreTrainedModel):
        return False
    model.config.quantization_config = SDNQTransformersConfig.from_dict(data)
    return True
