"""Whole pipelines / models loaded with diffusers-sdnq against the reference ``sdnq`` loader.

Every load runs in a child process: ours never has ``sdnq`` imported (asserted), the reference's child imports
only ``sdnq``. The children are started once per session, concurrently, and write per job (fixture, variant,
dtype) the dequantized weight of every SDNQ layer of every component plus the pipeline output / LM logits.

Oracles:
* weights: ``torch.equal`` with the reference loaded in float32 and dequantized (``dequantize_sdnq_model``).
  For our bfloat16 loads the reference's bf16 ``from_pretrained`` is no oracle (diffusers hands it every float
  companion, scales included, already rounded to bf16; ours keeps the file's fp32 scales). Its child instead loads
  the bf16 pipeline and swaps in the SDNQ layers of its own ``load_sdnq_model(dtype=bfloat16)``, which keeps the
  fp32 scales and, like its transformers path, bf16 SVD factors. Without SVD that equals fp32-dequantized-then-cast.
* outputs: ``assert_close`` with a tolerance a few ulps above the measured difference (exactly 0), far below what
  a wrong layer / dtype / scale produces.
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
from safetensors.torch import load_file
from tiny_models import get_fixture

PIPELINES = ("flux2_klein", "zimage", "flux1")
VARIANTS = ("uint4_svd", "dynamic", "int8")
BF16_VARIANTS = ("uint4_svd", "dynamic", "int8")  # flux2_klein only
VARIANT_SVD = {"uint4_svd": True, "dynamic": False, "int8": False}

# Output tolerance (float32 outputs of float32 and bfloat16 runs). Measured max |ours - reference|: exactly 0 on
# every pipeline / variant / dtype and on the qwen3 logits: both sides dequantize to the same weight and call
# F.linear, single-threaded, same process set-up. So only ~4 float32 ulps of slack: a 1% scale error in a single
# transformer layer moves the tiny outputs (|x| ~ 7) by only 5e-6 (flux2_klein) to 1e-5 (zimage), which this
# still catches (the weight tests catch it exactly); swapping variants moves them by 0.37-2.3.
OUT_TOL = {"rtol": 0.0, "atol": 2e-6}

#: (name, variant, dtype) per child; "ours" and "ref" do everything, "late" repeats one job with late import.
JOBS_OURS = [(n, v, "float32") for n in (*PIPELINES, "qwen3") for v in VARIANTS]
JOBS_OURS += [("flux2_klein", v, "bfloat16") for v in BF16_VARIANTS]
JOBS_REF = [*JOBS_OURS]
JOBS_LATE = [("flux2_klein", "uint4_svd", "float32")]
#: Forward mode per child. "ours" runs the bit-exact forward (SVD added to the weight, as the reference does), so
#: its outputs can be compared with the reference's to a few ulps; "late" runs the default forward (SVD as a
#: low-rank branch on the activations), which differs from the exact one by float rounding only.
CHILD_ENV = {"ours": {"DIFFUSERS_SDNQ_FORWARD": "svd=weight"}, "ref": {}, "late": {}}

CHILD = r'''
import importlib, json, os, sys
os.environ["SDNQ_USE_TORCH_COMPILE"] = "0"
mode, root, out_dir, jobs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
import torch
torch.set_num_threads(1)
if mode == "late":  # the libraries (and the auto-quantizer modules) first, diffusers_sdnq last
    import transformers, diffusers
    import diffusers.quantizers.auto, transformers.quantizers.auto
    from diffusers import DiffusionPipeline, Flux2KleinPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import diffusers_sdnq
elif mode == "ours":  # diffusers_sdnq first
    import diffusers_sdnq
    from diffusers import DiffusionPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer
else:
    import sdnq
    from sdnq.dequantizer import dequantize_sdnq_model
    from diffusers import DiffusionPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer
from pathlib import Path
from safetensors.torch import save_file
import tiny_models as tm

ours = mode != "ref"
if ours:
    from diffusers_sdnq.layers import SDNQLayerMixin, sdnq_layers

def components(obj):
    if isinstance(obj, torch.nn.Module):
        return {"model": obj}
    return {k: v for k, v in obj.components.items() if isinstance(v, torch.nn.Module)}

def collect(comps):
    """{component/layer: dense weight} and {component: count}, dequantizing with our layers or the reference."""
    weights, counts = {}, {}
    for cname, module in comps.items():
        if ours:
            # no reference layer (ours carry a sdnq_dequantizer view too, for code written for the reference)
            assert not any(hasattr(m, "sdnq_dequantizer") and not isinstance(m, SDNQLayerMixin)
                           for m in module.modules()), cname
            layers = sdnq_layers(module)
            for lname, layer in layers.items():
                weights[f"{cname}/{lname}"] = layer.dequantize_weight().contiguous()
            counts[cname] = len(layers)
        else:
            names = [n for n, m in module.named_modules() if hasattr(m, "sdnq_dequantizer")]
            counts[cname] = len(names)
            if names:
                module = dequantize_sdnq_model(module)
                for lname in names:
                    weights[f"{cname}/{lname}"] = module.get_submodule(lname).weight.detach().contiguous()
    return weights, counts

meta = {}
for name, variant, dtype in jobs:
    tag = f"{name}-{variant}-{dtype}"
    path = tm.fixture_path(name, variant, root)
    torch_dtype = getattr(torch, dtype)
    if not ours and dtype != "float32":
        # reference bf16 without the lossy diffusers cast: its bf16 pipeline, with every SDNQ layer swapped for
        # the one its own loader builds (load_sdnq_model keeps the file's fp32 scales; SVD factors in bf16)
        pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch_dtype)
        for cname, spec in json.loads(Path(path, "model_index.json").read_text()).items():
            cfg = Path(path, cname, "config.json")
            if isinstance(spec, list) and cfg.is_file() and "quantization_config" in json.loads(cfg.read_text()):
                cls = getattr(importlib.import_module(spec[0]), spec[1])
                exact = sdnq.load_sdnq_model(str(path / cname), model_cls=cls, dtype=torch_dtype)
                target = getattr(pipe, cname)
                for lname, layer in exact.named_modules():
                    if hasattr(layer, "sdnq_dequantizer"):
                        assert hasattr(target.get_submodule(lname), "sdnq_dequantizer"), lname
                        parent, _, child = lname.rpartition(".")
                        setattr(target.get_submodule(parent) if parent else target, child, layer)
        outputs = {"output": tm.run_pipeline(pipe, seed=0)}
        comps = components(pipe)
    elif tm.is_pipeline_dir(path):
        pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch_dtype)
        outputs = {"output": tm.run_pipeline(pipe, seed=0)}
        comps = components(pipe)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype).eval()
        logits, generated = tm.run_causal_lm(model, AutoTokenizer.from_pretrained(str(path)))
        outputs = {"logits": logits, "generated": generated}
        comps = components(model)
    weights, counts = collect(comps)
    save_file(weights, os.path.join(out_dir, tag + ".weights.safetensors"))
    save_file({k: v.contiguous() for k, v in outputs.items()}, os.path.join(out_dir, tag + ".out.safetensors"))
    meta[tag] = {"counts": counts, "weight_dtypes": sorted({str(w.dtype) for w in weights.values()})}
meta["_modules"] = {
    "sdnq": sorted(m for m in sys.modules if m == "sdnq" or m.startswith("sdnq.")),
    "diffusers_sdnq": "diffusers_sdnq" in sys.modules,
}
Path(out_dir, "meta.json").write_text(json.dumps(meta))
'''


class Child:
    """Output folder of one finished child (or the failure text to report in each test that needs it)."""

    def __init__(self, out: Path, error: str | None):
        self.out, self.error = out, error

    def _ok(self) -> Path:
        if self.error:
            pytest.fail(self.error)
        return self.out

    def meta(self) -> dict:
        return json.loads((self._ok() / "meta.json").read_text())

    def weights(self, tag: str) -> dict[str, torch.Tensor]:
        return load_file(self._ok() / f"{tag}.weights.safetensors")

    def outputs(self, tag: str) -> dict[str, torch.Tensor]:
        return load_file(self._ok() / f"{tag}.out.safetensors")


@pytest.fixture(scope="session")
def children(fixtures_root: Path) -> dict[str, Child]:
    """Build the fixtures (once) and run the three children concurrently: ours, the reference, ours late-imported."""
    for name in (*PIPELINES, "qwen3"):
        for variant in VARIANTS:
            get_fixture(name, variant, fixtures_root)
    base = cache_root() / "pipeline_children"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SDNQ_USE_TORCH_COMPILE": "0",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    procs = {}
    for mode, jobs in (("ours", JOBS_OURS), ("ref", JOBS_REF), ("late", JOBS_LATE)):
        out = base / mode
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.iterdir():
            stale.unlink()
        cmd = [sys.executable, "-c", CHILD, mode, str(fixtures_root), str(out), json.dumps(jobs)]
        with open(out / "log.txt", "w") as log:  # a file, not a pipe: nothing blocks on a full pipe buffer
            procs[mode] = (out, subprocess.Popen(cmd, env={**env, **CHILD_ENV[mode]}, stdout=log,
                                                 stderr=subprocess.STDOUT))
    result = {}
    for mode, (out, proc) in procs.items():
        proc.wait(timeout=600)
        error = None
        if proc.returncode != 0:
            log = (out / "log.txt").read_text(errors="replace")
            error = f"child {mode!r} failed ({proc.returncode}):\n{log[-6000:]}"
        result[mode] = Child(out, error)
    return result


def _tag(name: str, variant: str, dtype: str = "float32") -> str:
    return f"{name}-{variant}-{dtype}"


def _assert_weights_equal(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == ref.keys(), (f"only ours: {sorted(ours.keys() - ref.keys())[:10]}; "
                                       f"only reference: {sorted(ref.keys() - ours.keys())[:10]}")
    assert ours, "no quantized layer at all"
    bad = []
    for key in sorted(ref):
        a, b = ours[key], ref[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            bad.append(f"{key}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(a, b):
            diff = (a.float() - b.float()).abs()
            bad.append(f"{key}: {int((diff > 0).sum())}/{diff.numel()} differ, max {diff.max():.3g}")
    assert not bad, f"{len(bad)} of {len(ref)} layers differ:\n" + "\n".join(bad[:20])


# ------------------------------------------------------------------------------------------------------------ isolation
def test_our_children_never_import_sdnq(children: dict[str, Child]) -> None:
    for mode in ("ours", "late"):
        meta = children[mode].meta()
        assert meta["_modules"]["sdnq"] == [], f"{mode}: the reference was imported: {meta['_modules']['sdnq']}"
        assert meta["_modules"]["diffusers_sdnq"]
    ref = children["ref"].meta()["_modules"]
    assert ref["sdnq"] and not ref["diffusers_sdnq"], "the oracle child must run the reference alone"


# ------------------------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", (*PIPELINES, "qwen3"))
def test_weights_bit_exact_float32(children: dict[str, Child], fixtures_root: Path, name: str, variant: str) -> None:
    tag = _tag(name, variant)
    _assert_weights_equal(children["ours"].weights(tag), children["ref"].weights(tag))
    ours_counts = children["ours"].meta()[tag]["counts"]
    ref_counts = children["ref"].meta()[tag]["counts"]
    assert ours_counts == ref_counts
    summary = json.loads((get_fixture(name, variant, fixtures_root) / "reference_summary.json").read_text())
    assert {k: v["quantized"] for k, v in summary.items()} == {k: v for k, v in ours_counts.items() if v}
    assert children["ours"].meta()[tag]["weight_dtypes"] == ["torch.float32"]


@pytest.mark.parametrize("variant", BF16_VARIANTS)
def test_weights_bit_exact_bfloat16(children: dict[str, Child], variant: str) -> None:
    """Ours in bf16 == the reference's SDNQ layers from its own ``load_sdnq_model(dtype=bfloat16)``.

    (Not the layers of the reference's bf16 ``DiffusionPipeline.from_pretrained``: diffusers hands it every float
    companion, scales included, already rounded to bf16.) Without SVD this also equals the fp32 reference cast to
    bf16; with SVD it does not, because the reference keeps the SVD factors in the model dtype (bf16).
    """
    tag = _tag("flux2_klein", variant, "bfloat16")
    ours = children["ours"].weights(tag)
    _assert_weights_equal(ours, children["ref"].weights(tag))
    assert children["ours"].meta()[tag]["counts"] == children["ref"].meta()[tag]["counts"]
    assert children["ours"].meta()[tag]["weight_dtypes"] == ["torch.bfloat16"]
    ref32 = {k: v.to(torch.bfloat16) for k, v in children["ref"].weights(_tag("flux2_klein", variant)).items()}
    if VARIANT_SVD[variant]:
        for key, value in ref32.items():  # same weights up to bf16 SVD-term rounding
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0.05)
    else:
        _assert_weights_equal(ours, ref32)


# ------------------------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_output_matches_reference(children: dict[str, Child], name: str, variant: str) -> None:
    ours = children["ours"].outputs(_tag(name, variant))["output"]
    ref = children["ref"].outputs(_tag(name, variant))["output"]
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    torch.testing.assert_close(ours, ref, **OUT_TOL)


@pytest.mark.parametrize("variant", BF16_VARIANTS)
def test_pipeline_output_bfloat16_matches_reference(children: dict[str, Child], variant: str) -> None:
    """Our bf16 pipeline vs the reference's bf16 pipeline carrying its loader's exact SDNQ layers (see the child)."""
    ours = children["ours"].outputs(_tag("flux2_klein", variant, "bfloat16"))["output"]
    ref = children["ref"].outputs(_tag("flux2_klein", variant, "bfloat16"))["output"]
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, **OUT_TOL)
    fp32 = children["ours"].outputs(_tag("flux2_klein", variant))["output"]
    assert not torch.allclose(ours, fp32, rtol=0, atol=1e-3), "the bf16 load did not run in bf16"


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_lm_matches_reference(children: dict[str, Child], variant: str) -> None:
    ours = children["ours"].outputs(_tag("qwen3", variant))
    ref = children["ref"].outputs(_tag("qwen3", variant))
    torch.testing.assert_close(ours["logits"], ref["logits"], **OUT_TOL)
    assert torch.equal(ours["generated"], ref["generated"])


# ------------------------------------------------------------------------------------------------------------ import order
def test_import_order_does_not_matter(children: dict[str, Child]) -> None:
    """diffusers_sdnq imported after transformers/diffusers (and their quantizer maps) loads identically.

    The late child also runs the default forward (SVD on the activations) where the early one runs the exact
    one: same weights bit for bit, outputs equal up to float rounding (measured max |diff| ~1e-5 on outputs of
    |x| ~ 7), far below what a wrong layer or variant moves them (0.37-2.3)."""
    tag = _tag("flux2_klein", "uint4_svd")
    late, early = children["late"], children["ours"]
    assert late.meta()[tag]["counts"] == early.meta()[tag]["counts"]
    assert all(late.meta()[tag]["counts"][c] for c in ("transformer", "text_encoder"))
    _assert_weights_equal(late.weights(tag), early.weights(tag))
    fast, exact = late.outputs(tag)["output"], early.outputs(tag)["output"]
    assert not torch.equal(fast, exact), "the late child should have run the default (low-rank SVD) forward"
    torch.testing.assert_close(fast, exact, rtol=0.0, atol=1e-4)
    ref = children["ref"].outputs(tag)["output"]
    torch.testing.assert_close(fast, ref, rtol=0.0, atol=1e-4)
