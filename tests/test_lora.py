"""PEFT adapters on SDNQ models: load/set/disable/delete/unload/fuse on the tiny pipelines, adapters on Qwen3,
training on a frozen quantized base, and the refusals.

Oracle: the *dense twin*, a deep copy of the same loaded pipeline/model whose SDNQ layers are replaced by plain
torch layers holding the dequantized weights (``dequantize_model``; bit-exact with the reference per
``test_pipelines.py``). The twin takes adapters through PEFT's own dense layers, an independent computation.

Tolerance: measured max |SDNQ+LoRA - twin+LoRA| is 0 to 2.1e-5 on float32 outputs of magnitude ~7 (the twin's
tensors sit at other memory alignments, which changes BLAS rounding in the last bits). A LoRA moves the outputs
by 1.5-5, so ``ATOL`` = 1e-4 is ~10^4 below the effect being checked. Outputs of one and the same model (disable,
unload, unfuse of layers that only we touch) are compared with ``torch.equal``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoModel, DiffusionPipeline
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from peft.tuners.lora.layer import Linear as StockLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from tiny_models import get_fixture, run_pipeline
from torch import nn
from transformers import AutoModelForCausalLM

import diffusers_sdnq
from diffusers_sdnq.format import LayerOptions, codec, plan_layer
from diffusers_sdnq.integrations.peft import (
    SDNQAdapterError,
    SDNQFuseError,
    SDNQLoHaLinear,
    SDNQLoKrLinear,
    SDNQLoraLinear,
    fuse_blockers,
    prepare_model_for_sdnq_training,
    sdnq_stored_tensors,
)
from diffusers_sdnq.layers import SDNQConv2d, SDNQLayerMixin, SDNQLinear, sdnq_layers
from diffusers_sdnq.quantize import quantize_into

ATOL = 1e-4
PIPELINES = ("flux2_klein", "zimage", "flux1")
TUNER_CLASSES = (SDNQLoraLinear, SDNQLoKrLinear, SDNQLoHaLinear)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ----------------------------------------------------------------------------------------------------------- helpers
def load_pipe(root: Path, name: str, variant: str, dtype: torch.dtype = torch.float32):
    pipe = DiffusionPipeline.from_pretrained(str(get_fixture(name, variant, root)), torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dense_twin(obj):
    """Deep copy with every SDNQ layer replaced by a plain layer holding its dequantized weight."""
    twin = copy.deepcopy(obj)
    modules = [twin] if isinstance(twin, nn.Module) else [c for c in twin.components.values() if isinstance(c, nn.Module)]
    for module in modules:
        diffusers_sdnq.dequantize_model(module)
        assert not sdnq_layers(module)
    return twin


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sdnq_stored_tensors(model).items()}


def assert_same_bytes(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = sdnq_stored_tensors(model)
    assert after.keys() == before.keys()
    bad = [k for k in before if after[k].dtype != before[k].dtype or not torch.equal(after[k], before[k])]
    assert not bad, f"{len(bad)} stored tensors changed, e.g. {bad[:5]}"


def wrapped_sdnq(model: nn.Module) -> dict[str, nn.Module]:
    """Tuner layers whose base is an SDNQ layer; asserts none of them is one of PEFT's stock classes."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and isinstance(module.get_base_layer(), SDNQLayerMixin):
            assert isinstance(module, TUNER_CLASSES), f"{name}: {type(module).__name__} wraps an SDNQ layer"
            out[name] = module
    return out


def dense_transformer(root: Path, name: str) -> nn.Module:
    return AutoModel.from_pretrained(str(get_fixture(name, "dense", root)), subfolder="transformer")


def make_lora(root: Path, name: str, seed: int, rank: int = 4, only=None) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA built with PEFT on the *dense* transformer (so with the dense module names)."""
    transformer = dense_transformer(root, name)
    targets = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and (only is None or n in only)]
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in transformer.named_parameters():
            if "lora_B" in pname:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return get_peft_model_state_dict(transformer)


def prefixed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys ``load_lora_weights`` expects for a state dict passed in memory."""
    return {f"transformer.{k}": v for k, v in state_dict.items()}


