"""Quantized layers: plain torch modules whose parameters are the stored SDNQ tensors, under the stored names.

Because the parameters *are* the checkpoint tensors (``weight`` packed, ``scale``, ``zero_point``, ``svd_up``,
``svd_down``, ...), a checkpoint's state dict loads into these layers unchanged and ``state_dict()`` writes it
back unchanged. The packed ``weight`` keeps its integer dtype through ``.to(dtype)``, and so do the float
companions (their dtype is part of the format: the reference's rounding depends on it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..format.errors import SDNQShapeError
from ..format.layout import LayerLayout
from ..format.layout import companion_dtype as format_companion_dtype
from . import qmatmul
from .forward import _compiling, _options, compiled_dense_weight, dense_weight, linear_forward, use_quantized_matmul

FLOAT_COMPANIONS = ("scale", "zero_point", "svd_up", "svd_down", "scale_2", "scale_zero_point",
                    "zero_point_scale", "zero_point_2")


class SDNQLayerMixin:
    """Behaviour shared by every quantized layer. It must come before the torch class in the bases."""

    sdnq_layout: LayerLayout
    compute_dtype: torch.dtype
    """The dtype activations and the dequantized weight use (the model's torch_dtype at load)."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, module: nn.Module, layout: LayerLayout, compute_dtype: torch.dtype,
                    companion_dtype: torch.dtype | None = None) -> SDNQLayerMixin:
        """Build the quantized twin of a (usually meta) dense ``module``: same hyper-parameters, same bias,
        and empty parameters of the stored shapes/dtypes on the module's device. No weight is read."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key, value in module.__dict__.items():
            if key not in ("_parameters", "_buffers", "_modules", "training"):
                new.__dict__.setdefault(key, value)
        new.training = module.training
        bias = module._parameters.get("bias")
        device = module.weight.device
        new.sdnq_layout = layout
        new.compute_dtype = compute_dtype
        companions = companion_dtype or format_companion_dtype(layout.dtype, layout.options.dequantize_fp32,
                                                               compute_dtype)
        for name, spec in layout.expected_tensors().items():
            dtype = spec.dtypes[0]
            if dtype.is_floating_point and len(spec.dtypes) > 1:
                # The reference keeps the SVD factors in the model dtype even with dequantize_fp32 (observed
                # with sdnq 0.2.8 from_pretrained and load_sdnq_model); scales / zero points follow companions.
                dtype = compute_dtype if name in ("svd_up", "svd_down") and companion_dtype is None else companions
            new.register_parameter(name, nn.Parameter(torch.empty(spec.shape, dtype=dtype, device=device),
                                                      requires_grad=False))
        new.register_parameter("bias", bias)
        return new

    # ------------------------------------------------------------------ access
    def sdnq_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors of this layer (``bias`` excluded), by their stored names."""
        return {k: v for k, v in self._parameters.items() if v is not None and k != "bias"}

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight, bit-exact with the reference's dequantization. Result has no grad history.

        Decoded by the Triton kernels on CUDA and the compiled decoder on CPU where they apply (both checked
        bit-exact with the codec), else by the torch codec; under torch.compile through the decode operator."""
        with torch.no_grad():
            dtype = dtype or self.compute_dtype
            if _compiling():
                return compiled_dense_weight(self, dtype)
            return dense_weight(self.sdnq_layout, self.sdnq_tensors(), dtype)

    @property
    def dense_weight_shape(self) -> torch.Size:
        return torch.Size(self.sdnq_layout.weight_shape)

    @property
    def sdnq_dequantizer(self) -> SDNQDequantizerView:
        """What code written for the reference ``sdnq`` reads from a quantized layer: tools and tests find SDNQ
        layers with ``hasattr(module, "sdnq_dequantizer")`` and read ``original_shape`` / ``weights_dtype`` from
        it (LoRA shape checks, parameter counts). A read-only view of this layer's layout."""
        return SDNQDequantizerView(self)

    def stored_element_size(self, name: str, tensor: torch.Tensor) -> float:
        """Bytes per element that parameter ``name`` (``tensor``) takes once the layer holds its stored tensors.

        That is the tensor's own element size, except for the dense ``weight`` placeholder of a layer still
        waiting to be quantized on load: it will be replaced by the packed weight, so its size is the packed bytes
        spread over the dense elements (0.5 for uint4). Device-map planners size layers with it."""
        if name == "weight" and tensor.numel():
            spec = self.sdnq_layout.expected_tensors()["weight"]
            if tensor.dtype not in spec.dtypes:  # a dense placeholder
                packed = math.prod(spec.shape) * spec.dtypes[0].itemsize
                return packed / tensor.numel()
        return tensor.element_size()

    def dense_parameter_count(self) -> int:
        """Parameters of the dense layer this one stands for (weight and bias), not of the stored tensors."""
        bias = self._parameters.get("bias")
        return math.prod(self.sdnq_layout.weight_shape) + (bias.numel() if bias is not None else 0)

    def dequantize(self) -> nn.Module:
        """A plain torch layer (the original class) with the dequantized weight."""
        base = self.__class__.__mro__[2]
        plain = base.__new__(base)
        nn.Module.__init__(plain)
        for key, value in self.__dict__.items():
            if key not in ("_parameters", "_buffers", "_modules", "training", "sdnq_layout", "compute_dtype",
                           "sdnq_forward_options", "_sdnq_dense_cache", "_sdnq_qmm_cache",
                           "_sdnq_qmm_eligible"):
                plain.__dict__.setdefault(key, value)
        plain.training = self.training
        plain.weight = nn.Parameter(self.dequantize_weight(), requires_grad=False)
        plain.bias = self.bias
        return plain

    # ------------------------------------------------------------------ dtype guard
    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - torch API
        """Moves follow ``fn``; dtype casts apply to ``bias`` and to ``compute_dtype``, stored tensors keep theirs.

        ``compute_dtype`` follows a cast (``model.to(torch.bfloat16)``, ``.half()``) like a dense layer's weight
        would: ``dequantize_weight()`` / ``dequantize()`` then give the model's new dtype, so a dequantized model
        is not left with float32 layers inside a bfloat16 model.
        """
        for name, param in list(self._parameters.items()):
            if param is None:
                continue
            moved = fn(param)
            if name != "bias" and moved.dtype != param.dtype:
                moved = param.to(device=moved.device)
            if moved is not param:
                self._parameters[name] = nn.Parameter(moved, requires_grad=param.requires_grad)
        compute = getattr(self, "compute_dtype", None)
        if compute is not None:
            cast = fn(torch.empty(0, dtype=compute)).dtype  # what fn does to a floating tensor: a cast or not
            if cast.is_floating_point and cast != compute:
                self.compute_dtype = cast
        return self

    def extra_repr(self) -> str:  # noqa: D401 - torch API
        lay = self.sdnq_layout
        bits = [f"{lay.dtype.name}", f"weight={list(lay.weight_shape)}"]
        if lay.group_size > 0:
            bits.append(f"group_size={lay.group_size}")
        if lay.svd_rank:
            bits.append(f"svd_rank={lay.svd_rank}")
        if lay.hadamard_size:
            bits.append(f"hadamard={lay.hadamard_size}")
        if lay.codebook:
            bits.append("codebook")
        return ", ".join(bits)


