"""The block-wise forward of quantized linears (``layers/forward.py``).

Oracles: the reference's own dequantized weight and forward output from the conformance matrix (written by
``sdnq`` in a child process), and ``F.linear`` on our bit-exact ``dequantize_weight()``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import oracle_matrix
from safetensors.torch import load_file

from diffusers_sdnq.format import check_stored, dequantize, plan_layer
from diffusers_sdnq.format.config import QuantConfig
from diffusers_sdnq.layers import SDNQLinear, assign_stored_tensor
from diffusers_sdnq.layers import forward as fwd
from diffusers_sdnq.quantize import quantize_weight

ROOT, INDEX = oracle_matrix()


def _linear_cases() -> list[str]:
    out = []
    for case in INDEX["cases"]:
        meta = json.loads((ROOT / f"{case}.json").read_text())
        if meta["layer"]["class_name"] == "Linear":
            out.append(case)
    return out


LINEAR_CASES = _linear_cases()


def _load_case(case: str):
    meta = json.loads((ROOT / f"{case}.json").read_text())
    layer = meta["layer"]
    config = QuantConfig.from_dict(meta["quantization_config"])
    in_features, out_features = layer["args"][:2]
    layout = plan_layer("linear", (out_features, in_features), config.options_for(layer["param_name"], "linear"))
    stored = load_file(ROOT / f"{case}.safetensors")
    tensors = {k: v for k, v in stored.items() if k != "bias"}
    layout = check_stored(layout, tensors, prefix="layer.")
    return meta, layout, stored, load_file(ROOT / f"{case}.expected.safetensors")


def _layer(layout, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> SDNQLinear:
    out_features, in_features = layout.weight_shape
    with torch.device("meta"):
        dense = torch.nn.Linear(in_features, out_features, bias="bias" in stored)
    layer = SDNQLinear.from_module(dense, layout, dtype)
    for name, value in stored.items():
        assign_stored_tensor(layer, name, value)  # validates shapes and dtypes
        # then the exact stored tensor: the oracle files keep the reference's companion dtypes as they are
        layer._parameters[name] = torch.nn.Parameter(value.to(dtype) if name == "bias" else value,
                                                     requires_grad=False)
    return layer


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 16 rows, so that the small matrix layers are split into several blocks (MKL sums thinner
    products, e.g. the rank-32 SVD term of a single row, in another order)."""
    monkeypatch.setattr(fwd, "MIN_ROWS", 16)


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_row_blocks_decode_the_reference_weight(case: str, small_blocks: None) -> None:
    """Rows decoded block by block, at every alignment the format allows, equal the reference's dense weight."""
    _, layout, stored, expected = _load_case(case)
    align = fwd.row_alignment(layout)
    if align is None:
        assert layout.transposed, "only transposed storage is decoded whole"
        return
    decoder = fwd.RowDecoder(layout, {k: v for k, v in stored.items() if k != "bias"})
    rows = layout.weight_shape[0]
    blocks = list(fwd.row_blocks(rows, align, 1, 0.0))
    assert len(blocks) > 1 or rows < 2 * fwd.MIN_ROWS
    ours = torch.cat([decoder.rows(a, b, expected["weight"].dtype) for a, b in blocks])
    assert torch.equal(ours, expected["weight"])


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_forward_matches_the_reference(case: str) -> None:
    """Bit for bit: our forward equals ``F.linear`` on our dequantized weight, which equals the reference's (a
    transposed layer's weight is a transposed view, as the codec returns it). Within float rounding:
    it matches the reference's own forward output (which is not always that ``F.linear``, e.g. with SVD or
    Hadamard; its quantized-matmul layers compute in int8/fp8 and are left out)."""
    _, layout, stored, expected = _load_case(case)
    dtype = expected["weight"].dtype
    layer = _layer(layout, stored, dtype)
    x = expected.get("input")
    if x is None:
        x = torch.randn(3, layout.weight_shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        y = layer(x)  # default: SVD as a low-rank branch on the activations
        weight = layer.dequantize_weight(dtype)
        fwd.set_forward_options(layer, svd="weight")
        exact = layer(x)
    assert torch.equal(weight, expected["weight"])
    assert torch.equal(exact, F.linear(x, weight, layer.bias))
    if layout.svd_rank and not layout.hadamard_size:
        # float rounding only: the low-rank product is summed in another order (a bf16/fp16 ulp of the output)
        tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 1e-2)
        torch.testing.assert_close(y, exact, rtol=tol, atol=tol)
    else:
        assert torch.equal(y, exact)
    if "output" in expected and not layout.options.use_quantized_matmul:
        torch.testing.assert_close(exact, expected["output"], rtol=1e-5, atol=1e-5)
        low = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2  # bf16: the branch rounds x @ downᵀ
        torch.testing.assert_close(y, expected["output"], rtol=low, atol=low)


