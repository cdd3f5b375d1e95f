"""diffusers-sdnq as a Hugging Face quantization backend: what diffusers' and transformers' own backend tests ask.

* device maps with ``"cpu"`` / ``"disk"`` entries (and accelerate's CPU offload hooks), pre-quantized and quantized
  on load, in both libraries: outputs equal to the model loaded without a device map; the stored tensors that
  accelerate writes and reads back are the very bytes and dtypes of the non-offloaded model's;
* ``device_map="auto"`` sizes a layer to be quantized on load by its packed bytes (against the real loaded tensors
  and the layout's bits);
* parameter counts are the dense model's; the transformers quantizer says it is compileable, and a compiled
  (fullgraph) forward equals eager.

The reference is not needed here: every comparison is between two loads of the same files by this package, with
independent float math for the sizes and counts.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from tiny_models import get_fixture

from diffusers_sdnq.layers import SDNQLayerMixin, sdnq_layers

QUANT = {"weights_dtype": "uint4", "minimum_allowed_numel": 0, "modules_dtype_dict": {"float8_e5m2": ["to_v", "v_proj"]}}
"""uint4 everywhere it is allowed, plus an fp8 type (a float stored weight, which diffusers would cast when offloading)."""

FLUX_INPUTS_SEED = 2


def _flux_inputs(dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(FLUX_INPUTS_SEED)
    return {"hidden_states": torch.randn(1, 16, 16, generator=gen).to(dtype),
            "encoder_hidden_states": torch.randn(1, 8, 192, generator=gen).to(dtype),
            "timestep": torch.tensor([0.5], dtype=dtype), "img_ids": torch.zeros(16, 4), "txt_ids": torch.zeros(8, 4),
            "guidance": None}


LM_IDS = (torch.arange(48).reshape(2, 24) * 7) % 280


@pytest.fixture(scope="module")
def dense(fixtures_root: Path) -> dict[str, Path]:
    return {"diffusers": get_fixture("flux2_klein", "dense", fixtures_root) / "transformer",
            "transformers": get_fixture("qwen3", "dense", fixtures_root)}


def _config(lib: str, **kwargs):
    if lib == "diffusers":
        from diffusers_sdnq.integrations.diffusers import SDNQDiffusersConfig

        return SDNQDiffusersConfig(**{**QUANT, **kwargs})
    from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig

    return SDNQTransformersConfig(**{**QUANT, **kwargs})


def _load(lib: str, path: Path, **kwargs):
    if lib == "diffusers":
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel.from_pretrained(path, **kwargs)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


@torch.no_grad()
def _run(lib: str, model, dtype: torch.dtype) -> torch.Tensor:
    if lib == "diffusers":
        return model(**_flux_inputs(dtype)).sample
    return model(input_ids=LM_IDS).logits


@pytest.fixture(scope="module")
def prequantized(dense, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints written by this package (quantize on load, then save_pretrained), in bfloat16."""
    out = {}
    for lib, src in dense.items():
        folder = tmp_path_factory.mktemp(f"pre-{lib}")
        kw = {"torch_dtype": torch.bfloat16} if lib == "diffusers" else {"dtype": torch.bfloat16}
        _load(lib, src, quantization_config=_config(lib), **kw).save_pretrained(folder)
        out[lib] = folder
    return out


#: a device map per library: one block on disk, the rest on cpu
OFFLOADED = {"diffusers": "transformer_blocks", "transformers": "model.layers.1"}


def _device_map(lib: str, model, where: str) -> dict[str, str]:
    names = [n for n, _ in model.named_children()]
    if lib == "transformers":
        names = [f"model.{n}" for n, _ in model.model.named_children()] + ["lm_head"]
        names = [n for n in names if n != "model.layers"] + [f"model.layers.{i}" for i in range(len(model.model.layers))]
    device_map = dict.fromkeys(names, "cpu")
    device_map[OFFLOADED[lib]] = where
    return device_map


def _stored(model) -> dict[str, torch.Tensor]:
    """Every stored SDNQ tensor of the model by full name, read back the way accelerate serves it to the forward
    (from the offload hook's weights map when the layer is offloaded)."""
    out = {}
    for name, layer in sdnq_layers(model).items():
        hook = getattr(layer, "_hf_hook", None)
        weights_map = getattr(hook, "weights_map", None) if getattr(hook, "offload", False) else None
        for key, value in layer.sdnq_tensors().items():
            out[f"{name}.{key}"] = weights_map[key] if weights_map is not None else value
    return out


