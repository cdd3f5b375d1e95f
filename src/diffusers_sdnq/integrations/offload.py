"""Device maps and SDNQ layers, shared by the diffusers and transformers quantizers: sizing for
``device_map="auto"`` and disk offload (``device_map`` with ``"disk"`` entries).

Sizing: accelerate's planner multiplies each parameter's element count by a byte size. A layer quantized on load
still holds its dense ``weight`` placeholder (so the loader accepts the dense checkpoint tensor) when the plan is
made; :func:`element_sizes` gives the planner the packed size per element instead (and every stored companion's
own size, which accelerate would otherwise clip to ``torch_dtype``'s).

Both libraries write a disk-offloaded parameter into accelerate's offload folder *instead of* assigning it to the
model, and ``dispatch_model`` later gives every offloaded module a hook that reads its tensors back, by name, just
before each forward. Two library steps do not fit SDNQ layers there:

* diffusers casts every floating-point checkpoint tensor to ``torch_dtype`` before offloading it, so float32
  scales of a bfloat16 model would come back rounded (the in-memory path undoes that cast; the disk path cannot),
  and a quantize-on-load layer's dense weight is offloaded as it is, never quantized;
* transformers re-saves a converted tensor only when the conversion was a ``WeightConverter``; a quantize-on-load
  layer's packed ``weight`` keeps the offload index entry that points at the dense checkpoint tensor.

So the quantizers keep those tensors aside while loading (:class:`OffloadStash`) and, once the model is dispatched,
write them into the offload folder with accelerate's own writer, byte for byte, under the index the hooks read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..format.errors import SDNQFormatError


class ElementSize:
    """A dtype stand-in for accelerate's ``special_dtypes``: only its (possibly fractional) ``itemsize`` is read."""

    def __init__(self, itemsize: float) -> None:
        self.itemsize = itemsize

    def __repr__(self) -> str:
        return f"ElementSize({self.itemsize:g})"


def _exact_dtypes() -> dict[float, Any]:
    """Sizes every accelerate release prices exactly, with the dtype it prices them by."""
    from accelerate.utils import CustomDtype

    return {0.125: torch.bool, 0.25: CustomDtype.INT2, 0.5: CustomDtype.INT4, 1.0: torch.uint8, 2.0: torch.int16,
            4.0: torch.int32, 8.0: torch.int64}


@functools.cache
def _reads_itemsize() -> bool:
    from accelerate.utils.modeling import dtype_byte_size

    try:
        return dtype_byte_size(ElementSize(0.375)) == 0.375
    except (ValueError, TypeError, AttributeError):
        return False


def _special_dtype(size: float) -> Any:
    """What to give accelerate for ``size`` bytes per element: an exact dtype when one exists (uint1/2/4/8 codes,
    8/16/32-bit tensors); else :class:`ElementSize`, which accelerate >= 1.16 prices by its ``itemsize``. Older
    releases price only whole bytes by a dtype's name, so there the next larger exact size is used (3, 5, 6 and
    7-bit codes are planned as 4 or 8 bits: the plan keeps a margin instead of overfilling a device)."""
    exact = _exact_dtypes()
    if size in exact:
        return exact[size]
    if _reads_itemsize():
        return ElementSize(size)
    return exact[min(k for k in exact if k >= size)]


def element_sizes(model: nn.Module) -> dict[str, Any]:
    """``{parameter name: dtype}`` for accelerate's ``special_dtypes``: every stored tensor of the model's SDNQ
    layers priced at its stored bytes (a layer to be quantized on load at its packed size)."""
    from ..layers import SDNQLayerMixin
    from .upstream import resolve

    resolve("accelerate.utils.modeling:dtype_byte_size")
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, SDNQLayerMixin):
            for key, param in module.named_parameters(recurse=False):
                if key != "bias":
                    size = module.stored_element_size(key, param)
                    out[f"{name}.{key}" if name else key] = param.dtype if size == param.element_size() \
                        else _special_dtype(size)
    return out


def device_for(device_map: Mapping[str, Any] | None, name: str) -> Any:
    """Where ``device_map`` puts module or parameter ``name``: the entry of its longest dotted prefix (accelerate's
    rule); None when the map does not place it."""
    if not device_map:
        return None
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in device_map:
            return device_map[key]
    return None


def disk_layers(device_map: Mapping[str, Any] | None, names: Iterable[str]) -> set[str]:
    """The layer ``names`` that ``device_map`` offloads to disk."""
    if not isinstance(device_map, Mapping) or "disk" not in {str(v) for v in device_map.values()}:
        return set()
    return {n for n in names if str(device_for(device_map, n)) == "disk"}


class OffloadStash:
    """Tensors of disk-offloaded SDNQ layers held back from the library's offload writer until dispatch."""

    def __init__(self) -> None:
        self.device_map: Mapping[str, Any] | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def record_device_map(self, device_map: Any) -> None:
        """Keep the resolved device map (a dict); strings such as "auto" are resolved later and recorded then."""
        if isinstance(device_map, Mapping):
            self.device_map = device_map

    def on_disk(self, layer_name: str) -> bool:
        return bool(disk_layers(self.device_map, [layer_name]))

    def keep(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.detach().to("cpu")

    def write(self, model: nn.Module) -> None:
        """Write every kept tensor into the offload folder of the hook that serves it; then forget them."""
        if self.tensors:
            write_offloaded(model, self.tensors)
        self.tensors = {}


def _weights_map(module: nn.Module) -> Any:
    hook = getattr(module, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))
    for h in hooks:
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h.weights_map
    return None


def _loader_and_key(model: nn.Module, name: str) -> tuple[Any, str]:
    """accelerate's ``OffloadedWeightsLoader`` that serves parameter ``name`` to its offload hook, and its key there."""
    from .upstream import require_attrs

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    weights_map = _weights_map(module)
    if weights_map is None:
        raise SDNQFormatError(f"'{name}' was offloaded to disk but its module has no accelerate offload hook after "
                              "dispatch; the model cannot read it back")
    require_attrs("accelerate", weights_map, ("dataset", "prefix"), "PrefixedDataset (an offload hook's weights_map)")
    loader = weights_map.dataset
    require_attrs("accelerate", loader, ("index", "save_folder", "state_dict"), "OffloadedWeightsLoader")
    return loader, f"{weights_map.prefix}{leaf}"


def write_offloaded(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Store ``tensors`` (full parameter names) where the offload hooks of ``model`` read them: a ``.dat`` file in
    the offload folder written by accelerate's ``offload_weight`` (which keeps every dtype, bfloat16 and float8
    included) and the matching index entry, in memory and in ``index.json`` when the folder has one."""
    from accelerate.utils import offload_weight, save_offload_index

    from .upstream import check_library

    check_library("accelerate")
    written: dict[str, dict] = {}
    for name, tensor in tensors.items():
        loader, key = _loader_and_key(model, name)
        folder = loader.save_folder
        if folder is None:
            raise SDNQFormatError(f"'{name}' is offloaded to disk but the model has no offload folder; pass "
                                  "offload_folder=... to from_pretrained")
        loader.state_dict.pop(key, None)
        offload_weight(tensor, key, folder, loader.index)
        written.setdefault(folder, {})[key] = loader.index[key]
    for folder, entries in written.items():
        if os.path.isfile(os.path.join(folder, "index.json")):
            save_offload_index(entries, folder)
