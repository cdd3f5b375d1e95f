"""torch.compile keeps the decoders: the operators of ``layers/ops.py`` in compiled graphs.

Oracles: the eager forward (the same kernels run inside the operators, so compiled and eager agree bit for bit in
the quantized layers) and ``F.linear`` on the bit-exact ``dequantize_weight()``. Speed is measured in bench/, not
here (``python -m bench.compile_cpu``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusers_sdnq.format import plan_layer
from diffusers_sdnq.format.config import QuantConfig
from diffusers_sdnq.layers import SDNQEmbedding, SDNQLinear, assign_stored_tensor, ops
from diffusers_sdnq.layers import forward as fwd
from diffusers_sdnq.quantize import quantize_model, quantize_weight


def _linear(weights_dtype: str = "uint4", shape=(256, 128), dtype=torch.float32, seed: int = 0, **options) -> nn.Module:
    cfg = {"quant_method": "sdnq", "weights_dtype": weights_dtype, "sdnq_version": "0.2.8", **options}
    layout = plan_layer("linear", shape, QuantConfig.from_dict(cfg).options_for("l.weight", "linear"))
    gen = torch.Generator().manual_seed(seed)
    tensors = quantize_weight(torch.randn(shape, generator=gen) / shape[1] ** 0.5, layout)
    with torch.device("meta"):
        dense = nn.Linear(shape[1], shape[0])
    layer = SDNQLinear.from_module(dense, layout, dtype)
    for name, value in tensors.items():
        assign_stored_tensor(layer, name, value)
    layer._parameters["bias"] = nn.Parameter(torch.randn(shape[0], generator=gen).to(dtype), requires_grad=False)
    return layer


class _Graphs:
    """A torch.compile backend that records every graph it is handed (then runs it eagerly)."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self) -> set[str]:
        """Names of the functions called in the graphs (operator overloads without their ``.default``)."""
        names = {str(n.target) for gm in self.graphs for n in gm.graph.nodes if n.op == "call_function"}
        return {n.removesuffix(".default") for n in names}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CASES = {
    "uint4_svd": ("uint4", {"use_svd": True, "svd_rank": 8}),
    "int8": ("int8", {}),
    "uint3_grouped": ("uint3", {"group_size": 32}),
    "float8": ("float8_e4m3fn", {}),
    "int8_transposed": ("int8", {"use_quantized_matmul": True}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("svd", ["activations", "weight"])
def test_compiled_layer_runs_the_operators_and_equals_eager(case: str, svd: str) -> None:
    name, options = CASES[case]
    layer = _linear(name, **options)
    fwd.set_forward_options(layer, svd=svd)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    backend = _Graphs()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    with torch.no_grad():
        eager = layer(x)
        got = compiled(x)
    assert torch.equal(got, eager)
    blocked = fwd.row_alignment(layer.sdnq_layout) is not None
    expected_op = "diffusers_sdnq.linear" if blocked else "diffusers_sdnq.dequantize"
    assert expected_op in backend.targets(), backend.targets()
    # nothing of the codec was traced: no unpacking, no code conversion in the graph
    assert not any("shift" in t or "bitwise" in t for t in backend.targets()), backend.targets()


def test_inductor_compiles_around_the_operator() -> None:
    """The default backend (Inductor, generated C++ on CPU) with fullgraph=True: equal to eager."""
    layer = _linear("uint4", use_svd=True, svd_rank=8)
    model = nn.Sequential(layer, nn.GELU(), nn.LayerNorm(256))
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))  # the operator, bit for bit


def test_no_recompilation_per_call() -> None:
    """Same shapes, new values, several layers sharing a layout: one graph, compiled once."""
    from torch._dynamo.utils import counters

    model = nn.Sequential(_linear("uint4", seed=0), nn.ReLU(), _linear("uint4", shape=(128, 256), seed=1),
                          nn.ReLU(), _linear("uint4", seed=2))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    counters.clear()
    with torch.no_grad():
        for i in range(5):
            x = torch.randn(7, 128, generator=torch.Generator().manual_seed(i))
            assert torch.equal(compiled(x), model(x))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])


