"""Loading behaviour beyond bit-exactness: the quantization_config.json sidecar, damaged checkpoints that must
fail with a report naming the keys (more in tests/faults/), dtype/device moves and device_map.

Fixtures are the reference-made tiny Flux2Klein folders (tests/tiny_models.py); every damaged copy lives in a
temp folder. Oracles: our own load of the *undamaged* folder, which test_pipelines.py checks bit for bit against
the reference, so any difference here is a loading difference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cache_root
from safetensors.torch import load_file, save_file
from tiny_models import get_fixture

import diffusers_sdnq  # registers the backend
from diffusers_sdnq.format import SDNQConfigError, SDNQShapeError
from diffusers_sdnq.layers import SDNQLayerMixin


def _root() -> Path:
    return cache_root() / "models"


@pytest.fixture(scope="module")
def pipeline_dir() -> Path:
    return get_fixture("flux2_klein", "uint4_svd", _root())


def _copy_component(src: Path, comp: str, dst: Path) -> Path:
    target = dst / comp
    shutil.copytree(src / comp, target)
    return target


def _load(comp: str, path: Path, **kwargs):
    if comp == "transformer":
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel.from_pretrained(path, **kwargs)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: m.dequantize_weight() for n, m in model.named_modules() if isinstance(m, SDNQLayerMixin)}


def _strip_config(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg.pop("quantization_config")["quant_method"] == "sdnq"
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder: Path, edit) -> None:
    file = next(folder.glob("*.safetensors"))
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------- sidecar


@pytest.mark.parametrize("comp", ["transformer", "text_encoder"])
def test_sidecar_quantization_config_json_is_used(pipeline_dir: Path, tmp_path: Path, comp: str) -> None:
    """config.json without quantization_config + quantization_config.json beside it: loads quantized, same
    weights as the intact folder."""
    folder = _copy_component(pipeline_dir, comp, tmp_path)
    _strip_config(folder)
    assert (folder / "quantization_config.json").is_file()
    ours = _weights(_load(comp, folder))
    intact = _weights(_load(comp, pipeline_dir / comp))
    assert ours.keys() == intact.keys() and len(ours) > 0
    for name, w in intact.items():
        assert torch.equal(ours[name], w), name


@pytest.mark.parametrize("comp", ["transformer", "text_encoder"])
def test_quantized_files_without_any_config_refuse_to_load_dense(pipeline_dir: Path, tmp_path: Path,
                                                                 comp: str) -> None:
    folder = _copy_component(pipeline_dir, comp, tmp_path)
    _strip_config(folder)
    (folder / "quantization_config.json").unlink()
    with pytest.raises(SDNQConfigError) as info:
        _load(comp, folder)
    msg = str(info.value)
    assert str(folder / "config.json") in msg and "no 'quantization_config'" in msg and ".scale'" in msg


def test_corrupt_sidecar_names_the_file(pipeline_dir: Path, tmp_path: Path) -> None:
    folder = _copy_component(pipeline_dir, "transformer", tmp_path)
    _strip_config(folder)
    (folder / "quantization_config.json").write_text('{"quant_method": "sdnq", "weights_dty')
    with pytest.raises(SDNQConfigError, match=r"quantization_config\.json: cannot read"):
        _load("transformer", folder)


def test_dense_folder_is_untouched_by_the_guard() -> None:
    """A dense checkpoint still loads dense (the guard only fires on packed weights with scales)."""
    from diffusers import Flux2Transformer2DModel

    dense = get_fixture("flux2_klein", "dense", _root()) / "transformer"
    model = Flux2Transformer2DModel.from_pretrained(dense)
    assert not any(isinstance(m, SDNQLayerMixin) for m in model.modules())
    stored = load_file(next(dense.glob("*.safetensors")))
    for name, param in model.named_parameters():
        assert torch.equal(param, stored[name]), name


# ---------------------------------------------------------------------------------------------- damaged tensors


def _first(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


# (damaged single tensors and configs: tests/faults/test_checkpoint_faults.py)


def test_quantized_layer_missing_entirely_is_an_error(pipeline_dir: Path, tmp_path: Path) -> None:
    """diffusers would leave the layer's weight on the meta device; we refuse and list it."""
    folder = _copy_component(pipeline_dir, "transformer", tmp_path)
    removed: list[str] = []

    def drop(t: dict) -> None:
        prefix = _first(t, ".scale")[: -len("scale")]
        removed.extend(k for k in list(t) if k.startswith(prefix))
        for k in removed:
            del t[k]

    _edit_weights(folder, drop)
    with pytest.raises(SDNQShapeError, match="missing from the SDNQ checkpoint") as info:
        _load("transformer", folder)
    assert any(k.endswith(".weight") and k in str(info.value) for k in removed)