class SDNQDequantizerView:
    """``layer.sdnq_dequantizer``: the reference's attribute names over one layer's :class:`LayerLayout`.

    Calling it with the stored tensors (``weight, scale, zero_point, svd_up, svd_down``, as the reference's layers
    pass them) returns the dense weight, decoded by this package's codec in :attr:`result_dtype`."""

    def __init__(self, layer: SDNQLayerMixin) -> None:
        self._layer = layer
        layout = layer.sdnq_layout
        self.weights_dtype: str = layout.dtype.name
        self.original_shape = torch.Size(layout.weight_shape)
        self.result_shape = torch.Size(layout.weight_shape)
        self.quantized_weight_shape = torch.Size(layout.quantized_shape)
        self.result_dtype: torch.dtype = layer.compute_dtype
        self.group_size: int = layout.group_size
        self.svd_rank: int = layout.svd_rank
        self.use_quantized_matmul: bool = bool(layout.options.use_quantized_matmul)

    def __call__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
                 svd_up: torch.Tensor | None = None, svd_down: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None, **_ignored: object) -> torch.Tensor:
        tensors = dict(self._layer.sdnq_tensors())
        given = {"weight": weight, "scale": scale, "zero_point": zero_point, "svd_up": svd_up, "svd_down": svd_down}
        tensors.update({k: v for k, v in given.items() if v is not None})
        with torch.no_grad():
            return dense_weight(self._layer.sdnq_layout, tensors, dtype or self.result_dtype)

    def __repr__(self) -> str:
        return (f"SDNQDequantizerView(weights_dtype={self.weights_dtype!r}, original_shape={tuple(self.original_shape)}, "
                f"group_size={self.group_size}, svd_rank={self.svd_rank})")