@pytest.mark.parametrize("where", ["disk", "cpu"])
@pytest.mark.parametrize("mode", ["prequantized", "quantize_on_load"])
@pytest.mark.parametrize("lib", ["diffusers", "transformers"])
def test_device_map_offload(lib, mode, where, dense, prequantized, tmp_path):
    """Offloaded layers hold exactly the tensors of a load without device map and give exactly its outputs."""
    dtype = torch.bfloat16
    kw = {"torch_dtype": dtype} if lib == "diffusers" else {"dtype": dtype}
    if mode == "prequantized":
        source = prequantized[lib]
    else:
        source = dense[lib]
        kw["quantization_config"] = _config(lib)
    plain = _load(lib, source, **kw)
    if mode == "quantize_on_load":
        kw["quantization_config"] = _config(lib)
    device_map = _device_map(lib, plain, where)
    offloaded = _load(lib, source, device_map=device_map, offload_folder=str(tmp_path / "offload"), **kw)
    offloaded_layers = [n for n in sdnq_layers(offloaded) if n.startswith(OFFLOADED[lib] + ".")]
    assert offloaded_layers and set(sdnq_layers(offloaded)) == set(sdnq_layers(plain))
    if where == "disk":
        assert all(t.device.type == "meta" for n in offloaded_layers
                   for t in sdnq_layers(offloaded)[n].sdnq_tensors().values())
    want, got = _stored(plain), _stored(offloaded)
    assert want.keys() == got.keys()
    assert {k: str(v.dtype) for k, v in got.items()} == {k: str(v.dtype) for k, v in want.items()}
    assert [k for k in want if not torch.equal(got[k].cpu(), want[k])] == []
    assert any(v.dtype == torch.float32 for k, v in got.items() if k.endswith(".scale"))  # fp32 scales, bf16 model
    assert any(v.dtype == torch.float8_e5m2 for v in got.values())
    assert torch.equal(_run(lib, offloaded, dtype), _run(lib, plain, dtype))


@pytest.mark.parametrize("lib", ["diffusers", "transformers"])
def test_accelerate_cpu_offload_hooks(lib, prequantized):
    """accelerate's CPU offload (weights kept in a CPU state dict, loaded before each forward) keeps every dtype."""
    from accelerate import cpu_offload

    dtype = torch.bfloat16
    kw = {"torch_dtype": dtype} if lib == "diffusers" else {"dtype": dtype}
    plain = _load(lib, prequantized[lib], **kw)
    hooked = _load(lib, prequantized[lib], **kw)
    cpu_offload(hooked, execution_device="cpu")
    assert all(t.device.type == "meta" for layer in sdnq_layers(hooked).values() for t in layer.sdnq_tensors().values())
    assert torch.equal(_run(lib, hooked, dtype), _run(lib, plain, dtype))


# ---------------------------------------------------------------------------------------------- device_map="auto"
def _packed_bytes(layer: SDNQLayerMixin) -> int:
    """The stored bytes of a loaded layer (bias excluded), with the packed weight checked against its bits."""
    stored = layer.sdnq_tensors()
    layout = layer.sdnq_layout
    weight = stored["weight"]
    if layout.dtype.name == "uint4" and layout.group_size <= 0 and not layout.svd_rank:
        assert weight.numel() * weight.element_size() == math.prod(layout.weight_shape) * 4 // 8
    return sum(t.numel() * t.element_size() for t in stored.values())