def save_lora(pipe, state_dict: dict[str, torch.Tensor], folder: Path) -> Path:
    type(pipe).save_lora_weights(str(folder), transformer_lora_layers=state_dict)
    return folder


def quantized_names(pipe) -> set[str]:
    """Names of the transformer's SDNQ layers, as in the dense model (PEFT's ``.base_layer`` dropped)."""
    return {n.replace(".base_layer", "") for n in sdnq_layers(pipe.transformer)}


def integer_layers(pipe) -> set[str]:
    return {n for n, m in sdnq_layers(pipe.transformer).items()
            if m.sdnq_layout.dtype.is_integer and not m.sdnq_layout.svd_rank}


def assert_within_half_step(layer: SDNQLayerMixin, target: torch.Tensor, where: str) -> None:
    """Round-to-nearest bound: each element within half a quantization step (its group's scale) of the target."""
    lay = layer.sdnq_layout
    assert not lay.transposed and not lay.svd_rank and lay.dtype.is_integer, where
    got = layer.dequantize_weight(torch.float32)
    err = (got - target).abs().reshape(lay.quantized_shape)
    bound = 0.5 * layer.scale.float().reshape(lay.scale_shape) * (1 + 1e-4) + 1e-6
    assert (err <= bound).all(), f"{where}: max error {err.max():.3g}, max half-step {bound.max():.3g}"


# ------------------------------------------------------------------------------------------------- load + equivalence
@pytest.mark.parametrize("variant", ("uint4_svd", "dynamic"))
@pytest.mark.parametrize("name", PIPELINES)
def test_load_lora_matches_dense_twin(fixtures_root: Path, tmp_path: Path, name: str, variant: str) -> None:
    """A LoRA made on the dense model loads unchanged onto the SDNQ pipeline and gives the dense-twin output."""
    q = load_pipe(fixtures_root, name, variant)
    twin = dense_twin(q)
    base = run_pipeline(q)
    folder = save_lora(q, make_lora(fixtures_root, name, seed=1), tmp_path / "lora")
    q.load_lora_weights(str(folder), adapter_name="a")
    twin.load_lora_weights(str(folder), adapter_name="a")
    assert set(wrapped_sdnq(q.transformer)) == quantized_names(q), "every quantized layer carries the adapter"
    out, ref = run_pipeline(q), run_pipeline(twin)
    assert (out - base).abs().max() > 1000 * ATOL, "the LoRA had no visible effect"
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", PIPELINES)
def test_adapter_lifecycle(fixtures_root: Path, tmp_path: Path, name: str) -> None:
    """Two adapters with weights, disable/enable, delete, unload: each state matches the twin or the base."""
    q = load_pipe(fixtures_root, name, "dynamic")
    twin = dense_twin(q)
    before = snapshot(q.transformer)
    base = run_pipeline(q)
    a = save_lora(q, make_lora(fixtures_root, name, seed=1), tmp_path / "a")
    b = save_lora(q, make_lora(fixtures_root, name, seed=2, rank=8, only=quantized_names(q)), tmp_path / "b")
    for pipe in (q, twin):
        pipe.load_lora_weights(str(a), adapter_name="a")
        pipe.load_lora_weights(str(b), adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.8, -0.5])
    mixed = run_pipeline(q)
    torch.testing.assert_close(mixed, run_pipeline(twin), rtol=0, atol=ATOL)

    q.disable_lora()
    assert torch.equal(run_pipeline(q), base)
    q.enable_lora()
    assert torch.equal(run_pipeline(q), mixed)

    for pipe in (q, twin):
        pipe.delete_adapters("a")
        pipe.set_adapters("b", adapter_weights=0.6)
    only_b = run_pipeline(q)
    assert (only_b - base).abs().max() > 1000 * ATOL
    torch.testing.assert_close(only_b, run_pipeline(twin), rtol=0, atol=ATOL)

    q.unload_lora_weights()
    assert not any(isinstance(m, BaseTunerLayer) for m in q.transformer.modules())
    assert_same_bytes(q.transformer, before)
    assert torch.equal(run_pipeline(q), base), "unload must give back exactly the LoRA-free output"


