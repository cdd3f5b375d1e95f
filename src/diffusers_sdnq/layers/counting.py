"""Parameter counts of a model with SDNQ layers, in the dense model's terms.

A quantized layer's parameters are its stored tensors (packed codes, scales, ...), so ``sum(p.numel())`` counts
storage elements, not the weights the layer stands for: a uint4 linear of 4096 weights shows 2048 plus its scales.
Both diffusers' and transformers' ``num_parameters()`` sum ``numel()`` over ``named_parameters()`` (transformers
special-cases bitsandbytes 4-bit by the same reasoning), so :func:`install_parameter_count` gives a model with SDNQ
layers a ``num_parameters`` that counts each SDNQ layer's dense weight instead. Memory footprints still count the
stored bytes, which is what they measure.
"""

from __future__ import annotations

import math
import types

from torch import nn

from .modules import SDNQLayerMixin


def count_parameters(model: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """``num_parameters`` of the dense model: SDNQ layers count their dense weight, everything else as usual.

    The stored tensors are frozen, so with ``only_trainable`` a quantized weight counts only if it was unfrozen."""
    layers = {id(m): m for m in model.modules() if isinstance(m, SDNQLayerMixin)}
    stored = {id(t) for m in layers.values() for t in m.sdnq_tensors().values()}
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    total = 0
    for name, param in model.named_parameters():
        if id(param) in stored or (exclude_embeddings and name in embeddings):
            continue
        if param.requires_grad or not only_trainable:
            total += param.numel()
    for layer in layers.values():
        if exclude_embeddings and isinstance(layer, nn.Embedding):
            continue
        weight = layer._parameters.get("weight")
        if not only_trainable or (weight is not None and weight.requires_grad):
            total += math.prod(layer.sdnq_layout.weight_shape)
    return total


def _num_parameters(self: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    return count_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)


def install_parameter_count(model: nn.Module) -> None:
    """Make ``model.num_parameters()`` (diffusers ``ModelMixin``, transformers ``PreTrainedModel``) count dense
    parameters. Idempotent; a bound method on the instance, so ``copy.deepcopy`` rebinds it to the copy."""
    current = model.__dict__.get("num_parameters")
    if isinstance(current, types.MethodType) and current.__func__ is _num_parameters:
        return
    if callable(getattr(type(model), "num_parameters", None)):
        _num_parameters.__doc__ = count_parameters.__doc__
        model.num_parameters = types.MethodType(_num_parameters, model)
