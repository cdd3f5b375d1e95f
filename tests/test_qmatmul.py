"""The quantized matmul (``layers/qmatmul.py``) against the reference's forward on checkpoints it wrote with
``use_quantized_matmul=True``.

Oracles: the reference's own forward outputs (``tests/qmatmul_oracle.py``, built in a child process: single
layers with 48 and 16 input rows, tiny Qwen3 logits in float32 / bfloat16 / float16), and for the switches and
fallbacks ``F.linear`` on our bit-exact ``dequantize_weight()`` or another path of the same product.

Measured on the development machine: every layer case and every logit is bit-identical to the reference (the
same torch operations in the same order; oneDNN's int8 product returns the exact int32 sums). The contract is
1e-4 relative; the tests check that, and exactness where the path is integer-exact (the int8 products).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import qmatmul_oracle as qo
import torch
import torch.nn.functional as F
from conftest import TESTS, cache_root
from safetensors.torch import load_file

from diffusers_sdnq.format import check_stored, layer_kind_of, plan_layer
from diffusers_sdnq.format.config import QuantConfig
from diffusers_sdnq.layers import SDNQ_CLASSES, SDNQLayerMixin, assign_stored_tensor, qmatmul
from diffusers_sdnq.layers.forward import ForwardOptions, options_from_env, set_forward_options

REL_TOL = 1e-4


def _root():
    root = cache_root() / "qmatmul"
    if not (root / "done.json").exists() or json.loads((root / "done.json").read_text()).get(
            "format_version") != qo.FORMAT_VERSION:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFUSERS_SDNQ_AUTOLOAD": "0",
               "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, str(TESTS / "qmatmul_oracle.py"), str(root)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the quantized-matmul oracle failed:\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
    return root


ROOT = _root()
CASES = {c["id"]: c for c in qo.LAYER_CASES}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def load_case(cid: str) -> tuple[SDNQLayerMixin, dict[str, torch.Tensor], dict]:
    """Our quantized layer for a case, built from its config and stored tensors (as a checkpoint load would)."""
    meta = json.loads((ROOT / "layers" / f"{cid}.json").read_text())
    data = load_file(ROOT / "layers" / f"{cid}.safetensors")
    desc = meta["layer"]
    kind = layer_kind_of(desc["class_name"])
    cls = getattr(torch.nn, desc["class_name"])
    with torch.device("meta"):
        dense = cls(*desc["args"], bias=desc["bias"])
    config = QuantConfig.from_dict(meta["quantization_config"])
    layout = plan_layer(kind, tuple(dense.weight.shape), config.options_for(desc["param_name"], kind))
    stored = {k: v for k, v in data.items() if not k.startswith(("x", "y"))}
    layout = check_stored(layout, {k: v for k, v in stored.items() if k != "bias"}, prefix="layer.")
    layer = SDNQ_CLASSES[cls].from_module(dense, layout, getattr(torch, desc["model_dtype"]))
    for name, value in stored.items():
        assign_stored_tensor(layer, name, value)
        layer._parameters[name] = torch.nn.Parameter(value, requires_grad=False)  # the file's exact tensors
    return layer, data, meta


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the products that go through the quantized matmul."""
    calls: list[int] = []
    original = qmatmul.matmul_2d

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(qmatmul, "matmul_2d", counted)
    return calls


# ------------------------------------------------------------------------------------------------ single layers
SKIPPED_CASES = ("int8-out40", "int8-out16", "int8-not_use_matmul", "apply-int8-not_use_matmul", "apply-fp8")
QMM_CASES = [c for c in CASES if c not in SKIPPED_CASES]