def test_bfloat16_pipeline_lora(fixtures_root: Path, tmp_path: Path) -> None:
    """bf16 load: adapters take the layers' compute dtype, the output follows the bf16 dense twin."""
    q = load_pipe(fixtures_root, "flux2_klein", "dynamic", torch.bfloat16)
    twin = dense_twin(q)
    base = run_pipeline(q)
    folder = save_lora(q, make_lora(fixtures_root, "flux2_klein", seed=3), tmp_path / "lora")
    q.load_lora_weights(str(folder))
    twin.load_lora_weights(str(folder))
    layer = next(iter(wrapped_sdnq(q.transformer).values()))
    assert layer.lora_A["default_0"].weight.dtype == torch.bfloat16
    out = run_pipeline(q)
    assert (out - base).abs().max() > 0.3
    # bf16 twin vs bf16 SDNQ: same math in bf16; measured max diff 0.0 (a bf16 ulp at |x|~7 is 0.03)
    torch.testing.assert_close(out, run_pipeline(twin), rtol=0, atol=0.1)


# ------------------------------------------------------------------------------------------ non-diffusers LoRA files
def _kohya(entries: dict[str, tuple[int, int]], rank: int, gen: torch.Generator, alpha: float | None) -> dict:
    sd = {}
    for key, (out_f, in_f) in entries.items():
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
        sd[f"{key}.lora_up.weight"] = 0.05 * torch.randn(out_f, rank, generator=gen)
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def non_diffusers_lora(name: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Kohya (Flux.1, Z-Image) and BFL/ai-toolkit (Flux.2) key layouts, which diffusers converts on load."""
    if name == "flux1":
        d = "lora_unet_double_blocks_0_"
        entries = {f"{d}{s}_attn_qkv": (384, 128) for s in ("img", "txt")}
        entries.update({f"{d}{s}_attn_proj": (128, 128) for s in ("img", "txt")})
        entries.update({f"{d}{s}_mlp_0": (512, 128) for s in ("img", "txt")})
        entries.update({f"{d}{s}_mlp_2": (128, 512) for s in ("img", "txt")})
        entries.update({f"{d}{s}_mod_lin": (768, 128) for s in ("img", "txt")})
        entries["lora_unet_single_blocks_0_linear2"] = (128, 640)
        return _kohya(entries, rank=4, gen=gen, alpha=2.0)
    if name == "zimage":
        blocks = ("layers_0", "layers_1", "noise_refiner_0", "context_refiner_0")
        entries = {f"lora_unet_{b}_attention_{p}": (128, 128) for b in blocks for p in ("to_q", "to_k", "to_v", "to_out_0")}
        entries.update({f"lora_unet_{b}_feed_forward_{w}": (341, 128) for b in blocks for w in ("w1", "w3")})
        entries.update({f"lora_unet_{b}_feed_forward_w2": (128, 341) for b in blocks})
        return _kohya(entries, rank=4, gen=gen, alpha=8.0)
    d = "diffusion_model.double_blocks.0."
    entries = {f"{d}{s}_attn.qkv": (384, 128) for s in ("img", "txt")}
    entries.update({f"{d}{s}_attn.proj": (128, 128) for s in ("img", "txt")})
    entries.update({f"{d}{s}_mlp.0": (768, 128) for s in ("img", "txt")})
    entries.update({f"{d}{s}_mlp.2": (128, 384) for s in ("img", "txt")})
    entries["diffusion_model.single_blocks.0.linear1"] = (1152, 128)
    entries["diffusion_model.single_blocks.0.linear2"] = (128, 512)
    sd = _kohya(entries, rank=4, gen=gen, alpha=None)
    return {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in sd.items()}


@pytest.mark.parametrize("name", PIPELINES)
def test_non_diffusers_lora_formats(fixtures_root: Path, tmp_path: Path, name: str) -> None:
    """Kohya / BFL files go through diffusers' converters and land on the SDNQ layers like on dense ones."""
    q = load_pipe(fixtures_root, name, "uint4_svd")
    twin = dense_twin(q)
    base = run_pipeline(q)
    file = tmp_path / "lora.safetensors"
    save_file(non_diffusers_lora(name, torch.Generator().manual_seed(5)), str(file))
    q.load_lora_weights(str(file))
    twin.load_lora_weights(str(file))
    assert len(wrapped_sdnq(q.transformer)) >= 8
    out = run_pipeline(q)
    assert (out - base).abs().max() > 1000 * ATOL
    torch.testing.assert_close(out, run_pipeline(twin), rtol=0, atol=ATOL)


def test_flux_control_lora_widens_dense_x_embedder(fixtures_root: Path) -> None:
    """A Control LoRA widens ``x_embedder`` (left dense by the quantizer); the SDNQ layers stay quantized."""
    q = load_pipe(fixtures_root, "flux1", "dynamic")
    twin = dense_twin(q)
    quantized = quantized_names(q)
    assert "x_embedder" not in quantized
    gen = torch.Generator().manual_seed(7)
    sd = {"transformer.x_embedder.lora_A.weight": torch.randn(4, 32, generator=gen) / 4,
          "transformer.x_embedder.lora_B.weight": 0.05 * torch.randn(128, 4, generator=gen)}
    for lname in sorted(quantized)[:6]:
        layer = q.transformer.get_submodule(lname)
        sd[f"transformer.{lname}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=gen) / 8
        sd[f"transformer.{lname}.lora_B.weight"] = 0.05 * torch.randn(layer.out_features, 4, generator=gen)
    q.load_lora_weights(dict(sd))
    twin.load_lora_weights(dict(sd))
    assert q.transformer.config.in_channels == 32 and q.transformer.x_embedder.in_features == 32
    assert quantized_names(q) == quantized, "no quantized layer was widened or dequantized"
    assert len(wrapped_sdnq(q.transformer)) == 6
    inputs = {"hidden_states": torch.randn(1, 16, 32, generator=gen),
              "encoder_hidden_states": torch.randn(1, 8, 64, generator=gen),
              "pooled_projections": torch.randn(1, 64, generator=gen), "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3), "guidance": torch.tensor([3.0])}
    with torch.no_grad():
        out = q.transformer(**inputs).sample
        ref = twin.transformer(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------------------- fuse
@pytest.mark.parametrize(("name", "variant", "targets"), [("flux2_klein", "int8", "all"), ("zimage", "dynamic", "int")])
def test_fuse_requantizes_and_unfuse_restores_bytes(fixtures_root: Path, name: str, variant: str,
                                                    targets: str) -> None:
    """fuse = requantize(W + BA) in each layer's own layout; unfuse gives back the original bytes."""
    q = load_pipe(fixtures_root, name, variant)
    only = None if targets == "all" else integer_layers(q)
    sd = make_lora(fixtures_root, name, seed=4, only=only)
    originals = {n: (m.dequantize_weight(torch.float32), dict(m.sdnq_tensors()))
                 for n, m in sdnq_layers(q.transformer).items() if only is None or n in only}
    before = snapshot(q.transformer)
    base = run_pipeline(q)
    q.load_lora_weights(prefixed(sd))
    lora = run_pipeline(q)

    assert fuse_blockers(q.transformer) == {}
    q.fuse_lora()
    fused = run_pipeline(q)
    changed = 0
    for lname, (w0, stored) in originals.items():
        layer = q.transformer.get_submodule(lname).get_base_layer()
        delta = sd[f"{lname}.lora_B.weight"].float() @ sd[f"{lname}.lora_A.weight"].float()  # scaling 1 (alpha = r)
        assert_within_half_step(layer, w0 + delta, lname)
        changed += not torch.equal(layer.weight, stored["weight"])
    assert changed == len(originals) > 0
    # requantizing moves the output much less than the LoRA does (measured ratios 0.019 flux2 int8, 0.25 zimage
    # uint4/int5: a rank-4 delta as large as the weights themselves, requantized to 16-32 levels)
    assert (fused - lora).norm() < 0.5 * (lora - base).norm()

    q.unfuse_lora()
    assert_same_bytes(q.transformer, before)
    for lname, (_, stored) in originals.items():  # the very same tensors are back
        layer = q.transformer.get_submodule(lname).get_base_layer()
        assert all(layer._parameters[k] is v for k, v in stored.items())
    # PEFT's dense layers (fused as W += BA, W -= BA) drift by float rounding, ours are exact
    torch.testing.assert_close(run_pipeline(q), lora, rtol=0, atol=ATOL)

    q.fuse_lora()
    q.unload_lora_weights()
    assert all(type(m) is SDNQLinear for m in sdnq_layers(q.transformer).values())
    torch.testing.assert_close(run_pipeline(q), fused, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("name", "variant"), [("flux2_klein", "uint4_svd"), ("zimage", "uint4_svd")])
def test_fuse_refused_without_touching_the_base(fixtures_root: Path, name: str, variant: str) -> None:
    """SVD layers refuse to fuse (requantizing cannot reproduce their own weight), saying what to do instead."""
    q = load_pipe(fixtures_root, name, variant)
    before = snapshot(q.transformer)
    q.load_lora_weights(prefixed(make_lora(fixtures_root, name, seed=6, only=quantized_names(q))))
    lora = run_pipeline(q)
    blockers = fuse_blockers(q.transformer)
    assert blockers and set(blockers) <= quantized_names(q)
    with pytest.raises(SDNQFuseError, match="Keep the adapter unfused") as err:
        q.fuse_lora()
    assert "dequantize_model" in str(err.value)
    failed = str(err.value).split("'")[1]
    assert failed in blockers
    layer = q.transformer.get_submodule(failed).get_base_layer()
    assert not q.transformer.get_submodule(failed).merged
    assert all(torch.equal(v, before[f"{failed}.{k}"]) for k, v in layer.sdnq_tensors().items())
    q.unfuse_lora()  # layers fused before the failing one are restored exactly
    assert_same_bytes(q.transformer, before)
    assert torch.equal(run_pipeline(q), lora)


def _int8_layer(fixtures_root: Path) -> SDNQLinear:
    model = AutoModelForCausalLM.from_pretrained(str(get_fixture("qwen3", "int8", fixtures_root)))
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, SDNQLinear) and layer.weight.dtype == torch.int8
    return layer


def test_stock_peft_merge_corrupts_and_ours_is_routed_instead(fixtures_root: Path) -> None:
    """PEFT's own ``safe_merge`` writes a truncated float delta into the int8 codes; ours never reaches it."""
    layer = _int8_layer(fixtures_root)
    w0 = layer.dequantize_weight(torch.float32)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["proj"], init_lora_weights=False)

    stock = StockLoraLinear(copy.deepcopy(layer), "x", config=copy.deepcopy(config), r=4, lora_alpha=4)
    stock.lora_B["x"].weight.data.mul_(100)  # a delta of a few units, so the int8 cast keeps some of it
    delta = stock.get_delta_weight("x").float().detach()
    codes = stock.base_layer.weight.clone()
    stock.merge(safe_merge=True)
    wrong = stock.base_layer.dequantize_weight(torch.float32)
    assert not torch.equal(stock.base_layer.weight, codes), "PEFT's merge rewrote the packed codes"
    assert ((wrong - (w0 + delta)).norm() / delta.norm()) > 0.5, "... into something other than W + BA"

    holder = nn.Module()
    holder.proj = copy.deepcopy(layer)
    inject_adapter_in_model(copy.deepcopy(config), holder, adapter_name="x")
    assert type(holder.proj) is SDNQLoraLinear
    holder.proj.lora_A["x"].weight.data.copy_(stock.lora_A["x"].weight)
    holder.proj.lora_B["x"].weight.data.copy_(stock.lora_B["x"].weight)
    original = dict(holder.proj.base_layer.sdnq_tensors())
    holder.proj.merge(safe_merge=True)
    assert_within_half_step(holder.proj.base_layer, w0 + delta, "proj")
    holder.proj.unmerge()
    assert all(holder.proj.base_layer._parameters[k] is v for k, v in original.items())
    assert torch.equal(holder.proj.base_layer.weight, codes)


# -------------------------------------------------------------------------------------------------- transformers side
def load_lm(root: Path, variant: str, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(get_fixture("qwen3", variant, root)), dtype=dtype).eval()


IDS = torch.randint(3, 280, (2, 24), generator=torch.Generator().manual_seed(0))
ADAPTERS = {
    "lora": LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False),
    "rslora_bias": LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False, use_rslora=True,
                              lora_bias=True),
    "dora": LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False, use_dora=True),
    "lokr": LoKrConfig(r=4, target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                       init_weights=False),
    "loha": LoHaConfig(r=4, target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                       init_weights=False),
}