# ---------------------------------------------------------------------------------------------- dtype / device


def test_diffusers_dtype_cast_is_refused_and_stored_tensors_survive(pipeline_dir: Path) -> None:
    model = _load("transformer", pipeline_dir / "transformer")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="quantized model"):
        model.to(torch.bfloat16)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_transformers_dtype_cast_keeps_stored_dtypes(pipeline_dir: Path) -> None:
    model = _load("text_encoder", pipeline_dir / "text_encoder")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SDNQLayerMixin)}
    before = {n: {k: v.clone() for k, v in m.sdnq_tensors().items()} for n, m in layers.items()}
    model.to(torch.float16)
    for name, layer in layers.items():
        for key, value in layer.sdnq_tensors().items():
            assert value.dtype == before[name][key].dtype and torch.equal(value, before[name][key]), (name, key)
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.isfinite(model(ids).logits).all()


def test_compute_dtype_follows_a_cast_and_dequantize_gives_the_new_dtype(pipeline_dir: Path) -> None:
    """After ``model.to(torch.float16)`` the stored tensors keep their dtypes but the layers compute in float16:
    ``dequantize_weight()`` and ``dequantize_model`` give float16, so the dequantized model still runs."""
    model = _load("text_encoder", pipeline_dir / "text_encoder")
    model.to(torch.float16)
    layers = [m for m in model.modules() if isinstance(m, SDNQLayerMixin)]
    assert layers and all(m.compute_dtype == torch.float16 for m in layers)
    assert layers[0].dequantize_weight().dtype == torch.float16
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        quantized = model(ids).logits
        diffusers_sdnq.dequantize_model(model)
        assert all(m.weight.dtype == torch.float16 for m in model.modules() if isinstance(m, torch.nn.Linear))
        torch.testing.assert_close(model(ids).logits, quantized, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("comp", ["transformer", "text_encoder"])
def test_device_map_auto_loads_the_same_model(pipeline_dir: Path, comp: str) -> None:
    plain = _weights(_load(comp, pipeline_dir / comp))
    mapped_model = _load(comp, pipeline_dir / comp, device_map="auto")
    mapped = _weights(mapped_model)
    assert plain.keys() == mapped.keys()
    assert all(torch.equal(plain[k], mapped[k]) for k in plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_moves_and_offload(pipeline_dir: Path) -> None:
    from diffusers import DiffusionPipeline
    from tiny_models import run_pipeline

    cpu = run_pipeline(DiffusionPipeline.from_pretrained(pipeline_dir))
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir).to("cuda")
    for module in pipe.transformer.modules():
        if isinstance(module, SDNQLayerMixin):
            assert module.weight.device.type == "cuda" and module.weight.dtype == torch.uint8
    torch.testing.assert_close(run_pipeline(pipe).cpu(), cpu, rtol=1e-3, atol=1e-3)
    offloaded = DiffusionPipeline.from_pretrained(pipeline_dir)
    offloaded.enable_model_cpu_offload()
    torch.testing.assert_close(run_pipeline(offloaded).cpu(), cpu, rtol=1e-3, atol=1e-3)
    lm = _load("text_encoder", pipeline_dir / "text_encoder", device_map="auto")
    assert any(p.device.type == "cuda" for p in lm.parameters())


@pytest.mark.parametrize("weights_dtype", ["int16", "int8"])
def test_model_dtype_scales_round_trip(tmp_path: Path, weights_dtype: str) -> None:
    """dequantize_fp32=False in bf16: scales are stored in bf16, except for types whose range exceeds 16384,
    which keep float32 scales in the file; a reload must keep exactly what was written."""
    from transformers import AutoModelForCausalLM

    from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig

    dense = get_fixture("qwen3", "dense", _root())
    config = SDNQTransformersConfig(weights_dtype=weights_dtype, dequantize_fp32=False, minimum_allowed_numel=4096)
    model = AutoModelForCausalLM.from_pretrained(dense, quantization_config=config, dtype=torch.bfloat16)
    written = {n: (m.scale.dtype, m.dequantize_weight()) for n, m in model.named_modules()
               if isinstance(m, SDNQLayerMixin)}
    assert written
    model.save_pretrained(tmp_path / "q")
    stored = load_file(next((tmp_path / "q").glob("*.safetensors")))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    want_scale = torch.float32 if weights_dtype == "int16" else torch.bfloat16
    for name, module in reloaded.named_modules():
        if isinstance(module, SDNQLayerMixin):
            assert stored[f"{name}.scale"].dtype == want_scale == module.scale.dtype == written[name][0], name
            assert torch.equal(module.dequantize_weight(), written[name][1]), name


# ---------------------------------------------------------------------------------------------- memory
def _stored_values_match(model, file: Path) -> None:
    """Every SDNQ tensor of ``model`` holds the file's values (read without mapping the file)."""
    from safetensors.torch import load as load_bytes

    stored = load_bytes(file.read_bytes())
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, SDNQLayerMixin):
            for key, value in module.sdnq_tensors().items():
                assert torch.equal(value, stored[f"{name}.{key}"].to(value.dtype)), f"{name}.{key}"
                checked += 1
    assert checked


