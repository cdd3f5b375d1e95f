"""Quantized torch layers and the model surgery that installs them."""

from .counting import count_parameters, install_parameter_count
from .model_options import apply_sdnq_options_to_model, enable_quantized_matmul, quantized_matmul_skips
from .modules import (
    SDNQ_CLASSES,
    SDNQConv1d,
    SDNQConv2d,
    SDNQConv3d,
    SDNQConvTranspose1d,
    SDNQConvTranspose2d,
    SDNQConvTranspose3d,
    SDNQEmbedding,
    SDNQLayerMixin,
    SDNQLinear,
    assign_stored_tensor,
    sdnq_class_for,
)
from .replace import (
    dequantize_model,
    plan_model,
    read_checkpoint_headers,
    read_safetensors_header,
    replace_with_sdnq_layers,
    sdnq_layers,
)

__all__ = [
    "SDNQ_CLASSES",
    "SDNQConv1d",
    "SDNQConv2d",
    "SDNQConv3d",
    "SDNQConvTranspose1d",
    "SDNQConvTranspose2d",
    "SDNQConvTranspose3d",
    "SDNQEmbedding",
    "SDNQLayerMixin",
    "SDNQLinear",
    "apply_sdnq_options_to_model",
    "assign_stored_tensor",
    "count_parameters",
    "dequantize_model",
    "enable_quantized_matmul",
    "install_parameter_count",
    "plan_model",
    "quantized_matmul_skips",
    "read_checkpoint_headers",
    "read_safetensors_header",
    "replace_with_sdnq_layers",
    "sdnq_class_for",
    "sdnq_layers",
]
