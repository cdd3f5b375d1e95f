"""Errors of the PEFT integration (no PEFT import, so they can be caught and raised anywhere)."""

from __future__ import annotations


class SDNQAdapterError(ValueError):
    """An adapter configuration or operation that an SDNQ-quantized base layer cannot support."""


class SDNQFuseError(SDNQAdapterError):
    """Fusing (merging) an adapter into an SDNQ layer is not possible for this layer's layout."""


FUSE_ADVICE = (
    "Keep the adapter unfused (it runs next to the quantized weight at full precision, with the same result), "
    "or dequantize the model first (diffusers_sdnq.dequantize_model(model)) and fuse into the dense weights. "
    "Layers fused before this one stay fused until unfuse_lora() / unmerge_adapter(), which restores them exactly; "
    "diffusers_sdnq.integrations.peft.fuse_blockers(model) lists the layers that cannot be fused."
)