def test_repeated_blocks_compile_once() -> None:
    """Regional compilation (diffusers' ``compile_repeated_blocks``: each block compiled on its own): blocks whose
    layers have equal layouts share one graph. A guard on the layout *object* would compile every block again and,
    past Dynamo's cache limit of 8, leave the rest of a 25-block transformer uncompiled."""
    from torch._dynamo.utils import counters

    class Block(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.a = _linear("uint4", seed=seed, use_svd=True, svd_rank=8)
            self.b = _linear("uint4", shape=(128, 256), seed=seed + 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.b(F.gelu(self.a(x)))

    blocks = nn.ModuleList([Block(2 * i) for i in range(10)])
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = x
        for block in blocks:
            y = block(y)
        for block in blocks:
            block.compile(fullgraph=True, backend="eager")
        counters.clear()
        z = x
        for block in blocks:
            z = block(z)
    assert torch.equal(z, y)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"], dict(counters["stats"])


def test_changing_forward_options_recompiles_with_the_new_options() -> None:
    """The options are part of the operator's key: a change is picked up (by a guard), not silently ignored."""
    layer = _linear("uint4", use_svd=True, svd_rank=8)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
        fwd.set_forward_options(layer, svd="weight")
        exact = F.linear(x, layer.dequantize_weight(), layer.bias)
        assert torch.equal(compiled(x), exact)


def test_gradients_through_the_compiled_layer() -> None:
    """With autograd the operator decodes the weight and F.linear stays in the graph: input gradients equal
    eager's (adapters train through compiled quantized layers)."""
    layer = _linear("uint4", use_svd=True, svd_rank=8)
    backend = _Graphs()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 128, requires_grad=True)
    (compiled(x) ** 2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (layer(x2) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.compile(layer, backend=backend, fullgraph=True)(x)
    assert "diffusers_sdnq.dequantize" in backend.targets()


def test_dequantize_weight_under_compile_uses_the_operator() -> None:
    """Layers that rebuild the whole weight (embeddings, convs) go through the decode operator too."""
    cfg = QuantConfig.from_dict({"quant_method": "sdnq", "weights_dtype": "uint4", "quant_embedding": True,
                                 "sdnq_version": "0.2.8"})
    layout = plan_layer("embedding", (64, 32), cfg.options_for("e.weight", "embedding"))
    tensors = quantize_weight(torch.randn(64, 32), layout)
    with torch.device("meta"):
        dense = nn.Embedding(64, 32)
    emb = SDNQEmbedding.from_module(dense, layout, torch.float32)
    for name, value in tensors.items():
        assign_stored_tensor(emb, name, value)
    ids = torch.tensor([[1, 5, 63]])
    backend = _Graphs()
    with torch.no_grad():
        assert torch.equal(torch.compile(emb, backend=backend, fullgraph=True)(ids), emb(ids))
    assert "diffusers_sdnq.dequantize" in backend.targets()


@pytest.mark.parametrize("case", ["uint4_svd", "int8_transposed"])
def test_operators_pass_torch_opcheck(case: str) -> None:
    """torch.library.opcheck: schema, fake (meta) implementation, and the dispatcher paths compile uses."""
    name, options = CASES[case]
    layer = _linear(name, **options)
    names = tuple(k for k, v in layer._parameters.items() if v is not None and k != "bias")
    stored = [layer._parameters[k] for k in names]
    key = fwd.op_key(layer.sdnq_layout, names, fwd.ForwardOptions())
    torch.library.opcheck(torch.ops.diffusers_sdnq.dequantize.default, (stored, key, torch.bfloat16, True))
    if fwd.row_alignment(layer.sdnq_layout) is not None:
        x = torch.randn(2, 3, 128)
        torch.library.opcheck(torch.ops.diffusers_sdnq.linear.default, (x, stored, layer.bias, key))


def test_layer_keys_are_stable_and_checked() -> None:
    a, b = _linear("uint4", seed=0), _linear("uint4", seed=1)
    names = ("weight", "scale", "zero_point")
    opts = fwd.ForwardOptions()
    key = fwd.op_key(a.sdnq_layout, names, opts)
    assert key == fwd.op_key(b.sdnq_layout, names, opts)
    assert fwd.op_key(a.sdnq_layout, names, dataclasses.replace(opts, svd="weight")) != key
    layout, stored_names, options = ops.lookup(key)  # rebuilt from the values: equal to the layer's own
    assert layout == a.sdnq_layout and stored_names == names and options == opts
    with pytest.raises(RuntimeError, match="unknown layer key"):
        torch.ops.diffusers_sdnq.dequantize([a.weight], "sdnq_not_a_key", torch.float32, True)


def test_compiled_tiny_transformer_fullgraph(tmp_path) -> None:
    """A whole (tiny) FLUX.2 transformer quantized by our writer compiles with fullgraph=True and equals eager."""
    diffusers = pytest.importorskip("diffusers")
    from tiny_models import _randomize_

    config = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": 32, "timestep_guidance_channels": 32,
              "mlp_ratio": 3.0, "axes_dims_rope": (4, 4, 4, 4), "guidance_embeds": False}
    model = _randomize_(diffusers.Flux2Transformer2DModel(**config), seed=0).eval()
    quantize_model(model, weights_dtype="uint4", use_svd=True, svd_rank=4, minimum_allowed_numel=256,
                   progress=False)
    assert sum(isinstance(m, SDNQLinear) for m in model.modules()) >= 4
    gen = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 16, generator=gen),
              "encoder_hidden_states": torch.randn(1, 8, 32, generator=gen), "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(1, 16, 4), "txt_ids": torch.zeros(1, 8, 4)}
    backend = _Graphs()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        eager = model(**inputs, return_dict=False)[0]
        for _ in range(2):
            assert torch.equal(compiled(**inputs, return_dict=False)[0], eager)
    assert len(backend.graphs) == 1 and "diffusers_sdnq.linear" in backend.targets()


# -------------------------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graphs_with_the_decode_operator(dtype: torch.dtype) -> None:
    """mode="reduce-overhead" (CUDA graphs): replays give the eager result, and the graph is not rebuilt per call."""
    from torch._dynamo.utils import counters

    model = nn.Sequential(_linear("uint4", use_svd=True, svd_rank=8, dtype=dtype), nn.GELU(),
                          _linear("int8", shape=(128, 256), dtype=dtype)).cuda()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    with torch.no_grad():
        for i in range(4):
            x = torch.randn(9, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(i)).to(dtype)
            torch.testing.assert_close(compiled(x).clone(), model(x), rtol=2e-2, atol=2e-2)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])
