"""Checkpoints written by diffusers-sdnq load in the reference (sdnq 0.2.8) with bit-exact weights.

For every writer option: quantize the dense ``WriterToy`` (tests/writer_models.py) while loading it with
``from_pretrained(..., quantization_config=SDNQDiffusersConfig(...))``, ``save_pretrained`` it, then

* the reference, in a child process (``import sdnq``, its own diffusers quantizer), loads the folder; its
  dequantized weights must equal (``torch.equal``) the ones our loader gives for the same folder, and its
  forward must match ours;
* the same child quantizes the same dense weights with the reference itself, so the set of quantized layers
  must be identical and our reconstruction error per layer at most 1.05x the reference's (the table is printed);
* our own reload equals the in-memory quantized model (saving is lossless) and ``quantization_config.json``
  equals ``config.json``'s ``quantization_config``.
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
from writer_models import WriterToy, build_dense, inputs

#: name → (quantization kwargs, model dtype). Defaults of the config otherwise (minimum_allowed_numel 4096 so the
#: 96x128 embedding qualifies when quant_embedding is on).
BASE = {"minimum_allowed_numel": 4096}
CASES: dict[str, tuple[dict, str]] = {
    "int8": ({"weights_dtype": "int8"}, "float32"),
    "uint8": ({"weights_dtype": "uint8"}, "float32"),
    "int16": ({"weights_dtype": "int16"}, "float32"),
    "uint4": ({"weights_dtype": "uint4"}, "float32"),
    "int4-row": ({"weights_dtype": "int4", "group_size": -1}, "float32"),
    "uint3-g32": ({"weights_dtype": "uint3", "group_size": 32}, "float32"),
    "int2-tensor": ({"weights_dtype": "int2", "group_size": -2}, "float32"),
    "uint1": ({"weights_dtype": "uint1"}, "float32"),
    "uint5": ({"weights_dtype": "uint5"}, "float32"),
    "int6": ({"weights_dtype": "int6"}, "float32"),
    "uint7": ({"weights_dtype": "uint7"}, "float32"),
    "int12": ({"weights_dtype": "int12"}, "float32"),
    "uint10": ({"weights_dtype": "uint10"}, "float32"),
    "int15": ({"weights_dtype": "int15"}, "float32"),
    "fp8": ({"weights_dtype": "fp8"}, "float32"),
    "float8_e5m2": ({"weights_dtype": "float8_e5m2"}, "float32"),
    "float8_e4m3fn_sdnq": ({"weights_dtype": "float8_e4m3fn_sdnq"}, "float32"),
    "fp16": ({"weights_dtype": "float16"}, "float32"),
    "fp4": ({"weights_dtype": "fp4"}, "float32"),
    "float6_e3m2fn": ({"weights_dtype": "float6_e3m2fn"}, "float32"),
    "float5_e2m3fnu": ({"weights_dtype": "float5_e2m3fnu"}, "float32"),
    "float12_e4m7fn": ({"weights_dtype": "float12_e4m7fn"}, "float32"),
    "uint4-svd": ({"weights_dtype": "uint4", "use_svd": True, "svd_rank": 8}, "float32"),
    "int8-svd-matmul": ({"weights_dtype": "int8", "use_svd": True, "svd_rank": 16, "use_quantized_matmul": True},
                        "float32"),
    "uint4-hadamard": ({"weights_dtype": "uint4", "use_hadamard": True, "hadamard_group_size": 64}, "float32"),
    "int8-hadamard": ({"weights_dtype": "int8", "use_hadamard": True}, "float32"),
    "uint4-codebook": ({"weights_dtype": "uint4", "use_codebook": True}, "float32"),
    "uint3-codebook-row": ({"weights_dtype": "uint3", "use_codebook": True, "group_size": -1}, "float32"),
    "int8-matmul": ({"weights_dtype": "int8", "use_quantized_matmul": True}, "float32"),
    "uint8-matmul": ({"weights_dtype": "uint8", "use_quantized_matmul": True}, "float32"),
    "fp8-matmul": ({"weights_dtype": "float8_e4m3fn", "use_quantized_matmul": True}, "float32"),
    "int8-matmul-tensor": ({"weights_dtype": "int8", "use_quantized_matmul": True, "group_size": -2}, "float32"),
    "uint4-scale_uint8": ({"weights_dtype": "uint4", "scale_dtype": "uint8"}, "float32"),
    "uint4-cbscale_uint6": ({"weights_dtype": "uint4", "scale_dtype": "uint6", "use_codebook_scale": True},
                            "float32"),
    "uint4-zp_int8": ({"weights_dtype": "uint4", "zero_point_dtype": "int8"}, "float32"),
    "conv-embedding": ({"weights_dtype": "uint4", "quant_conv": True, "quant_embedding": True}, "float32"),
    "conv-int8-matmulconv": ({"weights_dtype": "int8", "quant_conv": True, "use_quantized_matmul_conv": True,
                              "group_size": -1}, "float32"),
    "overrides": ({"weights_dtype": "uint4", "modules_to_not_convert": ["blocks.1.gate"],
                   "modules_dtype_dict": {"int8": ["blocks.0.up.weight"], "minimum_6bit": ["down"]},
                   "modules_quant_config": {"blocks.*.odd": {"weights_dtype": "float6_e3m2fn", "use_svd": True,
                                                             "svd_rank": 4}},
                   "modules_to_not_use_matmul": ["blocks.0.gate"], "use_quantized_matmul": True}, "float32"),
    "no-skip-keys": ({"weights_dtype": "int8", "add_skip_keys": False, "minimum_allowed_numel": 0}, "float32"),
    "bf16-uint4-nofp32": ({"weights_dtype": "uint4", "dequantize_fp32": False}, "bfloat16"),
    "bf16-int8": ({"weights_dtype": "int8"}, "bfloat16"),
    "dynamic": ({"weights_dtype": "uint4", "use_dynamic_quantization": True, "dynamic_loss_threshold": 0.004},
                "float32"),
    "dynamic-auto-svd": ({"weights_dtype": "uint3", "use_dynamic_quantization": True, "use_svd": True,
                          "svd_rank": 8}, "float32"),
}
#: Layers a case leaves dense by their module name in modules_to_not_convert (transformers' convention, issue 15): the
#: reference ignores such a name and quantizes the layer; ours leaves it dense and records its full ".weight" name,
#: which the reference then honours on load (test_reference_loads_our_checkpoint_bit_exact).
MODULE_NAME_SKIPS = {"overrides": {"blocks.1.gate"}}
#: Quantized-matmul layouts: the reference's forward multiplies quantized activations, so only its weights are
#: exact; its outputs match ours to within activation-quantization noise (relative error below this).
MATMUL_OUT_TOL = 0.05

REF_CHILD = r'''
import copy, json, os, sys
os.environ["SDNQ_USE_TORCH_COMPILE"] = "0"
import torch
torch.set_num_threads(1)
import sdnq
from sdnq.dequantizer import dequantize_sdnq_model
from safetensors.torch import load_file, save_file
from writer_models import WriterToy, inputs
dense_dir, out_dir, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
x = inputs()
for case, (kwargs, dtype) in cases.items():
    folder = os.path.join(out_dir, case, "ckpt")
    res = {}
    # 1. the reference quantizes the same dense weights itself
    dense = WriterToy.from_pretrained(dense_dir, torch_dtype=getattr(torch, dtype)).eval()
    torch.manual_seed(0)
    cfg = sdnq.SDNQConfig(**kwargs)
    own = sdnq.sdnq_post_load_quant(dense, quantization_config=cfg, torch_dtype=getattr(torch, dtype))
    qnames = [n for n, m in own.named_modules() if hasattr(m, "sdnq_dequantizer")]
    qc = getattr(own.config, "quantization_config", None) or cfg
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    # 2. the reference reads what diffusers-sdnq wrote
    if kwargs.get("scale_dtype") or kwargs.get("zero_point_dtype"):
        # its diffusers loader drops double-quantized scales (its own files too): put our tensors into its layers
        model = copy.deepcopy(own)
        model.load_state_dict(load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")), strict=True)
        how = "load_state_dict"
    else:
        model = WriterToy.from_pretrained(folder).eval()
        how = "from_pretrained"
    names = [n for n, m in model.named_modules() if hasattr(m, "sdnq_dequantizer")]
    with torch.no_grad():
        y = model(**x)
    res.update({"out.0": y[0], "out.1": y[1]})
    deq = dequantize_sdnq_model(model)
    res.update({f"loaded::{n}": deq.get_submodule(n).weight.detach() for n in names})
    refdeq = dequantize_sdnq_model(own)
    res.update({f"own::{n}": refdeq.get_submodule(n).weight.detach() for n in qnames})
    save_file({k: v.contiguous().clone() for k, v in res.items()}, os.path.join(out_dir, case, "ref.safetensors"))
    meta = {"loaded": names, "own": qnames, "how": how, "own_config": json.loads(json.dumps(qc, default=str))}
    with open(os.path.join(out_dir, case, "ref.json"), "w") as fh:
        json.dump(meta, fh)
'''


def _quantize_ours(dense: Path, case: str, kwargs: dict, dtype: str, out: Path) -> dict:
    """Quantize-on-load with our writer, save; returns the in-memory dequantized weights and outputs."""
    from diffusers_sdnq.integrations.diffusers import SDNQDiffusersConfig
    from diffusers_sdnq.layers import sdnq_layers

    torch_dtype = getattr(torch, dtype)
    model = WriterToy.from_pretrained(str(dense), torch_dtype=torch_dtype,
                                      quantization_config=SDNQDiffusersConfig(**kwargs)).eval()
    model.save_pretrained(str(out / "ckpt"))
    return {n: layer.dequantize_weight(torch.float32) for n, layer in sdnq_layers(model).items()}


@pytest.fixture(scope="session")
def written(tmp_path_factory) -> dict:
    """Quantize every case with ours (in this process) and with the reference (one child process)."""
    root = tmp_path_factory.mktemp("writer")
    dense = build_dense(cache_root() / "writer_toy_dense")
    cases = {name: ({**BASE, **kwargs}, dtype) for name, (kwargs, dtype) in CASES.items()}
    memory = {}
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (kwargs, dtype) in cases.items():
            (root / name).mkdir()
            memory[name] = _quantize_ours(dense, name, kwargs, dtype, root / name)
    finally:
        torch.set_num_threads(prev)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SDNQ_USE_TORCH_COMPILE": "0",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", REF_CHILD, str(dense), str(root), json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"reference child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return {"root": root, "memory": memory, "dense": dense}


def _reload_ours(folder: Path) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from diffusers_sdnq.layers import sdnq_layers

    model = WriterToy.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = model(**inputs())
    return {n: layer.dequantize_weight() for n, layer in sdnq_layers(model).items()}, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_reference_loads_our_checkpoint_bit_exact(written: dict, case: str) -> None:
    folder = written["root"] / case
    ref = load_file(folder / "ref.safetensors")
    meta = json.loads((folder / "ref.json").read_text())
    ours, out = _reload_ours(folder / "ckpt")
    assert sorted(ours) == sorted(meta["loaded"]), "the reference and our loader see different quantized layers"
    assert ours, "no layer was quantized"
    bad = [n for n in ours if ours[n].dtype != ref[f"loaded::{n}"].dtype or not torch.equal(ours[n], ref[f"loaded::{n}"])]
    assert not bad, f"{len(bad)} layers decode differently in the reference: {bad[:5]}"
    kwargs = CASES[case][0]
    matmul = kwargs.get("use_quantized_matmul") or kwargs.get("use_quantized_matmul_conv")
    for i in range(2):
        got, want = out[i], ref[f"out.{i}"]
        if matmul:
            assert _rel(got, want) < MATMUL_OUT_TOL
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    memory = written["memory"][case]  # saving and reloading lost nothing
    assert sorted(memory) == sorted(ours)
    if CASES[case][1] == "float32":  # (a bf16 model computes its weights in bf16, the fp32 reload does not)
        for n in ours:
            assert torch.equal(memory[n], ours[n]), n


@pytest.mark.parametrize("case", list(CASES))
def test_same_layers_and_quality_as_reference(written: dict, case: str) -> None:
    """Same quantized layers (and dynamic choices) as the reference on the same weights; error ≤ 1.05x its error."""
    folder = written["root"] / case
    ref = load_file(folder / "ref.safetensors")
    meta = json.loads((folder / "ref.json").read_text())
    config = json.loads((folder / "ckpt" / "config.json").read_text())["quantization_config"]
    sidecar = json.loads((folder / "ckpt" / "quantization_config.json").read_text())
    assert sidecar == config
    assert config["sdnq_version"] == "0.2.8" and config["quant_method"] == "sdnq"
    ours = written["memory"][case]
    by_name = MODULE_NAME_SKIPS.get(case, set())
    own = set(meta["own"]) - by_name
    assert by_name <= set(meta["own"]), "the reference no longer quantizes a layer named by its module name"
    assert sorted(ours) == sorted(own), f"only ours: {sorted(set(ours) - own)}; only reference: {sorted(own - set(ours))}"
    assert set(config["modules_to_not_convert"]) == set(meta["own_config"]["modules_to_not_convert"]) | {
        f"{n}.weight" for n in by_name}
    if CASES[case][0].get("use_dynamic_quantization"):
        ours_dd = {n: k for k, names in config["modules_dtype_dict"].items() for n in names}
        ref_dd = {n: k for k, names in meta["own_config"]["modules_dtype_dict"].items() for n in names}
        agree = sum(ours_dd.get(n) == ref_dd[n] for n in ref_dd)
        print(f"\n{case}: dynamic choices agree on {agree}/{len(ref_dd)} layers")
        assert agree >= 0.95 * len(ref_dd), (ours_dd, ref_dd)
        return  # different types per layer: errors are not comparable
    dense = WriterToy.from_pretrained(str(written["dense"]), torch_dtype=getattr(torch, CASES[case][1])).state_dict()
    rows, worse = [], []
    for n in sorted(ours):
        w = dense[f"{n}.weight"].float()
        e_ours = (ours[n] - w).pow(2).mean().item()
        e_ref = (ref[f"own::{n}"].float() - w).pow(2).mean().item()
        ratio = e_ours / e_ref if e_ref > 0 else (1.0 if e_ours == 0 else float("inf"))
        rows.append(f"  {n:20s} ours {e_ours:.3e}  reference {e_ref:.3e}  ratio {ratio:.3f}")
        if ratio > 1.05:
            worse.append(n)
    print(f"\n{case} (MSE per layer):\n" + "\n".join(rows))
    assert not worse, f"worse than 1.05x the reference on {worse}"