def _big_layer(dtype: torch.dtype, weights_dtype: str = "uint4", svd: bool = True, bias: bool = True,
               shape: tuple[int, int] = (1000, 384), seed: int = 0) -> SDNQLinear:
    """A layer larger than one block, written by our round-to-nearest writer (+ random SVD factors)."""
    cfg = {"quant_method": "sdnq", "weights_dtype": weights_dtype, "use_svd": svd, "svd_rank": 8,
           "dequantize_fp32": True, "sdnq_version": "0.2.8"}
    layout = plan_layer("linear", shape, QuantConfig.from_dict(cfg).options_for("l.weight", "linear"))
    gen = torch.Generator().manual_seed(seed)
    tensors = quantize_weight(torch.randn(shape, generator=gen) / shape[1] ** 0.5,
                              dataclasses.replace(layout, svd_rank=0))
    if svd:
        tensors["svd_up"] = (torch.randn(shape[0], 8, generator=gen) / 10).to(dtype)
        tensors["svd_down"] = (torch.randn(8, shape[1], generator=gen) / 10).to(dtype)
    if bias:
        tensors["bias"] = torch.randn(shape[0], generator=gen).to(dtype)
    return _layer(layout, tensors, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights_dtype", ["uint4", "int5", "int8", "uint3"])
@pytest.mark.parametrize("tokens", [1, 7, 128])
def test_blocks_of_default_height_are_bit_exact(dtype: torch.dtype, weights_dtype: str, tokens: int) -> None:
    """With blocks of the default minimum height the blocked matmuls equal one ``F.linear`` bit for bit."""
    layer = _big_layer(dtype, weights_dtype)
    fwd.set_forward_options(layer, chunk_mb=0.1, svd="weight")  # 1000 rows x 384 -> blocks of 68-70 rows
    assert len(list(fwd.row_blocks(1000, fwd.row_alignment(layer.sdnq_layout), 384 * 4, 0.1))) > 10
    x = torch.randn(2, tokens, 384, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.dequantize_weight(dtype), layer.bias))


def test_whole_weight_option_and_default_agree() -> None:
    layer = _big_layer(torch.float32)
    x = torch.randn(5, 384)
    with torch.no_grad():
        blocked = layer(x)
        fwd.set_forward_options(layer, chunk_mb=0)
        assert torch.equal(layer(x), blocked)