def test_diffusers_auto_device_map_sizes_packed_layers(dense):
    """Before any weight is read, the planner's size of each layer to be quantized equals its real packed size."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from diffusers import Flux2Transformer2DModel

    from diffusers_sdnq.integrations.diffusers import SDNQDiffusersQuantizer

    dtype = torch.bfloat16
    loaded = _load("diffusers", dense["diffusers"], quantization_config=_config("diffusers"), torch_dtype=dtype)
    with init_empty_weights():
        meta = Flux2Transformer2DModel.from_config(Flux2Transformer2DModel.load_config(dense["diffusers"])).to(dtype)
    quantizer = SDNQDiffusersQuantizer(_config("diffusers"), pre_quantized=False)
    quantizer.update_torch_dtype(dtype)
    quantizer.preprocess_model(meta, device_map=None, keep_in_fp32_modules=[])
    sizes = compute_module_sizes(meta, dtype=quantizer.adjust_target_dtype(dtype),
                                 special_dtypes=quantizer.get_special_dtypes_update(meta, dtype))
    layers = sdnq_layers(loaded)
    assert layers
    for name, layer in layers.items():
        bias = layer.bias.numel() * layer.bias.element_size() if layer.bias is not None else 0
        assert sizes[name] == _packed_bytes(layer) + bias, name
    real = sum(t.numel() * t.element_size() for t in (*loaded.parameters(), *loaded.buffers()))
    assert sizes[""] == real


def test_transformers_auto_device_map_sizes_packed_layers(dense):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.accelerate import compute_module_sizes

    from diffusers_sdnq.integrations.transformers import SDNQHfQuantizer

    dtype = torch.bfloat16
    loaded = _load("transformers", dense["transformers"], quantization_config=_config("transformers"), dtype=dtype)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dense["transformers"]), dtype=dtype)
    quantizer = SDNQHfQuantizer(_config("transformers"), pre_quantized=False)
    quantizer.preprocess_model(meta, dtype=dtype)
    sizes, _ = compute_module_sizes(meta, quantizer)
    layers = sdnq_layers(loaded)
    assert layers
    for name, layer in layers.items():
        assert sizes[name] == _packed_bytes(layer), name


# ---------------------------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("lib", ["diffusers", "transformers"])
def test_num_parameters_counts_the_dense_model(lib, dense):
    dense_model = _load(lib, dense[lib])
    quantized = _load(lib, dense[lib], quantization_config=_config(lib))
    assert sdnq_layers(quantized)
    assert sum(p.numel() for p in quantized.parameters()) < dense_model.num_parameters()  # packed storage
    for kwargs in ({}, {"exclude_embeddings": True}):
        assert quantized.num_parameters(**kwargs) == dense_model.num_parameters(**kwargs), kwargs
    frozen = sum(math.prod(layer.sdnq_layout.weight_shape) for layer in sdnq_layers(quantized).values())
    assert quantized.num_parameters(only_trainable=True) == dense_model.num_parameters(only_trainable=True) - frozen


def test_transformers_quantizer_is_compileable_and_compiled_forward_matches(dense):
    model = _load("transformers", dense["transformers"], quantization_config=_config("transformers"))
    assert model.hf_quantizer.is_compileable
    with torch.no_grad():
        eager = model(input_ids=LM_IDS).logits
        compiled = torch.compile(model, fullgraph=True)(input_ids=LM_IDS).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("lib", ["diffusers", "transformers"])
def test_save_pretrained_refuses_pickle(lib, dense, tmp_path):
    model = _load(lib, dense[lib], quantization_config=_config(lib))
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="safetensors"):
        model.save_pretrained(target, safe_serialization=False)
    assert not target.exists() or list(target.iterdir()) == []
    model.save_pretrained(target)  # the default still saves
    assert list(target.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------- nothing quantized
@pytest.mark.parametrize("lib", ["diffusers", "transformers"])
def test_quantizing_nothing_warns(lib, dense):
    from diffusers_sdnq.format.errors import SDNQWarning

    with pytest.warns(SDNQWarning, match="quantized no layer.*minimum_allowed_numel"):
        model = _load(lib, dense[lib], quantization_config=_config(lib, minimum_allowed_numel=10**9))
    assert not sdnq_layers(model)


# ---------------------------------------------------------------------------------------------- one SDNQConfig
def _stored_of(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, layer in sdnq_layers(model).items() for k, v in layer.sdnq_tensors().items()}


@pytest.mark.parametrize("lib", ["diffusers", "transformers"])
def test_sdnq_config_is_one_class_for_both_libraries(lib, dense, tmp_path):
    from diffusers_sdnq import SDNQConfig

    config = SDNQConfig(**QUANT)
    model = _load(lib, dense[lib], quantization_config=config)
    twin = _load(lib, dense[lib], quantization_config=_config(lib))  # the library-specific class
    ours, want = _stored_of(model), _stored_of(twin)
    assert ours and ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)
    assert config.to_dict()["modules_to_not_convert"] == []  # the caller's object is left as given
    model.save_pretrained(tmp_path)
    again = _load(lib, tmp_path)
    assert _stored_of(again).keys() == want.keys()


def test_sdnq_config_in_pipeline_quant_mapping(fixtures_root):
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    from diffusers_sdnq import SDNQConfig

    folder = get_fixture("flux2_klein", "dense", fixtures_root)
    config = SDNQConfig(weights_dtype="uint4", minimum_allowed_numel=0)
    pipe = DiffusionPipeline.from_pretrained(folder, quantization_config=PipelineQuantizationConfig(
        quant_mapping={"transformer": config, "text_encoder": config}))
    assert sdnq_layers(pipe.transformer) and sdnq_layers(pipe.text_encoder)
    assert type(pipe.text_encoder.hf_quantizer).__name__ == "SDNQHfQuantizer"


# ---------------------------------------------------------------------------------------------- typos
@pytest.mark.parametrize("cls_path", ["diffusers_sdnq:SDNQConfig",
                                      "diffusers_sdnq.integrations.diffusers:SDNQDiffusersConfig",
                                      "diffusers_sdnq.integrations.transformers:SDNQTransformersConfig"])
def test_misspelt_keyword_raises_with_suggestion(cls_path):
    import importlib

    module, _, name = cls_path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(TypeError, match=r"'weight_dtype'.*did you mean 'weights_dtype'"):
        cls(weight_dtype="uint4")
    field = f"future_field_of_{name}"  # unknown-field warnings are shown once per process and set of names
    with pytest.warns(UserWarning, match=field):  # a saved file may come from a newer release
        read = cls.from_dict({"quant_method": "sdnq", "weights_dtype": "uint4", field: 1})
    assert read.to_dict()[field] == 1


def test_misspelt_keyword_in_pipeline_quant_kwargs_raises(fixtures_root):
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    config = PipelineQuantizationConfig(quant_backend="sdnq", quant_kwargs={"weight_dtype": "uint4"})
    with pytest.raises(TypeError, match="weights_dtype"):
        DiffusionPipeline.from_pretrained(get_fixture("flux2_klein", "dense", fixtures_root), quantization_config=config)


# ---------------------------------------------------------------------------------------------- with the sdnq package
_WITH_REFERENCE = r"""
import io, logging, sys, torch
stream = io.StringIO()
handler = logging.StreamHandler(stream)
logging.getLogger("diffusers_sdnq").addHandler(handler)
FIRST = sys.argv[1]
if FIRST == "sdnq":
    import sdnq
