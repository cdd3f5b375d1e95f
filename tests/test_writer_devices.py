"""Where the writer quantizes (``quantization_device``) and where it keeps the result (``return_device``), and its
progress bar.

Without a GPU the routing is proved with the ``meta`` device: results sent there must end up there, and a spy in
place of the per-layer quantizer records the device each dense weight reached it on (it quantizes the original CPU
weight, so the outputs can be compared with a plain CPU run). The GPU tests compare quantizing on CUDA with
quantizing on CPU, bit for bit where the math allows it (everything but SVD, Hadamard, codebooks; see
docs/quantizing.md).
"""

from __future__ import annotations

import json
from collections import deque

import pytest
import torch
from torch import nn
from writer_models import WriterToy, init_weights

from diffusers_sdnq.integrations.diffusers import SDNQDiffusersConfig
from diffusers_sdnq.layers import SDNQLayerMixin
from diffusers_sdnq.quantize import model as qmodel
from diffusers_sdnq.quantize import quantize_model


def _toy() -> WriterToy:
    return init_weights(WriterToy())


def _stored(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, m in model.named_modules() if isinstance(m, SDNQLayerMixin)
            for k, v in m._parameters.items() if v is not None}


def test_return_device_keeps_the_quantized_layers_there() -> None:
    model = quantize_model(_toy(), weights_dtype="uint4", return_device="meta", progress=False)
    stored = _stored(model)
    assert stored and all(t.device.type == "meta" for t in stored.values()), \
        {k: t.device for k, t in stored.items() if t.device.type != "meta"}
    assert any(k.endswith(".bias") for k in stored)  # the layer's bias moves with it
    dense = [p for n, m in model.named_modules() if not isinstance(m, SDNQLayerMixin)
             for p in m.parameters(recurse=False)]
    assert dense and all(p.device.type == "cpu" for p in dense)  # layers left dense stay where they were


def _spy(monkeypatch: pytest.MonkeyPatch) -> tuple[list[torch.device], deque]:
    """Replace the per-layer quantizer: record the device of each dense weight it receives, quantize the matching
    original CPU weight (queued in the writer's order) instead."""
    real = qmodel.quantize_weight
    seen: list[torch.device] = []
    originals: deque[torch.Tensor] = deque()

    def fake(weight: torch.Tensor, layout, **kw):
        seen.append(weight.device)
        original = originals.popleft()
        assert original.shape == weight.shape
        return real(original, layout, **kw)

    monkeypatch.setattr(qmodel, "quantize_weight", fake)
    return seen, originals