def test_gradients_flow_to_the_input() -> None:
    """Adapters train through quantized layers: d(out)/dx must match the dense layer's."""
    layer = _big_layer(torch.float32)
    fwd.set_forward_options(layer, chunk_mb=0.1, svd="weight")
    x = torch.randn(4, 384, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (F.linear(x2, layer.dequantize_weight(), layer.bias) ** 2).sum().backward()
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_svd_on_activations_is_the_default_and_close_to_the_exact_forward(dtype: torch.dtype) -> None:
    """The default low-rank branch differs from the exact forward by float rounding only: far below the
    quantization error itself (measured against the dense weight the layer was quantized from)."""
    layer = _big_layer(dtype)
    assert fwd.ForwardOptions().svd == "activations"
    x = torch.randn(16, 384, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        fast = layer(x)
        fwd.set_forward_options(layer, svd="weight")
        exact = layer(x)
        assert torch.equal(exact, F.linear(x, layer.dequantize_weight(dtype), layer.bias))
        # the same product in float64: both forwards must be this close to it
        ref = F.linear(x.double(), layer.dequantize_weight(torch.float32).double(), layer.bias.double())
    for y in (fast, exact):
        err = (y.double() - ref).norm() / ref.norm()
        assert err < (1e-6 if dtype == torch.float32 else 1e-2), err
    fast_err = ((fast.double() - ref).norm() / ref.norm()).item()
    exact_err = ((exact.double() - ref).norm() / ref.norm()).item()
    assert fast_err < 2 * exact_err + (1e-7 if dtype == torch.float32 else 1e-3), (fast_err, exact_err)


def test_cache_keeps_one_dense_weight_and_is_dropped_on_change() -> None:
    layer = _big_layer(torch.float32)
    fwd.set_forward_options(layer, svd="weight")
    x = torch.randn(3, 384)
    with torch.no_grad():
        exact = layer(x)
        fwd.set_forward_options(layer, cache=True)
        assert torch.equal(layer(x), exact)
        cached = layer.__dict__["_sdnq_dense_cache"][1]
        layer(x)
        assert layer.__dict__["_sdnq_dense_cache"][1] is cached
        assert torch.equal(layer(x.bfloat16()), F.linear(x.bfloat16(), layer.dequantize_weight(torch.bfloat16),
                                                          layer.bias.bfloat16()))
        fwd.set_forward_options(layer, cache=False)
    assert "_sdnq_dense_cache" not in layer.__dict__
    plain = layer.dequantize()
    assert not hasattr(plain, "sdnq_forward_options") and not hasattr(plain, "_sdnq_dense_cache")


def test_options_from_env() -> None:
    assert fwd.options_from_env("") == fwd.ForwardOptions()
    opts = fwd.options_from_env("svd=weight, cache=1,chunk_mb=2.5")
    assert opts == fwd.ForwardOptions(chunk_mb=2.5, svd="weight", cache=True)
    with pytest.raises(ValueError, match="DIFFUSERS_SDNQ_FORWARD"):
        fwd.options_from_env("fast")
    with pytest.raises(ValueError, match="svd must be"):
        fwd.options_from_env("svd=maybe")


def test_blocks_respect_packing_alignment() -> None:
    """uint3 packs 8 values per 3 bytes: with 100 inputs per row, blocks must start on even rows."""
    cfg = QuantConfig.from_dict({"quant_method": "sdnq", "weights_dtype": "uint3"})
    layout = plan_layer("linear", (200, 100), cfg.options_for("l.weight", "linear"))
    align = fwd.row_alignment(layout)
    assert align == 2
    blocks = list(fwd.row_blocks(200, align, 1, 0.0))
    assert blocks[0][0] == 0 and all(a % align == 0 for a, _ in blocks) and blocks[-1][1] == 200
    assert all(b == c for (_, b), (c, _) in zip(blocks, blocks[1:]))  # contiguous, no gap
    assert all(b - a >= fwd.MIN_ROWS for a, b in blocks)
    tensors = quantize_weight(torch.randn(200, 100), layout)
    full = dequantize(layout, tensors, torch.float32)
    decoder = fwd.RowDecoder(layout, tensors)
    assert torch.equal(torch.cat([decoder.rows(a, b, torch.float32) for a, b in blocks]), full)


def test_torch_compile_fullgraph() -> None:
    """Under torch.compile the layer traces without graph breaks (the whole-weight graph is compiled)."""
    layer = _big_layer(torch.float32, shape=(256, 128))
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, layer.dequantize_weight(), layer.bias),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_decodes_the_whole_weight(dtype: torch.dtype) -> None:
    """On CUDA the weight is decoded whole (blocks only pay off for CPU caches), by the Triton kernels where they
    are installed, into the thread's workspace: the exact forward is F.linear on dequantize_weight() there."""
    layer = _big_layer(dtype).to("cuda")
    fwd.set_forward_options(layer, svd="weight")
    x = torch.randn(2, 7, 384, device="cuda").to(dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.dequantize_weight(dtype), layer.bias))


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inference_mode_then_plain_forward(dtype: torch.dtype, cache: bool) -> None:
    """Buffers first made inside ``torch.inference_mode()`` (the thread's workspace, the cached dense weight) must
    serve later forwards outside it: under ``no_grad`` and with autograd (a fresh thread: a fresh workspace)."""
    import threading

    layer = _big_layer(dtype)
    fwd.set_forward_options(layer, chunk_mb=0.1, svd="weight", cache=cache)
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(3)).to(dtype)
    expected = F.linear(x, layer.dequantize_weight(dtype), layer.bias)
    results: list[object] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                first = layer(x)
            with torch.no_grad():
                second = layer(x)
            xg = x.detach().clone().requires_grad_(True)
            layer(xg).float().sum().backward()
            results.extend([first, second, xg.grad])
        except Exception as exc:  # re-raised in the test's thread
            results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not isinstance(results[-1], Exception), results[-1]
    first, second, grad = results
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert grad is not None and grad.shape == x.shape