import diffusers_sdnq
import diffusers, transformers
from diffusers import Flux2Transformer2DModel
from transformers import AutoModelForCausalLM
if FIRST != "sdnq":
    import sdnq
from diffusers_sdnq.layers import SDNQLinear, sdnq_layers
from diffusers_sdnq.integrations.diffusers import SDNQDiffusersConfig
from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig
config = diffusers.SDNQConfig(weights_dtype="uint4", minimum_allowed_numel=0)  # diffusers' entry point: sdnq's class
assert type(config).__module__.startswith("sdnq"), type(config)
model = Flux2Transformer2DModel.from_pretrained(sys.argv[2], quantization_config=config)
assert sdnq_layers(model) and all(isinstance(m, SDNQLinear) for m in sdnq_layers(model).values())
assert isinstance(model.config.quantization_config, SDNQDiffusersConfig), type(model.config.quantization_config)
lm = AutoModelForCausalLM.from_pretrained(sys.argv[3], quantization_config=sdnq.SDNQConfig(weights_dtype="uint4",
                                                                                          minimum_allowed_numel=0))
assert sdnq_layers(lm) and type(lm.hf_quantizer).__name__ == "SDNQHfQuantizer"
assert isinstance(lm.config.quantization_config, SDNQTransformersConfig)
print("NOTES", stream.getvalue().count("diffusers-sdnq serves quant_method 'sdnq'"))
"""


@pytest.mark.skipif(importlib.util.find_spec("sdnq") is None, reason="sdnq (test oracle) missing")
@pytest.mark.parametrize("first", ["sdnq", "diffusers_sdnq"])
def test_reference_config_objects_and_which_implementation_serves(first, dense):
    """With the sdnq package imported too (before or after ours), its config objects quantize with ours, and the
    log says once which implementation serves "sdnq"."""
    from conftest import run_python

    proc = run_python(_WITH_REFERENCE, first, str(dense["diffusers"]), str(dense["transformers"]))
    assert "NOTES 1" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("sdnq") is None, reason="sdnq (test oracle) missing")
def test_without_our_import_the_sdnq_package_serves():
    """The documented way to choose the sdnq package: DIFFUSERS_SDNQ_AUTOLOAD=0 and no import of diffusers_sdnq."""
    from conftest import run_python

    proc = run_python("import sdnq, transformers.quantizers.auto as a, sys; "
                      "print('SERVES', a.AUTO_QUANTIZER_MAPPING['sdnq'].__module__, 'diffusers_sdnq' in sys.modules)")
    assert "SERVES sdnq.quantizer False" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------- architecture
def test_lower_layers_import_no_integration():
    """format/, layers/ and the writer (quantize/) never import integrations/: the integrations hand in what the
    writer needs (docs: developers' guide)."""
    import ast

    import diffusers_sdnq

    root = Path(diffusers_sdnq.__file__).parent
    offenders = []
    for sub in ("format", "layers", "quantize"):
        for file in (root / sub).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.ImportFrom):
                    target = ("." * node.level) + (node.module or "")
                    if "integrations" in target:
                        offenders.append(f"{file.relative_to(root)}: {target}")
                elif isinstance(node, ast.Import):
                    offenders += [f"{file.relative_to(root)}: {a.name}" for a in node.names if "integrations" in a.name]
    assert offenders == []