def test_quantization_device_is_where_each_layer_is_quantized(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = quantize_model(_toy(), weights_dtype="uint4", group_size=32, progress=False)
    seen, originals = _spy(monkeypatch)
    model = _toy()
    plans = qmodel.plan_quantization(model, qmodel.writer_config(weights_dtype="uint4", group_size=32))
    originals.extend(model.get_submodule(name).weight.detach().clone() for name in plans)
    quantize_model(model, weights_dtype="uint4", group_size=32, quantization_device="meta", progress=False)
    assert len(seen) == len(plans) and all(d.type == "meta" for d in seen)
    got, expected = _stored(model), _stored(reference)
    assert got.keys() == expected.keys()
    for key, value in got.items():  # back on the CPU, where the dense weights were
        assert value.device.type == "cpu" and torch.equal(value, expected[key]), key


def test_loader_hook_follows_return_device() -> None:
    """quantize_into (the diffusers loader's hook): the stored tensors and the bias go to return_device, not to
    the loader's target device."""
    from diffusers_sdnq.quantize import QuantizeSession, prepare_model_for_quantization, quantize_into, writer_config

    model = _toy()
    weights = {n: (m.weight.detach().clone(), m.bias.detach().clone() if m.bias is not None else None)
               for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    config = writer_config(weights_dtype="int8", return_device="meta")
    skeleton = WriterToy()
    plans = prepare_model_for_quantization(skeleton, config)
    session = QuantizeSession(config, plans, torch.float32, progress=False)
    name = next(n for n in plans if weights.get(n, (None, None))[1] is not None)
    layer = skeleton.get_submodule(name)
    assert quantize_into(layer, "weight", weights[name][0], "cpu", session=session, module_name=name)
    quantize_into(layer, "bias", weights[name][1], "cpu", session=session, module_name=name)
    assert all(p.device.type == "meta" for p in layer._parameters.values() if p is not None)


def test_devices_given_as_torch_devices_serialize() -> None:
    config = SDNQDiffusersConfig(weights_dtype="uint4", quantization_device=torch.device("cuda", 1), return_device=0)
    data = config.to_dict()
    assert data["quantization_device"] == "cuda:1" and data["return_device"] == "cuda:0"
    json.dumps(data)


class _Bars:
    """Stands in for tqdm: records each bar's arguments and progress."""

    def __init__(self) -> None:
        self.bars: list[dict] = []

    def __call__(self, *args, **kwargs):
        record = {"kwargs": kwargs, "updates": 0, "postfix": []}
        self.bars.append(record)

        class Bar:
            def update(self, n=1):
                record["updates"] += n

            def set_postfix_str(self, s, refresh=True):
                record["postfix"].append(s)

            def close(self):
                record["closed"] = True

        return Bar()


@pytest.mark.parametrize("switch", ["none", "hub", "diffusers", "transformers"])
def test_progress_bar_per_layer_and_the_libraries_switches(monkeypatch: pytest.MonkeyPatch, switch: str) -> None:
    import diffusers.utils.logging as dlog
    import huggingface_hub.utils as hub
    import tqdm.auto
    import transformers.utils.logging as tlog

    bars = _Bars()
    monkeypatch.setattr(tqdm.auto, "tqdm", bars)
    try:
        if switch == "hub":
            hub.disable_progress_bars()
        elif switch == "diffusers":
            dlog.disable_progress_bar()
        elif switch == "transformers":
            monkeypatch.setattr(tlog, "_tqdm_active", False)  # what disable_progress_bar() sets (without the hub)
        model = quantize_model(_toy(), weights_dtype="int8")
    finally:
        hub.enable_progress_bars()
        dlog.enable_progress_bar()
    layers = [n for n, m in model.named_modules() if isinstance(m, SDNQLayerMixin)]
    (bar,) = bars.bars
    assert bar["kwargs"]["unit"] == "layer" and bar["kwargs"]["total"] == len(layers) == bar["updates"]
    assert bar["postfix"] == layers and bar.get("closed")
    assert bar["kwargs"]["disable"] is (switch != "none")


# -------------------------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("options", [{"weights_dtype": "uint4"}, {"weights_dtype": "int8"},
                                     {"weights_dtype": "uint3", "group_size": 32},
                                     {"weights_dtype": "float8_e4m3fn"}, {"weights_dtype": "float5_e2m2fn"}])
def test_cuda_quantization_equals_cpu_bit_for_bit(options: dict) -> None:
    """Scales (max / range), division and round-half-even are exact on both devices: same bytes."""
    cpu = quantize_model(_toy(), progress=False, **options)
    gpu = quantize_model(_toy(), quantization_device="cuda", progress=False, **options)
    got, expected = _stored(gpu), _stored(cpu)
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert value.device.type == "cpu" and torch.equal(value, expected[key]), key


@needs_cuda
def test_cuda_quantization_with_svd_is_close_and_return_device_cuda() -> None:
    """SVD factors come from QR/SVD factorizations that round differently on a GPU: close, not equal."""
    cpu = quantize_model(_toy(), weights_dtype="uint4", use_svd=True, svd_rank=8, progress=False)
    gpu = quantize_model(_toy(), weights_dtype="uint4", use_svd=True, svd_rank=8, quantization_device="cuda",
                         return_device="cuda", progress=False)
    assert all(t.device.type == "cuda" for t in _stored(gpu).values())
    for (name, a), b in zip(((n, m) for n, m in cpu.named_modules() if isinstance(m, SDNQLayerMixin)),
                            (m for m in gpu.modules() if isinstance(m, SDNQLayerMixin))):
        wa, wb = a.dequantize_weight(), b.dequantize_weight().cpu()
        assert ((wa - wb).norm() / wa.norm()) < 2e-2, name
