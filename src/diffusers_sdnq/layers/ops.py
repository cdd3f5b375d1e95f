"""The decoders as torch operators, so that ``torch.compile`` keeps them instead of tracing around them.

The compiled CPU decoder (:mod:`.native`) is a foreign call and the Triton kernels (:mod:`.triton_decode`) are
launched from Python: the compiler can trace neither, and without these operators it fell back to tracing the
pure-torch codec (1.8-2.1x slower than the eager forward on CPU). Registered with ``torch.library`` (a fake
implementation tells the compiler the output's shape and dtype), they stay opaque calls in the compiled graph:

* ``diffusers_sdnq::dequantize(stored, key, dtype, svd)`` -> the layer's dense weight (Triton on CUDA, the
  compiled decoder on CPU, the torch codec elsewhere; bit-identical to ``dequantize_weight()``);
* ``diffusers_sdnq::linear(x, stored, bias, key)`` -> the block-wise CPU forward of :mod:`.forward` (decode a
  block, multiply it while it is in cache), exactly as the eager forward computes it.

``stored`` are the layer's stored tensors; ``key`` names the layer's layout, tensor names and forward options in a
process-wide registry (:func:`layer_key`). The key is computed when the compiler traces the layer (the function
runs for real then, its result becomes a constant of the graph) and is derived from the layout's contents, so equal
layers share it (and one compiled graph: repeated transformer blocks compile once) and it is the same in every
process.
"""

import hashlib
import threading
from collections.abc import Sequence

import torch

from ..format.layout import LayerLayout

_LOCK = threading.Lock()
_REGISTRY: dict[str, tuple[LayerLayout, tuple[str, ...], object]] = {}


@torch.compiler.assume_constant_result
def layer_key(layout_fields: tuple, names: tuple[str, ...], option_fields: tuple) -> str:
    """A stable name for (layout, stored tensor names, forward options), registered for the operators.

    Called while the compiler traces a layer, with plain values only (:func:`.forward.op_key` flattens the layout
    and options; weight types by name): the compiler then guards on those values, so every layer of the same shape
    and type shares one compiled graph (an object argument would be guarded by identity: one graph per layer)."""
    text = repr((layout_fields, names, option_fields))
    key = "sdnq_" + hashlib.sha1(text.encode()).hexdigest()[:20]
    if key not in _REGISTRY:
        from ..format.dtypes import get_dtype
        from .forward import ForwardOptions

        values = {name: (get_dtype(value[1]) if isinstance(value, tuple) and value[:1] == ("qdtype",) else value)
                  for name, value in layout_fields}
        options = ForwardOptions(**dict(option_fields)) if option_fields else None
        with _LOCK:
            _REGISTRY.setdefault(key, (LayerLayout(**values), tuple(names), options))
    return key


def lookup(key: str) -> tuple[LayerLayout, tuple[str, ...], object]:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise RuntimeError(f"diffusers_sdnq operator called with unknown layer key {key!r}: keys are made by "
                           "layer_key() when a quantized layer is traced in this process") from None


def _fresh(result: torch.Tensor, inputs: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Operator outputs must not alias inputs (a native weight already in the output dtype is returned as is)."""
    ptr = result.untyped_storage().data_ptr()
    if any(t is not None and t.untyped_storage().data_ptr() == ptr for t in inputs):
        return result.clone()
    return result


@torch.library.custom_op("diffusers_sdnq::dequantize", mutates_args=(),
                         schema="(Tensor[] stored, str key, ScalarType dtype, bool svd) -> Tensor")
def dequantize(stored: list[torch.Tensor], key: str, dtype: torch.dtype, svd: bool) -> torch.Tensor:
    from .forward import dense_weight

    layout, names, _ = lookup(key)
    with torch.no_grad():
        return _fresh(dense_weight(layout, dict(zip(names, stored)), dtype, svd=svd).contiguous(), stored)


@dequantize.register_fake
def _dequantize_fake(stored: list[torch.Tensor], key: str, dtype: torch.dtype, svd: bool) -> torch.Tensor:
    layout = lookup(key)[0]
    return stored[0].new_empty(layout.weight_shape, dtype=dtype)


@torch.library.custom_op("diffusers_sdnq::linear", mutates_args=(),
                         schema="(Tensor x, Tensor[] stored, Tensor? bias, str key) -> Tensor")
def linear(x: torch.Tensor, stored: list[torch.Tensor], bias: torch.Tensor | None, key: str) -> torch.Tensor:
    from .forward import eager_linear

    layout, names, options = lookup(key)
    with torch.no_grad():
        return _fresh(eager_linear(layout, dict(zip(names, stored)), x, bias, options), [x, bias, *stored])


@linear.register_fake
def _linear_fake(x: torch.Tensor, stored: list[torch.Tensor], bias: torch.Tensor | None, key: str) -> torch.Tensor:
    layout = lookup(key)[0]
    return x.new_empty(*x.shape[:-1], layout.weight_shape[0])