def _peft_pair(root: Path, variant: str, kind: str):
    q = load_lm(root, variant)
    twin = dense_twin(q)
    with torch.no_grad():
        base = q(IDS).logits
    tp = get_peft_model(twin, copy.deepcopy(ADAPTERS[kind]))
    qp = get_peft_model(q, copy.deepcopy(ADAPTERS[kind]))
    result = set_peft_model_state_dict(qp, get_peft_model_state_dict(tp))
    assert not result.unexpected_keys
    return q, qp, tp, base


@pytest.mark.parametrize("kind", ADAPTERS)
def test_get_peft_model_on_qwen3_matches_dense(fixtures_root: Path, kind: str) -> None:
    """LoRA (+rsLoRA/lora_bias), DoRA, LoKr, LoHa on the uint4+SVD Qwen3 == the same adapter on the dense twin."""
    q, qp, tp, base = _peft_pair(fixtures_root, "uint4_svd", kind)
    assert wrapped_sdnq(qp)
    with torch.no_grad():
        out, ref = qp(IDS).logits, tp(IDS).logits
    assert (out - base).abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ("lora", "dora", "lokr", "loha"))
def test_merge_adapter_int8_qwen3(fixtures_root: Path, kind: str) -> None:
    """merge = requantize(PEFT's dense merged weight); unmerge restores the bytes. Oracle: the twin's merge."""
    q, qp, tp, _ = _peft_pair(fixtures_root, "int8", kind)
    before = snapshot(q)
    with torch.no_grad():
        unmerged = qp(IDS).logits
    qp.merge_adapter()
    tp.merge_adapter()
    dense = {n.replace(".base_layer", ""): m for n, m in tp.named_modules() if isinstance(m, nn.Linear)}
    fused = {n.replace(".base_layer", ""): m for n, m in qp.named_modules() if isinstance(m, SDNQLinear)}
    touched = [n for n, m in wrapped_sdnq(qp).items() if m.merged]
    assert touched
    for name in touched:
        assert_within_half_step(fused[name.replace(".base_layer", "")], dense[name].weight.float(), name)
    qp.unmerge_adapter()
    assert_same_bytes(q, before)
    with torch.no_grad():
        torch.testing.assert_close(qp(IDS).logits, unmerged, rtol=0, atol=ATOL)