@pytest.mark.parametrize("cid", QMM_CASES)
def test_layer_matches_reference_forward(cid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    layer, data, _ = load_case(cid)
    if CASES[cid].get("apply"):
        assert qmatmul.skip_reason(layer, switched_on=True) is None
        set_forward_options(layer, quantized_matmul=True)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        ours = layer(data["x"])
    assert calls, "the quantized matmul was not used"
    assert ours.dtype == data["y"].dtype and ours.shape == data["y"].shape
    rel = _rel(ours, data["y"])
    assert rel <= REL_TOL, f"{cid}: relative difference {rel:.3g} from the reference's forward"
    assert torch.equal(ours, data["y"]), f"{cid}: within {REL_TOL} ({rel:.3g}) but not bit-identical"


@pytest.mark.parametrize("cid", [c for c in CASES if CASES[c]["kind"] == "linear"])
def test_below_32_rows_the_dequantize_path_runs(cid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 input rows: no quantized matmul, the reference's dequantize path (same weights, float sums). SVD layers
    in 16-bit dtypes use the bit-exact ``svd="weight"`` forward here: the default low-rank branch differs from the
    reference's weight-side SVD by a bfloat16 ulp here and there (layers/forward.py)."""
    layer, data, _ = load_case(cid)
    if CASES[cid].get("apply"):
        set_forward_options(layer, quantized_matmul=True)
    if layer.sdnq_layout.svd_rank and data["x_small"].dtype != torch.float32:
        set_forward_options(layer, svd="weight")
    calls = _spy(monkeypatch)
    with torch.no_grad():
        ours = layer(data["x_small"])
    assert not calls
    assert _rel(ours, data["y_small"]) <= REL_TOL
    dense = F.linear(data["x_small"], layer.dequantize_weight(data["x_small"].dtype),
                     layer.bias.to(data["x_small"].dtype) if layer.bias is not None else None)
    assert _rel(ours, dense) <= 1e-6


@pytest.mark.parametrize("cid", SKIPPED_CASES)
def test_layers_that_cannot_use_it_dequantize_and_say_why(cid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Odd or small weights, modules_to_not_use_matmul, and (as the reference on CPU) an fp8 matmul switched on
    after loading: the dequantize path, as the reference's forward."""
    layer, data, _ = load_case(cid)
    reason = qmatmul.skip_reason(layer, switched_on=True)
    assert reason is not None
    assert ("modules_to_not_use_matmul" in reason) == ("not_use_matmul" in cid)
    assert ("fp8" in reason) == ("fp8" in cid)
    set_forward_options(layer, quantized_matmul=True)  # asked for, still not possible
    calls = _spy(monkeypatch)
    with torch.no_grad():
        ours = layer(data["x"])
    assert not calls
    assert _rel(ours, data["y"]) <= REL_TOL


def test_switching_off_gives_the_dequantize_path() -> None:
    layer, data, _ = load_case("int8")
    set_forward_options(layer, quantized_matmul=False)
    with torch.no_grad():
        off = layer(data["x"])
        dense = F.linear(data["x"], layer.dequantize_weight(), layer.bias)
    assert torch.equal(off, dense)
    # the quantized matmul really is another computation: per-token int8 activations cost accuracy
    assert 1e-4 < _rel(off, data["y"]) < 0.05


@pytest.mark.parametrize("cid", ["int8", "uint8", "uint4", "uint4-svd", "int5", "fp8", "float6_e3m2fn"])
def test_cache_settings_give_identical_outputs(cid: str) -> None:
    """Packed oneDNN weights (default), re-quantized copies kept (True) and nothing kept (False, torch._int_mm)
    compute the same exact integer products."""
    layer, data, _ = load_case(cid)
    outs = {}
    for cache in (None, True, False):
        set_forward_options(layer, quantized_matmul_cache=cache)
        with torch.no_grad():
            outs[cache] = layer(data["x"])
            again = layer(data["x"])  # from the cache, where one is kept
        assert torch.equal(outs[cache], again)
        kept = "_sdnq_qmm_cache" in layer.__dict__
        assert kept == (cache is True or cache is None and qmatmul._direct_8bit(layer) and
                        qmatmul.onednn_packable(qmatmul.prepare(layer))) or cache is None and kept
    assert torch.equal(outs[None], outs[True]) and torch.equal(outs[None], outs[False])
    assert torch.equal(outs[None], data["y"])


def test_fallback_without_onednn_or_int_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without oneDNN the product runs on torch._int_mm; without that, in float64 (exact for these sums)."""
    layer, data, _ = load_case("uint8")
    monkeypatch.setattr(qmatmul, "_onednn_available", lambda: False)
    with torch.no_grad():
        assert torch.equal(layer(data["x"]), data["y"])

    def broken(*args, **kwargs):
        raise RuntimeError("no int8 matmul here")

    monkeypatch.setattr(torch, "_int_mm", broken)
    set_forward_options(layer, quantized_matmul_cache=False)
    with torch.no_grad():
        assert torch.equal(layer(data["x"]), data["y"])


def test_cache_follows_the_stored_tensors() -> None:
    """A changed scale (e.g. a state dict loaded in place) is not served from a stale cache."""
    layer, data, _ = load_case("int8")
    with torch.no_grad():
        first = layer(data["x"])
        layer.scale.mul_(2)
        second = layer(data["x"])
    assert _rel(second, 2 * first - (layer.bias if layer.bias is not None else 0)) < 1e-6


def test_autograd_uses_the_dequantize_path() -> None:
    layer, data, _ = load_case("int8")
    x = data["x"].clone().requires_grad_(True)
    y = layer(x)
    y.sum().backward()
    assert x.grad is not None
    assert torch.equal(y.detach(), F.linear(data["x"], layer.dequantize_weight(), layer.bias))


def _resident_kib(ptr: int) -> int:
    """Resident kB of the file mapping holding ``ptr`` (Linux /proc/self/smaps)."""
    current = None
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:
                lo, _, hi = head[0].partition("-")
                current = int(lo, 16) <= ptr < int(hi, 16)
            elif current and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


def test_packed_copy_releases_mapped_pages(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the codes in a checkpoint's memory map, packing them for oneDNN hands the map's pages back (they are
    read again from the file when needed)."""
    if not qmatmul._onednn_available() or not sys.platform.startswith("linux"):
        pytest.skip("no oneDNN in this torch build, or no /proc/self/smaps")
    import numpy as np

    layer, data, _ = load_case("int8")
    big = torch.randint(-127, 127, (4096, 4096), dtype=torch.int8)  # 16 MB: whole pages, well above noise
    path = tmp_path / "w.bin"
    big.numpy().tofile(path)
    os.sync()  # written back: otherwise the page cache's pages count as dirty in the mapping
    mapped = torch.from_numpy(np.memmap(path, dtype=np.int8, mode="c", shape=(4096, 4096)))  # a clean file map
    int(mapped.sum())  # every page read: resident
    before = _resident_kib(mapped.data_ptr())
    assert before > 8000
    mw = qmatmul.MatmulWeight(integer=True, asymmetric=False, codes=mapped.t(), scale=torch.ones(1, 4096),
                              source=mapped)
    qmatmul.pack(mw)
    assert _resident_kib(mapped.data_ptr()) < before / 4
    assert torch.equal(mapped, big)  # read back from the file
    # and through a layer: same outputs with the packed copy
    set_forward_options(layer, quantized_matmul_cache=True)
    with torch.no_grad():
        assert torch.equal(layer(data["x"]), data["y"])


def test_packing_waits_until_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default stored 8-bit codes are multiplied unpacked until those products have cost what packing costs
    (then packed): expensive packing is never done, cheap packing at once; the outputs never change."""
    if not qmatmul._onednn_available():
        pytest.skip("no oneDNN in this torch build")
    layer, data, _ = load_case("int8")
    monkeypatch.setattr(qmatmul, "_PACK_SECONDS_PER_WEIGHT", [1.0])  # a second per weight: never worth it
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(layer(data["x"]), data["y"])
    mw = layer.__dict__["_sdnq_qmm_cache"][1]
    assert mw.packed is None and mw.pack_later and mw.unpacked_seconds > 0
    monkeypatch.setattr(qmatmul, "_PACK_SECONDS_PER_WEIGHT", [0.0])
    with torch.no_grad():
        assert torch.equal(layer(data["x"]), data["y"])  # this call pays: packed after it
        assert mw.packed is not None and not mw.pack_later
        assert torch.equal(layer(data["x"]), data["y"])


# ------------------------------------------------------------------------------------------------ options
def test_options_from_env_reads_the_switches() -> None:
    assert options_from_env("quantized_matmul=1").quantized_matmul is True
    assert options_from_env("quantized_matmul=0,quantized_matmul_cache=1") == ForwardOptions(
        quantized_matmul=False, quantized_matmul_cache=True)
    assert options_from_env("quantized_matmul=auto").quantized_matmul is None


# ------------------------------------------------------------------------------------------------ tiny models
MODEL_CASES = [(v, d) for v in qo.MODEL_VARIANTS for d in qo.MODEL_DTYPES]


def _refused(variant: str) -> dict[str, str]:
    path = ROOT / f"{variant}.refused.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _load_ours(variant: str, dtype: str):
    from transformers import AutoModelForCausalLM

    import diffusers_sdnq  # noqa: F401  (registers the backend)

    return AutoModelForCausalLM.from_pretrained(str(ROOT / variant), dtype=getattr(torch, dtype)).eval()


@pytest.mark.parametrize(("variant", "dtype"), MODEL_CASES)
def test_tiny_model_logits_match_the_reference(variant: str, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if dtype in _refused(variant):
        pytest.skip(f"the reference's own forward fails here: {_refused(variant)[dtype]}")
    expected = load_file(ROOT / f"{variant}.logits.safetensors")[dtype]
    model = _load_ours(variant, dtype)
    calls = _spy(monkeypatch)
    logits = qo.prompt_logits(model)
    eligible = [m for m in model.modules() if isinstance(m, SDNQLayerMixin) and qmatmul.eligible(m)]
    assert eligible and len(calls) == len(eligible), "every eligible layer uses the quantized matmul by default"
    rel = _rel(logits, expected)
    assert rel <= REL_TOL, f"{variant} {dtype}: logits differ from the reference's by {rel:.3g} (relative)"


def test_switching_a_model_per_layer_pattern(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from diffusers_sdnq import apply_sdnq_options_to_model, enable_quantized_matmul

    model = _load_ours("int8", "float32")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SDNQLayerMixin)}
    eligible = {n for n, m in layers.items() if qmatmul.eligible(m)}
    calls = _spy(monkeypatch)
    enable_quantized_matmul(model, False, modules="mlp")
    qo.prompt_logits(model)
    assert len(calls) == len([n for n in eligible if ".mlp." not in n]) > 0
    calls.clear()
    assert apply_sdnq_options_to_model(model, use_quantized_matmul=False) is model
    off = qo.prompt_logits(model)
    assert not calls
    with caplog.at_level(logging.INFO, logger="diffusers_sdnq"):
        apply_sdnq_options_to_model(model, use_quantized_matmul=True)
    on = qo.prompt_logits(model)
    assert len(calls) == len(eligible)
    expected = load_file(ROOT / "int8.logits.safetensors")["float32"]
    assert _rel(on, expected) <= REL_TOL and _rel(off, expected) > REL_TOL
    set_forward_options(model, quantized_matmul=None)  # back to what the checkpoint says (on)
    calls.clear()
    qo.prompt_logits(model)
    assert len(calls) == len(eligible)


def test_skip_report_names_layers_and_reasons(caplog) -> None:
    from diffusers_sdnq import enable_quantized_matmul

    model = _load_ours("uint4_svd", "float32")
    with caplog.at_level(logging.INFO, logger="diffusers_sdnq"):
        skipped = enable_quantized_matmul(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SDNQLayerMixin)}
    for name, layer in layers.items():
        out, inp = layer.sdnq_layout.weight_shape[0], layer.sdnq_layout.weight_shape[1]
        fits = out >= 32 and inp >= 32 and out % 16 == 0 and inp % 16 == 0
        assert (name in skipped) == (not fits or layer.sdnq_layout.kind != "linear")
    for name, why in skipped.items():
        assert name in caplog.text and why in caplog.text


def test_apply_options_dtype_and_fp32_scales() -> None:
    from diffusers_sdnq import apply_sdnq_options_to_model

    model = _load_ours("int8", "float32")
    apply_sdnq_options_to_model(model, dtype=torch.bfloat16, dequantize_fp32=False)
    layer = next(m for m in model.modules() if isinstance(m, SDNQLayerMixin))
    assert layer.compute_dtype == torch.bfloat16 and layer.scale.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.int8
    logits = qo.prompt_logits(model)
    expected = load_file(ROOT / "int8.logits.safetensors")["float32"]
    assert 0 < _rel(logits, expected) < 0.05  # bfloat16 arithmetic, same model
    apply_sdnq_options_to_model(model, dequantize_fp32=True)
    assert layer.scale.dtype == torch.float32