def _maps(file: Path) -> bool:
    target = str(file.resolve())
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        return any(line.rstrip().endswith(target) for line in fh)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_a_converting_load_lets_the_checkpoint_mapping_go(pipeline_dir: Path, tmp_path: Path) -> None:
    """A bfloat16 checkpoint loaded in float32: the dense tensors are converted copies, so the SDNQ tensors are
    copied out of the mapped file too and the mapping (with every page read while loading) is released. Loaded in
    bfloat16, dense tensors point into the file: nothing is copied."""
    import gc

    from diffusers_sdnq.layers.replace import release_file_mappings

    model = _load("transformer", pipeline_dir / "transformer", torch_dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    del model
    gc.collect()
    file = next((tmp_path / "bf16").glob("*.safetensors"))
    assert not _maps(file)

    converted = _load("transformer", tmp_path / "bf16", torch_dtype=torch.float32)
    gc.collect()
    assert not _maps(file), "the float32 model still holds the bfloat16 checkpoint's mapping"
    _stored_values_match(converted, file)

    same = _load("transformer", tmp_path / "bf16", torch_dtype=torch.bfloat16)
    assert _maps(file), "dense tensors loaded in their stored dtype point into the file"
    assert release_file_mappings(same) == 0
    _stored_values_match(same, file)


@pytest.mark.parametrize("comp", ["transformer", "text_encoder"])
def test_sdnq_dequantizer_view_matches_the_reference_layers(comp: str) -> None:
    """Code written for the reference finds quantized layers by ``hasattr(m, "sdnq_dequantizer")`` and reads
    ``original_shape`` / ``weights_dtype`` there: the same layers, shapes and dtype names as the reference's own
    load of the same files (mixed widths: the dynamic variant), and calling it gives ``dequantize_weight()``."""
    import json as _json

    from conftest import run_python

    folder = get_fixture("flux2_klein", "dynamic", _root()) / comp
    code = (
        "import json, sys\n"
        "from tiny_models import _import_reference\n"
        "_import_reference()\n"
        "if sys.argv[2] == 'transformer':\n"
        "    from diffusers import Flux2Transformer2DModel as cls\n"
        "else:\n"
        "    from transformers import AutoModelForCausalLM as cls\n"
        "model = cls.from_pretrained(sys.argv[1])\n"
        "print(json.dumps({n: [list(m.sdnq_dequantizer.original_shape), str(m.sdnq_dequantizer.weights_dtype)]\n"
        "                  for n, m in model.named_modules() if hasattr(m, 'sdnq_dequantizer')}))\n"
    )
    reference = _json.loads(run_python(code, str(folder), comp).stdout.strip().splitlines()[-1])
    model = _load(comp, folder)
    ours = {n: [list(m.sdnq_dequantizer.original_shape), m.sdnq_dequantizer.weights_dtype]
            for n, m in model.named_modules() if hasattr(m, "sdnq_dequantizer")}
    assert reference and ours == reference
    assert len({dtype for _, dtype in ours.values()}) > 1  # the check covers mixed widths
    for name in list(ours)[:3]:
        layer = model.get_submodule(name)
        tensors = layer.sdnq_tensors()
        view = layer.sdnq_dequantizer
        got = view(tensors["weight"], tensors["scale"], tensors.get("zero_point"), tensors.get("svd_up"),
                   tensors.get("svd_down"))
        assert torch.equal(got, layer.dequantize_weight())