def test_load_adapter_on_sdnq_qwen3(fixtures_root: Path, tmp_path: Path) -> None:
    """transformers' ``load_adapter`` with an adapter saved from the dense model."""
    q = load_lm(fixtures_root, "dynamic")
    twin = dense_twin(q)
    with torch.no_grad():
        base = q(IDS).logits
    trained = get_peft_model(dense_twin(q), copy.deepcopy(ADAPTERS["lora"]))
    trained.save_pretrained(str(tmp_path / "adapter"))
    q.load_adapter(str(tmp_path / "adapter"), adapter_name="x")
    twin.load_adapter(str(tmp_path / "adapter"), adapter_name="x")
    assert wrapped_sdnq(q)
    with torch.no_grad():
        out, ref = q(IDS).logits, twin(IDS).logits
    assert (out - base).abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    # (transformers 5.24's disable_adapters()/delete_adapter() need peft >= 0.22; this environment has 0.21.2)


# -------------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("prepare", ("sdnq", "peft"))
def test_qlora_training_on_qwen3(fixtures_root: Path, prepare: str) -> None:
    """Frozen SDNQ base (bf16, uint4+SVD), trainable adapters: non-zero adapter grads, loss falls, base intact."""
    model = load_lm(fixtures_root, "uint4_svd", torch.bfloat16)
    before = snapshot(model)
    if prepare == "sdnq":
        model = prepare_model_for_sdnq_training(model)
    else:  # PEFT's own recipe upcasts the bf16 SVD factors to float32: codes untouched, values equal
        model = prepare_model_for_kbit_training(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in sdnq_stored_tensors(model).values())
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(3, 280, (4, 32), generator=torch.Generator().manual_seed(1))
    peft_model.train()
    losses = []
    for step in range(25):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_B" in n}
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
            assert all(p.grad is None for p in sdnq_stored_tensors(model).values())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # measured 6.52 -> 0.60
    after = sdnq_stored_tensors(model)
    if prepare == "sdnq":
        assert_same_bytes(model, before)
    else:
        for key, value in before.items():
            assert after[key].dtype == value.dtype or key.endswith(("svd_up", "svd_down")), key
            assert torch.equal(after[key].to(value.dtype), value), key


