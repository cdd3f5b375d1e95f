"""Fusing adapters into SDNQ layers: dequantize → add the adapter delta → requantize in the layer's own layout.

PEFT's stock ``merge`` does ``base_layer.weight.data += delta``. On an SDNQ layer ``weight`` holds packed integer
codes, so that would either fail on a dtype mismatch or silently turn the checkpoint bytes into noise. The mixin
here replaces merge/unmerge for every PEFT tuner layer we put on an SDNQ base:

* ``merge`` rebuilds the dense weight from the layer's *original* stored tensors, applies every merged adapter in
  merge order (so repeated fuses never compound requantization error), requantizes with the layer's layout and
  swaps in the new tensors. The original tensor objects are kept aside.
* ``unmerge`` puts those original tensor objects back: the packed bytes, scales and bias are restored exactly.
* A layout our writer cannot produce (SVD, Hadamard, codebooks, ... until the writer learns them) raises
  :class:`SDNQFuseError` before anything is changed, saying what to do instead.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...format import codec
from ...layers import SDNQLayerMixin
from .dispatch import install, sdnq_base_of
from .errors import FUSE_ADVICE, SDNQAdapterError, SDNQFuseError

#: Requantizing a layer's own (on-grid) weight must reproduce it within this relative error, else the writer is
#: taken not to support the layout. Integer round-to-nearest reproduces it to ~1e-7; a writer that misreads a
#: layout is off by O(1).
PROBE_TOLERANCE = 0.05


__all__ = ["FUSE_ADVICE", "SDNQAdapterError", "SDNQFuseError", "SDNQMergeMixin", "dense_view", "fuse_blockers",
           "requantize", "sdnq_base_of"]


def dense_view(layer: SDNQLayerMixin, materialize: bool) -> nn.Linear:
    """A plain ``nn.Linear`` that shows PEFT code the dense weight's shape, device and compute dtype.

    With ``materialize=False`` the weight is a zero-stride expanded scalar (no memory): enough for code that only
    reads ``weight.shape``/``device``/``dtype``. With ``materialize=True`` it holds the dequantized weight (DoRA
    needs the values for its column norms). ``bias`` is the layer's own.
    """
    view = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(view)
    view.in_features, view.out_features = layer.in_features, layer.out_features
    shape = tuple(layer.dense_weight_shape)
    if materialize:
        weight = layer.dequantize_weight()
    else:
        weight = torch.zeros((), device=layer.weight.device, dtype=layer.compute_dtype).expand(shape)
    view.weight = nn.Parameter(weight, requires_grad=False)
    view.bias = layer.bias
    return view


def requantize(layer: SDNQLayerMixin, dense: torch.Tensor, where: str) -> dict[str, torch.Tensor]:
    """Stored tensors for ``dense`` in ``layer``'s layout, or :class:`SDNQFuseError` (nothing is modified).

    The writer is asked to requantize the layer's current weight too: a writer that handles the layout gives
    that weight back (it is already on the grid); one that misreads the layout is caught here instead of
    silently writing noise.
    """
    from ...quantize import quantize_weight

    layout = layer.sdnq_layout
    current = layer.dequantize_weight(torch.float32)
    try:
        probe = quantize_weight(current, layout)
        tensors = quantize_weight(dense, layout)
    except NotImplementedError as exc:
        raise SDNQFuseError(f"cannot fuse an adapter into '{where}' ({layer.extra_repr()}): the SDNQ writer "
                            f"cannot write this layout yet. {FUSE_ADVICE}") from exc
    expected = layout.expected_tensors()
    for values in (probe, tensors):
        if set(values) != set(expected):
            raise SDNQFuseError(f"cannot fuse into '{where}': the writer produced {sorted(values)} but the layer "
                                f"stores {sorted(expected)}. {FUSE_ADVICE}")
        for key, spec in expected.items():
            t = values[key]
            ok_dtype = t.dtype in spec.dtypes or (t.is_floating_point() and spec.dtypes[0].is_floating_point)
            if tuple(t.shape) != spec.shape or not ok_dtype:
                raise SDNQFuseError(f"cannot fuse into '{where}': the writer produced '{key}' as "
                                    f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}, the layer stores "
                                    f"{spec.describe()}. {FUSE_ADVICE}")
    back = codec.dequantize(layout, probe, torch.float32)
    err = ((back - current).norm() / current.norm().clamp_min(1e-30)).item()
    if not err <= PROBE_TOLERANCE:
        raise SDNQFuseError(f"cannot fuse into '{where}' ({layer.extra_repr()}): the SDNQ writer does not reproduce "
                            f"this layout (relative error {err:.3g} on the unfused weight). {FUSE_ADVICE}")
    return tensors


class SDNQMergeMixin:
    """merge/unmerge for PEFT tuner layers on an SDNQ base. Comes before the PEFT layer class in the bases.

    Subclasses implement :meth:`_sdnq_apply_adapter` (dense math of one adapter) and may override
    :meth:`_sdnq_merge_bias`.
    """

    _sdnq_original: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ helpers
    def _sdnq_layer(self) -> SDNQLayerMixin:
        base = self.get_base_layer()
        if not isinstance(base, SDNQLayerMixin):  # pragma: no cover - dispatch guarantees it
            raise SDNQAdapterError(f"{type(self).__name__} wraps {type(base).__name__}, not an SDNQ layer")
        return base

    @contextlib.contextmanager
    def _sdnq_dense_base(self, materialize: bool = False) -> Iterator[nn.Linear]:
        """Temporarily show PEFT code a dense ``nn.Linear`` as the base layer (see :func:`dense_view`)."""
        holder = self
        while isinstance(holder.base_layer, BaseTunerLayer):
            holder = holder.base_layer
        real = holder._modules["base_layer"]
        view = dense_view(real, materialize)
        holder._modules["base_layer"] = view
        try:
            yield view
        finally:
            holder._modules["base_layer"] = real

    def _sdnq_adapters_of(self) -> set[str]:
        return set(self._available_adapters)

    def _sdnq_apply_adapter(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """Dense weight after merging adapter ``name`` into ``weight`` (float32); ``original`` = unmerged base."""
        raise NotImplementedError

    def _sdnq_merge_bias(self, name: str, bias: torch.Tensor | None) -> torch.Tensor | None:
        return bias

    # ------------------------------------------------------------------ merge / unmerge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fuse adapters by requantizing ``W + delta`` in the layer's layout; :meth:`unmerge` restores the bytes.

        The result is checked for non-finite values whatever ``safe_merge`` says (it costs nothing here: the dense
        weight is a fresh tensor either way).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        available = self._sdnq_adapters_of()
        new = [name for name in adapter_names if name in available]
        if not new:
            return
        layer = self._sdnq_layer()
        where = getattr(self, "_sdnq_name", None) or type(layer).__name__
        original = self._sdnq_original or {**layer.sdnq_tensors(), "bias": layer.bias}
        stored = {k: v for k, v in original.items() if k != "bias" and v is not None}
        w0 = codec.dequantize(layer.sdnq_layout, stored, torch.float32)
        weight = w0.clone()
        bias = original["bias"].detach().float() if original["bias"] is not None else None
        with torch.no_grad():
            for name in [*self.merged_adapters, *new]:
                weight = self._sdnq_apply_adapter(name, weight, w0)
                bias = self._sdnq_merge_bias(name, bias)
        if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {new[-1]} seems to be broken")
        tensors = requantize(layer, weight, where)
        self._sdnq_original = original
        device = layer.weight.device
        for key, value in tensors.items():
            old = original[key]
            layer._parameters[key] = nn.Parameter(value.to(device=device, dtype=old.dtype), requires_grad=False)
        if bias is not None and original["bias"] is not None:
            old = original["bias"]
            layer._parameters["bias"] = nn.Parameter(bias.to(device=old.device, dtype=old.dtype),
                                                     requires_grad=old.requires_grad)
        self.merged_adapters.extend(new)

    def unmerge(self) -> None:
        """Restore the layer's original stored tensors (the very same tensors, so the bytes are identical)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        layer = self._sdnq_layer()
        device = layer.weight.device
        for key, value in (self._sdnq_original or {}).items():
            if value is None:
                continue
            if value.device != device:
                value = nn.Parameter(value.to(device), requires_grad=value.requires_grad)
            layer._parameters[key] = value
        self._sdnq_original = None
        self.merged_adapters.clear()


def fuse_blockers(model: nn.Module) -> dict[str, str]:
    """``{layer name: reason}`` for every adapter-carrying SDNQ layer that a fuse would refuse (empty: all fuse).

    Lets a caller check a whole model before ``fuse_lora()`` / ``merge_adapter()``, which stop at the first
    layer that cannot be fused.
    """
    blockers = {}
    for name, module in model.named_modules():
        if isinstance(module, SDNQMergeMixin):
            layer = module._sdnq_layer()
            try:
                requantize(layer, layer.dequantize_weight(torch.float32), name)
            except SDNQFuseError as exc:
                blockers[name] = str(exc).split(f". {FUSE_ADVICE}")[0]
    return blockers


# Importing this module may be what imports PEFT, and an import hook may then defer PEFT's set-up until our
# module is complete; installing here (idempotent) makes sure the dispatch is in place whichever way it went.
install()
