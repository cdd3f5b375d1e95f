"""Whole-model writing: which layers are quantized, dynamic choices, pipelines, transformers, saving.

Measured against the reference (sdnq 0.2.8, run only in child processes) on the tiny fixtures of
``tests/tiny_models.py`` — the same dense weights the reference quantized to build its fixtures:

* the set of quantized layers and the saved ``modules_to_not_convert`` equal the reference's for every component
  (FLUX.1, FLUX.2 Klein, Z-Image transformers; CLIP, T5 and Qwen3 text encoders; a bare Qwen3 LM);
* dynamic quantization picks the reference's type on ≥ 95 % of layers (printed) and never exceeds the threshold;
* the default skip tables are re-measured on the reference class by class;
* ``PipelineQuantizationConfig(quant_backend="sdnq", ...)`` quantizes a pipeline's diffusers and transformers
  components; the saved pipeline (and a sharded transformers checkpoint) loads in the reference with bit-exact
  weights and the same outputs;
* saving is atomic, writes ``quantization_config.json``, and quantize-on-load never holds the dense model twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TESTS, cache_root
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import MIN_NUMEL, VARIANTS, fixture_path, get_fixture

from diffusers_sdnq.layers import sdnq_layers
from diffusers_sdnq.layers.forward import set_forward_options

#: (fixture, component folder ("" = the fixture itself), library, class name)
COMPONENTS = [
    ("flux1", "transformer", "diffusers", "FluxTransformer2DModel"),
    ("flux2_klein", "transformer", "diffusers", "Flux2Transformer2DModel"),
    ("zimage", "transformer", "diffusers", "ZImageTransformer2DModel"),
    ("flux1", "text_encoder", "transformers", "CLIPTextModel"),
    ("flux1", "text_encoder_2", "transformers", "T5EncoderModel"),
    ("zimage", "text_encoder", "transformers", "Qwen3ForCausalLM"),
    ("flux2_klein", "text_encoder", "transformers", "Qwen3ForCausalLM"),
    ("qwen3", "", "transformers", "Qwen3ForCausalLM"),
]
IDS = [f"{f}-{c or 'model'}" for f, c, _, _ in COMPONENTS]
OUT_TOL = {"rtol": 0.0, "atol": 2e-6}  # as tests/test_pipelines.py: both sides dequantize and call F.linear
ENV = {"OMP_NUM_THREADS": "1", "SDNQ_USE_TORCH_COMPILE": "0", "DIFFUSERS_SDNQ_AUTOLOAD": "0"}


@pytest.fixture(scope="session")
def fixtures(fixtures_root: Path) -> Path:
    for name in ("flux1", "flux2_klein", "zimage", "qwen3"):
        for variant in ("int8", "dynamic", "uint4_svd"):
            get_fixture(name, variant, fixtures_root)
    return fixtures_root


def _quantize_component(root: Path, fixture: str, comp: str, lib: str, cls_name: str, **kwargs):
    """Quantize-on-load one dense fixture component with our writer."""
    folder = fixture_path(fixture, "dense", root) / comp
    if lib == "diffusers":
        import diffusers

        from diffusers_sdnq.integrations.diffusers import SDNQDiffusersConfig

        config = SDNQDiffusersConfig(**kwargs)
        return getattr(diffusers, cls_name).from_pretrained(str(folder), quantization_config=config)
    import transformers

    from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig

    return getattr(transformers, cls_name).from_pretrained(str(folder), quantization_config=SDNQTransformersConfig(**kwargs))


def _reference_files(root: Path, fixture: str, variant: str, comp: str) -> tuple[set[str], dict]:
    folder = fixture_path(fixture, variant, root) / comp
    quantized: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            quantized |= {k[: -len(".scale")] for k in fh.keys() if k.endswith(".scale")}  # noqa: SIM118
    return quantized, json.loads((folder / "quantization_config.json").read_text())


def _saved_config(model) -> dict:
    return model.config.quantization_config.to_dict()


# ------------------------------------------------------------------------------------------------ layer sets
@pytest.mark.parametrize(("fixture", "comp", "lib", "cls_name"), COMPONENTS, ids=IDS)
def test_same_quantized_layers_as_reference(fixtures: Path, fixture: str, comp: str, lib: str, cls_name: str) -> None:
    model = _quantize_component(fixtures, fixture, comp, lib, cls_name, weights_dtype="int8",
                                minimum_allowed_numel=MIN_NUMEL)
    ref_layers, ref_config = _reference_files(fixtures, fixture, "int8", comp)
    ours = set(sdnq_layers(model))
    assert ours == ref_layers, f"only ours: {sorted(ours - ref_layers)}; only reference: {sorted(ref_layers - ours)}"
    ours_skip = set(_saved_config(model)["modules_to_not_convert"])
    assert ours_skip == set(ref_config["modules_to_not_convert"]), ours_skip ^ set(ref_config["modules_to_not_convert"])


# ------------------------------------------------------------------------------------------------ dynamic
@pytest.mark.parametrize(("fixture", "comp", "lib", "cls_name"), COMPONENTS, ids=IDS)
def test_dynamic_choices_match_reference(fixtures: Path, fixture: str, comp: str, lib: str, cls_name: str) -> None:
    kwargs = {**VARIANTS["dynamic"], "minimum_allowed_numel": MIN_NUMEL}
    model = _quantize_component(fixtures, fixture, comp, lib, cls_name, **kwargs)
    _, ref_config = _reference_files(fixtures, fixture, "dynamic", comp)
    ours = {n: k for k, names in _saved_config(model)["modules_dtype_dict"].items() for n in names}
    ref = {n: k for k, names in ref_config["modules_dtype_dict"].items() for n in names}
    agree = sum(ours.get(n) == k for n, k in ref.items())
    kinds = sorted(set(ref.values()))
    print(f"\n{fixture}/{comp or 'model'}: dynamic choices agree on {agree}/{len(ref)} layers (types {kinds})")
    assert set(ours) == set(ref)
    assert agree >= 0.95 * len(ref), sorted((n, ours.get(n), k) for n, k in ref.items() if ours.get(n) != k)
    dense = _dense_state(fixtures, fixture, comp)
    for name, layer in sdnq_layers(model).items():  # independent check of the loss each choice reached
        w = dense[f"{name}.weight"].float()
        loss = (layer.dequantize_weight(torch.float32) - w).pow(2).mean() / w.var()
        assert loss < kwargs["dynamic_loss_threshold"], (name, layer.sdnq_layout.dtype.name, float(loss))


def _dense_state(root: Path, fixture: str, comp: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in (fixture_path(fixture, "dense", root) / comp).glob("*.safetensors"):
        out.update(load_file(str(file)))
    return out


# ------------------------------------------------------------------------------------------------ skip tables
SKIP_CHILD = r'''
import json, os, sys
os.environ["SDNQ_USE_TORCH_COMPILE"] = "0"
import torch, sdnq
out = {}
for name, attrs in json.loads(sys.argv[1]):
    cls = type(name, (torch.nn.Module,), attrs)
    model = cls()
    model.layer = torch.nn.Linear(64, 64)
    sdnq.sdnq_post_load_quant(model, weights_dtype="int8", minimum_allowed_numel=0, minimum_allowed_channel_size=0)
    out[name + json.dumps(attrs, sort_keys=True)] = sorted(model.quantization_config.modules_to_not_convert)
print(json.dumps(out))
'''


def test_default_skip_tables_match_reference() -> None:
    """Re-measure the reference's skip patterns for every architecture in our table and for unknown ones."""
    from diffusers_sdnq.quantize import MODEL_SKIP_KEYS, default_skip_keys

    attrs = {"_keep_in_fp32_modules": ["wo"], "_skip_layerwise_casting_patterns": ["pos_embed", "norm"],
             "_tied_weights_keys": {"lm_head.weight": "model.embed_tokens.weight"}}
    probes = [(n, {}) for n in MODEL_SKIP_KEYS] + [(n, attrs) for n in ("FluxTransformer2DModel", "MyNewModel")]
    probes += [(n, {}) for n in ("UNet2DConditionModel", "SD3Transformer2DModel", "HunyuanVideoTransformer3DModel",
                                 "T5EncoderModel", "Qwen3ForCausalLM", "LlamaForCausalLM")]
    env = {**os.environ, **ENV}
    proc = subprocess.run([sys.executable, "-c", SKIP_CHILD, json.dumps(probes)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, extra in probes:
        model = type(name, (torch.nn.Module,), dict(extra))()
        model.layer = torch.nn.Linear(64, 64)
        assert sorted(set(default_skip_keys(model))) == measured[name + json.dumps(extra, sort_keys=True)], name


# ------------------------------------------------------------------------------------------------ pipelines + save
REF_LOAD_CHILD = r'''
import json, os, sys
os.environ["SDNQ_USE_TORCH_COMPILE"] = "0"
import torch
torch.set_num_threads(1)
import sdnq
from sdnq.dequantizer import dequantize_sdnq_model
from safetensors.torch import save_file
from diffusers import DiffusionPipeline
from transformers import AutoModelForCausalLM, AutoTokenizer
import tiny_models as tm
out_dir = sys.argv[1]
res = {}
pipe = DiffusionPipeline.from_pretrained(os.path.join(out_dir, "pipeline"))
res["pipeline.output"] = tm.run_pipeline(pipe, seed=0)
for comp in ("transformer", "text_encoder"):
    module = getattr(pipe, comp)
    names = [n for n, m in module.named_modules() if hasattr(m, "sdnq_dequantizer")]
    deq = dequantize_sdnq_model(module)
    res.update({f"{comp}/{n}": deq.get_submodule(n).weight.detach() for n in names})
lm = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "lm")).eval()
tok = AutoTokenizer.from_pretrained(os.path.join(out_dir, "lm"))
res["lm.logits"], _ = tm.run_causal_lm(lm, tok)
names = [n for n, m in lm.named_modules() if hasattr(m, "sdnq_dequantizer")]
deq = dequantize_sdnq_model(lm)
res.update({f"lm/{n}": deq.get_submodule(n).weight.detach() for n in names})
lm16 = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "lm16"), dtype=torch.bfloat16).eval()
names = [n for n, m in lm16.named_modules() if hasattr(m, "sdnq_dequantizer")]
deq = dequantize_sdnq_model(lm16)
res.update({f"lm16/{n}": deq.get_submodule(n).weight.detach() for n in names})
save_file({k: v.contiguous().clone() for k, v in res.items()}, os.path.join(out_dir, "ref.safetensors"))
'''


@pytest.fixture(scope="session")
def saved(fixtures: Path, tmp_path_factory) -> dict:
    """A pipeline quantized with PipelineQuantizationConfig and a sharded Qwen3 LM, saved by us, read by the
    reference in one child process."""
    from diffusers import DiffusionPipeline
    from diffusers.quantizers import PipelineQuantizationConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("writer_model")
    kwargs = {**VARIANTS["uint4_svd"], "minimum_allowed_numel": MIN_NUMEL}
    config = PipelineQuantizationConfig(quant_backend="sdnq", quant_kwargs=kwargs,
                                        components_to_quantize=["transformer", "text_encoder"])
    pipe = DiffusionPipeline.from_pretrained(str(fixture_path("flux2_klein", "dense", fixtures)),
                                             quantization_config=config)
    pipe.save_pretrained(str(out / "pipeline"))
    lm_src = fixture_path("qwen3", "dense", fixtures)
    lm = AutoModelForCausalLM.from_pretrained(str(lm_src), quantization_config=_lm_config())
    lm.save_pretrained(str(out / "lm"), max_shard_size="100KB")
    AutoTokenizer.from_pretrained(str(lm_src)).save_pretrained(str(out / "lm"))
    lm16 = AutoModelForCausalLM.from_pretrained(str(lm_src), dtype=torch.bfloat16, quantization_config=_lm_config(
        dequantize_fp32=False))
    lm16.save_pretrained(str(out / "lm16"))
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", REF_LOAD_CHILD, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"reference child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return {"out": out, "pipe": pipe, "lm": lm, "lm16": lm16, "ref": load_file(out / "ref.safetensors")}


def _lm_config(**extra):
    from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig

    return SDNQTransformersConfig(weights_dtype="uint4", use_svd=True, svd_rank=8, use_dynamic_quantization=True,
                                  dynamic_loss_threshold=0.008, minimum_allowed_numel=MIN_NUMEL, **extra)


def test_pipeline_quantization_config_quantizes_both_libraries(saved: dict, fixtures: Path) -> None:
    pipe = saved["pipe"]
    for comp in ("transformer", "text_encoder"):
        ref_layers, ref_config = _reference_files(fixtures, "flux2_klein", "uint4_svd", comp)
        assert set(sdnq_layers(getattr(pipe, comp))) == ref_layers, comp
        assert set(_saved_config(getattr(pipe, comp))["modules_to_not_convert"]) == set(
            ref_config["modules_to_not_convert"])
    assert not sdnq_layers(pipe.vae)


def test_saved_pipeline_loads_in_reference_bit_exact(saved: dict) -> None:
    import tiny_models as tm
    from diffusers import DiffusionPipeline

    ref = saved["ref"]
    pipe = DiffusionPipeline.from_pretrained(str(saved["out"] / "pipeline"))
    for comp in ("transformer", "text_encoder"):
        ours = sdnq_layers(getattr(pipe, comp))
        assert {k.split("/", 1)[1] for k in ref if k.startswith(comp + "/")} == set(ours)
        for name, layer in ours.items():
            assert torch.equal(layer.dequantize_weight(), ref[f"{comp}/{name}"]), f"{comp}/{name}"
        folder = saved["out"] / "pipeline" / comp
        sidecar = json.loads((folder / "quantization_config.json").read_text())
        assert sidecar == json.loads((folder / "config.json").read_text())["quantization_config"]
    for comp in ("transformer", "text_encoder"):  # the bit-exact forward: outputs then agree to a few ulps
        set_forward_options(getattr(pipe, comp), svd="weight")
    out = tm.run_pipeline(pipe, seed=0)
    assert torch.isfinite(ref["pipeline.output"]).all()
    torch.testing.assert_close(out, ref["pipeline.output"], **OUT_TOL)


def test_sharded_transformers_checkpoint_loads_in_reference(saved: dict) -> None:
    import tiny_models as tm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = saved["out"] / "lm"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected a sharded checkpoint"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"
    ref = saved["ref"]
    lm = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ours = sdnq_layers(lm)
    assert {k[3:] for k in ref if k.startswith("lm/")} == set(ours)
    for name, layer in ours.items():
        assert torch.equal(layer.dequantize_weight(), ref[f"lm/{name}"]), name
    set_forward_options(lm, svd="weight")
    logits, _ = tm.run_causal_lm(lm, AutoTokenizer.from_pretrained(str(folder)))
    torch.testing.assert_close(logits, ref["lm.logits"], **OUT_TOL)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["sdnq_version"] == "0.2.8" and config["modules_dtype_dict"]
    assert json.loads((folder / "quantization_config.json").read_text()) == config


def test_bfloat16_quantize_on_load_round_trip(saved: dict) -> None:
    """Quantized in bf16 with model-dtype scales: the layers compute in bf16, the saved file reloads to the same
    weights with ours, and the reference's own bf16 transformers load decodes them identically."""
    from transformers import AutoModelForCausalLM

    memory = sdnq_layers(saved["lm16"])
    assert {layer.compute_dtype for layer in memory.values()} == {torch.bfloat16}
    assert {layer.scale.dtype for layer in memory.values()} == {torch.bfloat16}
    again = sdnq_layers(AutoModelForCausalLM.from_pretrained(str(saved["out"] / "lm16"), dtype=torch.bfloat16))
    ref = saved["ref"]
    assert {k[5:] for k in ref if k.startswith("lm16/")} == set(memory) == set(again)
    for name, layer in memory.items():
        weight = layer.dequantize_weight()
        assert torch.equal(weight, again[name].dequantize_weight()), name
        assert torch.equal(weight, ref[f"lm16/{name}"]), name


# ------------------------------------------------------------------------------------------------ atomic save
def _small_quantized_lm(fixtures: Path):
    from transformers import AutoModelForCausalLM

    from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig

    return AutoModelForCausalLM.from_pretrained(str(fixture_path("qwen3", "dense", fixtures)),
                                                quantization_config=SDNQTransformersConfig(
                                                    weights_dtype="int8", minimum_allowed_numel=MIN_NUMEL))


def test_interrupted_save_keeps_previous_files(fixtures: Path, tmp_path: Path, monkeypatch) -> None:
    model = _small_quantized_lm(fixtures)
    target = tmp_path / "ckpt"
    model.save_pretrained(str(target), max_shard_size="100KB")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import transformers.modeling_utils as mu

    calls = {"n": 0}
    real = mu.safe_save_file

    def flaky(*args, **kwargs):  # the library's writer dies after its first shard
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(mu, "safe_save_file", flaky)
    with torch.no_grad():
        next(iter(sdnq_layers(model).values())).scale.mul_(2.0)  # a new version that must not half-land
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(str(target), max_shard_size="100KB")
    assert calls["n"] == 2
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_resave_replaces_old_shards(fixtures: Path, tmp_path: Path) -> None:
    model = _small_quantized_lm(fixtures)
    target = tmp_path / "ckpt"
    model.save_pretrained(str(target), max_shard_size="100KB")
    assert (target / "model.safetensors.index.json").is_file()
    model.save_pretrained(str(target))
    names = sorted(p.name for p in target.iterdir())
    assert "model.safetensors" in names and not any("-of-" in n or n.endswith(".index.json") for n in names), names
    assert "quantization_config.json" in names


# ------------------------------------------------------------------------------------------------ memory, progress
MEM_CHILD = r'''
import json, os, sys, threading, time
import torch
torch.set_num_threads(1)
mode, folder = sys.argv[1], sys.argv[2]
import diffusers_sdnq
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM
from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig
from diffusers_sdnq.quantize import quantize_model

def anon_kib():  # private (heap) memory: a tensor read from an mmap'd checkpoint is file-backed until copied
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:"))

peak, done = [anon_kib()], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.002)
base = anon_kib()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
if mode == "save":  # 8 layers of hidden 512 / MLP 1024: ~20 M parameters, 80 MiB in float32, layers of 1-2 MiB
    config = Qwen3Config(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder)
elif mode == "dense_copy":  # every dense weight copied into private memory once
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for p in model.parameters():
        p.data = p.data.clone()
elif mode == "on_load":
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=SDNQTransformersConfig(
        weights_dtype="uint4", use_svd=True, svd_rank=8))
elif mode == "in_memory":
    quantize_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), weights_dtype="uint4",
                   use_svd=True, svd_rank=8, progress=False)
done.append(1)
thread.join()
peak[0] = max(peak[0], anon_kib())
print(json.dumps({"delta_kib": peak[0] - base}))
'''


def _peak_mib(mode: str, folder: Path) -> float:
    # a fixed mmap threshold makes glibc give freed large blocks back at once, so RssAnon shows live memory
    env = {**os.environ, **ENV, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", MEM_CHILD, mode, str(folder)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["delta_kib"] / 1024


def test_quantizing_never_holds_the_dense_model_twice(tmp_path: Path) -> None:
    """Peak private memory while quantizing stays well below one dense copy of the model (measured against
    really copying every dense weight once): quantize-on-load holds one dense layer at a time, and quantizing a
    loaded model adds one layer's work and the quantized tensors."""
    _peak_mib("save", tmp_path)
    dense_mib = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors")) / 2**20
    dense = _peak_mib("dense_copy", tmp_path)
    on_load = _peak_mib("on_load", tmp_path)
    in_memory = _peak_mib("in_memory", tmp_path)
    print(f"\npeak private-memory growth (dense checkpoint {dense_mib:.0f} MiB): one dense copy {dense:.0f} MiB, "
          f"quantize-on-load {on_load:.0f} MiB, load then quantize {in_memory:.0f} MiB")
    assert dense > 0.8 * dense_mib  # the probe sees a dense copy
    assert on_load < 0.5 * dense, (dense, on_load)
    assert in_memory < 0.5 * dense, (dense, in_memory)


def test_progress_bar_counts_layers(fixtures: Path, capfd) -> None:
    _quantize_component(fixtures, "flux2_klein", "transformer", "diffusers", "Flux2Transformer2DModel",
                        weights_dtype="int8", minimum_allowed_numel=MIN_NUMEL)
    err = capfd.readouterr().err
    assert "Quantizing (SDNQ)" in err and "14/14" in err, err[-2000:]


def test_writer_refuses_unwritable_configs() -> None:
    from diffusers_sdnq.format import SDNQConfigError, SDNQDtypeError
    from diffusers_sdnq.integrations.diffusers import SDNQDiffusersConfig
    from diffusers_sdnq.quantize import writer_config

    with pytest.raises(SDNQConfigError, match="not serializable"):
        writer_config({"weights_dtype": "int8", "is_training": True})
    with pytest.raises(SDNQConfigError, match="use_codebook needs an unsigned integer weights_dtype"):
        writer_config({"weights_dtype": "int4", "use_codebook": True})
    with pytest.raises(SDNQConfigError, match="use_codebook_scale needs an unsigned integer scale_dtype"):
        writer_config({"weights_dtype": "uint4", "scale_dtype": "int8", "use_codebook_scale": True})
    with pytest.raises(SDNQDtypeError, match="int99"):
        SDNQDiffusersConfig(weights_dtype="int99")


def test_cache_root_is_used() -> None:
    assert cache_root().is_dir()
