"""Shared pieces of the ported upstream quantization suites (``tests/upstream/test_*_suite.py``).

The upstream suites check their backends mostly for "runs, no NaN" or against output slices recorded on a GPU.
The ports compare instead with computations that do not go through the code under test's forward:

* the **dense twin**: a deep copy of the quantized model whose SDNQ layers are replaced by plain torch layers
  holding the dequantized weights (``dequantize_model``; bit-exact with the reference ``sdnq`` per
  ``tests/test_pipelines.py``), so its forward is stock torch / diffusers / transformers / PEFT code;
* the **dense original**: the unquantized model, which a quantized model must approximate within the
  quantization error of its type (a loose bound, but one the packed codes cannot meet by accident);
* plain float math (byte counts from bits per weight, parameter counts from the dense shapes).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import warnings
from collections.abc import Iterable, Iterator

import pytest
import torch
from torch import nn

import diffusers_sdnq
from diffusers_sdnq.layers import SDNQLayerMixin

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (upstream GPU test)")


def dense_twin(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` with every SDNQ layer replaced by a plain torch layer with the dequantized weight."""
    twin = copy.deepcopy(model)
    diffusers_sdnq.dequantize_model(twin)
    assert not sdnq_layer_names(twin)
    return twin


def sdnq_layer_names(model: nn.Module) -> set[str]:
    """Names of the SDNQ layers of ``model`` (PEFT's ``.base_layer`` dropped, so names match the dense model)."""
    return {n.replace(".base_layer", "") for n, m in model.named_modules() if isinstance(m, SDNQLayerMixin)}


def linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def is_sdnq_quantized(module: nn.Module) -> bool:
    """The SDNQ counterpart of the upstream ``_verify_if_layer_quantized``: an SDNQ layer whose ``weight`` holds
    packed codes (an integer or 8-bit float dtype, not the compute dtype) next to a float ``scale``."""
    if not isinstance(module, SDNQLayerMixin):
        return False
    weight, scale = module._parameters.get("weight"), module._parameters.get("scale")
    packed = weight is not None and (not weight.is_floating_point() or weight.element_size() == 1)
    return packed and scale is not None and scale.is_floating_point()


def stored_bytes(model: nn.Module) -> dict[str, bytes]:
    """Every SDNQ stored tensor's dtype and raw bytes, by name: compare two of these for bit-identity."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SDNQLayerMixin):
            for key, value in module.sdnq_tensors().items():
                t = value.detach().cpu().contiguous()
                clean = name.replace(".base_layer", "").removeprefix("base_model.model.")  # PEFT wrappers
                out[f"{clean}.{key}"] = (str(t.dtype), tuple(t.shape), t.view(torch.uint8).numpy().tobytes())
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def assert_close_to_twin(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """The quantized forward against the dense twin's: the same math up to float rounding (BLAS alignment)."""
    got, want = got.detach().float(), want.detach().float()
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    scale = want.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got, want, atol=atol * scale.item(), rtol=rtol)


def dense_params(model: nn.Module, names: Iterable[str]) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in names)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def expect_warning(pattern: str) -> Iterator[None]:
    """Assert that the block warns with a message matching ``pattern`` (regex), as a ``warnings`` warning or a
    WARNING log record (transformers' and diffusers' backends use either channel)."""
    handler = _Collect()
    loggers = [logging.getLogger(), logging.getLogger("diffusers_sdnq"), logging.getLogger("diffusers"),
               logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages = [str(w.message) for w in caught] + handler.messages
    assert any(re.search(pattern, m) for m in messages), f"no warning matching {pattern!r}; got {messages}"


def assert_within_half_step(layer: SDNQLayerMixin, target: torch.Tensor, where: str) -> None:
    """Round-to-nearest bound of a requantized integer layer: every weight within half a quantization step (its
    group's scale) of ``target`` (e.g. the dense twin's merged weight)."""
    lay = layer.sdnq_layout
    assert not lay.transposed and not lay.svd_rank and lay.dtype.is_integer, where
    got = layer.dequantize_weight(torch.float32)
    err = (got - target.float()).abs().reshape(lay.quantized_shape)
    bound = 0.5 * layer.scale.float().reshape(lay.scale_shape) * (1 + 1e-4) + 1e-6
    assert (err <= bound).all(), f"{where}: max error {err.max():.3g}, max half-step {bound.max():.3g}"


class LoRALayer(nn.Module):
    """The upstream suites' training probe (diffusers' and transformers' bnb ``LoRALayer``): a linear layer plus a
    rank-``rank`` adapter whose second factor starts at zero (test-only)."""

    def __init__(self, module: nn.Module, rank: int):
        super().__init__()
        self.module = module
        self.adapter = nn.Sequential(nn.Linear(module.in_features, rank, bias=False),
                                     nn.Linear(rank, module.out_features, bias=False))
        small_std = (2.0 / (5 * min(module.in_features, module.out_features))) ** 0.5
        nn.init.normal_(self.adapter[0].weight, std=small_std)
        nn.init.zeros_(self.adapter[1].weight)
        self.adapter.to(module.weight.device)

    def forward(self, input, *args, **kwargs):
        return self.module(input, *args, **kwargs) + self.adapter(input)


@pytest.fixture(autouse=True)
def one_thread():
    """Autouse in every suite that imports it: tiny models on one torch thread, as upstream's CPU runners do (many
    small forwards contend less on the 2-core CI machine). Not a conftest.py: a second one would shadow the tests'
    ``conftest`` module that other test files import from."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