def test_diffusers_transformer_training(fixtures_root: Path) -> None:
    """``transformer.add_adapter`` on an SDNQ Flux.2 transformer (as diffusers' training scripts do)."""
    transformer = load_pipe(fixtures_root, "flux2_klein", "dynamic").transformer
    before = snapshot(transformer)
    transformer.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                       target_modules=sorted(sdnq_layers(transformer))))
    assert set(wrapped_sdnq(transformer)) == {n.replace(".base_layer", "") for n in sdnq_layers(transformer)}
    gen = torch.Generator().manual_seed(2)
    inputs = {"hidden_states": torch.randn(1, 16, 16, generator=gen),
              "encoder_hidden_states": torch.randn(1, 8, 192, generator=gen), "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(16, 4), "txt_ids": torch.zeros(8, 4), "guidance": None}
    target = torch.randn(1, 16, 16, generator=gen)
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    transformer.train()
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(transformer(**inputs).sample, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert_same_bytes(transformer, before)


# ------------------------------------------------------------------------------------------------------- refusals
def test_refusals_name_the_problem(fixtures_root: Path) -> None:
    model = load_lm(fixtures_root, "uint4_svd")
    with pytest.raises(SDNQAdapterError, match="init_lora_weights='pissa'"):
        get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(SDNQAdapterError, match="alora_invocation_tokens"):
        get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[5]))
    with pytest.raises(SDNQAdapterError, match="target_parameters"):
        get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=[],
                                                        target_parameters=["self_attn.q_proj.weight"]))

    with pytest.raises(SDNQAdapterError, match="IA3 adapters are not supported"):
        get_peft_model(copy.deepcopy(model), IA3Config(target_modules=["q_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"]))

    conv = nn.Conv2d(32, 32, 3, device="meta")
    layout = plan_layer("conv", tuple(conv.weight.shape), LayerOptions(weights_dtype="int8"))
    holder = nn.Module()
    holder.conv = SDNQConv2d.from_module(conv, layout, torch.float32)
    holder.conv.to_empty(device="cpu")
    quantize_into(holder.conv, "weight", torch.randn(32, 32, 3, 3))
    assert torch.isfinite(codec.dequantize(layout, holder.conv.sdnq_tensors(), torch.float32)).all()
    with pytest.raises(SDNQAdapterError, match="quantized SDNQConv2d 'conv'"):
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["conv"]), holder)


def test_install_is_idempotent_and_leaves_dense_layers_to_peft() -> None:
    from peft.tuners.lora.model import LoraModel

    from diffusers_sdnq.integrations.peft import install

    fn = LoraModel._create_new_module
    assert install() and install()
    assert LoraModel._create_new_module is fn
    holder = nn.Module()
    holder.proj = nn.Linear(8, 8)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"]), holder)
    assert type(holder.proj) is StockLoraLinear
    assert math.isfinite(holder.proj(torch.randn(2, 8)).sum().item())