class SDNQLinear(SDNQLayerMixin, nn.Linear):
    """``nn.Linear`` whose weight is stored SDNQ-quantized."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # == F.linear(x, self.dequantize_weight(x.dtype), bias), decoded block by block (see layers/forward.py)
        return linear_forward(self, x)


class SDNQEmbedding(SDNQLayerMixin, nn.Embedding):
    """``nn.Embedding`` with a quantized table."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dequantize_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


def _conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    opts = _options(self)
    if use_quantized_matmul(self, x, opts, 0):  # convolutions take the quantized matmul for any number of patches
        return qmatmul.conv(self, x, opts.quantized_matmul_cache)
    weight = self.dequantize_weight(x.dtype if x.is_floating_point() else None)
    bias = self.bias.to(weight.dtype) if self.bias is not None else None
    return self._conv_forward(x.to(weight.dtype), weight, bias)


def _conv_transpose_forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
    weight = self.dequantize_weight(x.dtype if x.is_floating_point() else None)
    bias = self.bias.to(weight.dtype) if self.bias is not None else None
    dims = len(self.kernel_size)
    output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, dims,
                                          self.dilation)
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    return fn(x.to(weight.dtype), weight, bias, self.stride, self.padding, output_padding, self.groups,
              self.dilation)


class SDNQConv1d(SDNQLayerMixin, nn.Conv1d):
    forward = _conv_forward


class SDNQConv2d(SDNQLayerMixin, nn.Conv2d):
    forward = _conv_forward


class SDNQConv3d(SDNQLayerMixin, nn.Conv3d):
    forward = _conv_forward


class SDNQConvTranspose1d(SDNQLayerMixin, nn.ConvTranspose1d):
    forward = _conv_transpose_forward


class SDNQConvTranspose2d(SDNQLayerMixin, nn.ConvTranspose2d):
    forward = _conv_transpose_forward


class SDNQConvTranspose3d(SDNQLayerMixin, nn.ConvTranspose3d):
    forward = _conv_transpose_forward


SDNQ_CLASSES: dict[type[nn.Module], type[SDNQLayerMixin]] = {
    nn.Linear: SDNQLinear,
    nn.Embedding: SDNQEmbedding,
    nn.Conv1d: SDNQConv1d,
    nn.Conv2d: SDNQConv2d,
    nn.Conv3d: SDNQConv3d,
    nn.ConvTranspose1d: SDNQConvTranspose1d,
    nn.ConvTranspose2d: SDNQConvTranspose2d,
    nn.ConvTranspose3d: SDNQConvTranspose3d,
}


def sdnq_class_for(module: nn.Module) -> type[SDNQLayerMixin] | None:
    """The quantized class for a dense module (subclasses of the torch layers count, e.g. scaled embeddings)."""
    for base, cls in SDNQ_CLASSES.items():
        if type(module) is base:
            return cls
    for base, cls in SDNQ_CLASSES.items():
        if isinstance(module, base) and not isinstance(module, SDNQLayerMixin):
            return cls
    return None


def assign_stored_tensor(module: SDNQLayerMixin, name: str, value: torch.Tensor,
                         device: torch.device | str | int | None = None, *, full_name: str | None = None) -> None:
    """Put one checkpoint tensor into a quantized layer, validated, without any lossy cast.

    Float companions take the dtype the layer declared (float32 when the config says ``dequantize_fp32``,
    which is how the reference promotes them on load); packed codes keep their bits (uint1 stored as int64
    becomes uint8). Shape mismatches raise naming the tensor.
    """
    label = full_name or name
    current = module._parameters.get(name)
    if current is None and name not in module._parameters:
        raise SDNQShapeError(f"unexpected tensor '{label}': a {module.sdnq_layout.dtype.name} layer does not "
                             f"store '{name}'")
    if name == "bias":
        target_dtype = current.dtype if current is not None else value.dtype
    else:
        spec = module.sdnq_layout.expected_tensors()[name]
        if tuple(value.shape) != spec.shape or value.dtype not in spec.dtypes:
            raise SDNQShapeError(f"'{label}' is {str(value.dtype).replace('torch.', '')} {list(value.shape)}, "
                                 f"expected {spec.describe()}")
        target_dtype = current.dtype if value.dtype.is_floating_point and current.dtype.is_floating_point \
            and len(spec.dtypes) > 1 else value.dtype
        if value.dtype == torch.int64:  # uint1 bytes widened by the reference's packer
            target_dtype = torch.uint8
    if device is None:
        device = current.device if current is not None and current.device.type != "meta" else "cpu"
    tensor = value.to(device=device, dtype=target_dtype)
    module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
