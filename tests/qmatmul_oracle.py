"""Reference outputs of the quantized matmul (``use_quantized_matmul=True``), written by ``sdnq`` in a child process.

Test support only: the installed reference (GPL-3.0) is used strictly as a black-box oracle through its public
entry points (``SDNQConfig`` / ``sdnq_post_load_quant`` via :mod:`oracle`, ``save_sdnq_model``,
transformers' ``from_pretrained`` with it registered and ``sdnq.loader.apply_sdnq_options_to_model``). Nothing of it is reproduced here.

Two kinds of fixtures, built once into ``<root>``:

* **Layers** (:data:`LAYER_CASES`): a seeded linear or convolution quantized by the reference, its stored tensors,
  a seeded input with at least 32 rows (the quantized matmul) and one with 16 rows (below the threshold), and the
  reference's forward outputs for both: ``<id>.safetensors`` (stored tensors, ``bias``, ``x``, ``y``, ``x_small``,
  ``y_small``) and ``<id>.json`` (quantization config, layer description). Cases marked ``apply`` are quantized
  *without* the quantized matmul and switched on afterwards with ``apply_sdnq_options_to_model``, as the model
  cards tell users to; the stored tensors are those of the checkpoint before the switch.
* **Models** (:data:`MODEL_VARIANTS`): the tiny Qwen3 causal LM of :mod:`tiny_models` quantized with
  ``use_quantized_matmul=True``, saved with ``save_sdnq_model``, and the logits of a 40-token prompt as the
  reference computes them (loaded by transformers with the reference registered) in float32, bfloat16 and float16 (``<variant>.logits.safetensors``;
  ``<variant>.refused.json`` lists the dtypes whose forward fails in the reference itself).

Command line (the child): ``python tests/qmatmul_oracle.py ROOT``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

FORMAT_VERSION = 3
TOKENS = (2, 24)  # the linear input: 48 rows in two batches
SMALL_TOKENS = 16
PROMPT_TOKENS = 40
MODEL_DTYPES = ("float32", "bfloat16", "float16")

_L = "linear"


def _case(cid: str, kind: str = _L, shape: tuple[int, ...] = (256, 128), **kw: Any) -> dict[str, Any]:
    kw.setdefault("use_quantized_matmul", kind == _L and not kw.get("apply"))
    if kind != _L:
        kw.setdefault("quant_conv", True)
        kw.setdefault("use_quantized_matmul_conv", True)
    return {"id": cid, "kind": kind, "shape": shape, **kw}


#: Single-layer cases: every path of the quantized matmul (weights used as stored, shifted, unpacked, re-quantized;
#: int8 / asymmetric 8-bit / fp8 / float16 activations; zero points; SVD; groups; model dtypes; convolutions).
LAYER_CASES: list[dict[str, Any]] = [
    _case("int8", weights_dtype="int8"),
    _case("int8-nobias", weights_dtype="int8", bias=False),
    _case("int8-svd", weights_dtype="int8", use_svd=True, svd_rank=8),
    _case("int8-g32", weights_dtype="int8", group_size=32),
    _case("int8-tensor", weights_dtype="int8", group_size=-2),
    _case("int8-scale_uint8", weights_dtype="int8", scale_dtype="uint8"),
    _case("int8-hadamard", weights_dtype="int8", use_hadamard=True),
    _case("int8-mm_uint8", weights_dtype="int8", quantized_matmul_dtype="uint8"),
    _case("int8-mm_fp8", weights_dtype="int8", quantized_matmul_dtype="float8_e4m3fn"),
    _case("uint8", weights_dtype="uint8"),
    _case("uint8-nobias", weights_dtype="uint8", bias=False),
    _case("uint8-svd", weights_dtype="uint8", use_svd=True, svd_rank=8),
    _case("uint8-mm_int8", weights_dtype="uint8", quantized_matmul_dtype="int8"),
    _case("int4", weights_dtype="int4"),
    _case("int4-row", weights_dtype="int4", group_size=-1),
    _case("uint4", weights_dtype="uint4"),
    _case("uint4-row", weights_dtype="uint4", group_size=-1),
    _case("uint4-row-svd-nobias", weights_dtype="uint4", group_size=-1, use_svd=True, svd_rank=8, bias=False),
    _case("uint4-svd", weights_dtype="uint4", use_svd=True, svd_rank=8),
    _case("uint4-mm_fp8", weights_dtype="uint4", quantized_matmul_dtype="float8_e4m3fn"),
    _case("int5", weights_dtype="int5"),
    _case("int6-row", weights_dtype="int6"),
    _case("uint3", weights_dtype="uint3"),
    _case("fp8", weights_dtype="float8_e4m3fn"),
    _case("fp8-in128", shape=(128, 128), weights_dtype="float8_e4m3fn"),
    _case("fp8-in384", shape=(384, 64), weights_dtype="float8_e4m3fn"),
    _case("fp8-svd", weights_dtype="float8_e4m3fn", use_svd=True, svd_rank=8),
    _case("fp8-g32", weights_dtype="float8_e4m3fn", group_size=32),
    _case("fp8_e5m2", weights_dtype="float8_e5m2"),
    _case("float6_e3m2fn", weights_dtype="float6_e3m2fn"),
    _case("float4_e2m1fn", weights_dtype="float4_e2m1fn"),
    _case("float16", weights_dtype="float16"),
    *[_case(f"{name}-{md}", weights_dtype=wd, model_dtype=md, **extra)
      for md in ("bfloat16", "float16")
      for name, wd, extra in (("int8", "int8", {}), ("uint8", "uint8", {}), ("fp8", "float8_e4m3fn", {}),
                              ("uint4-svd", "uint4", {"use_svd": True, "svd_rank": 8}))],
    _case("int8-bfloat16-nofp32", weights_dtype="int8", model_dtype="bfloat16", dequantize_fp32=False),
    _case("uint4-bfloat16-nofp32", weights_dtype="uint4", model_dtype="bfloat16", dequantize_fp32=False),
    # thresholds: no quantized matmul for these weights (out not a multiple of 16 / below 32)
    _case("int8-out40", shape=(256, 40), weights_dtype="int8"),
    _case("int8-out16", shape=(48, 16), weights_dtype="int8"),
    _case("int8-not_use_matmul", weights_dtype="int8", modules_to_not_use_matmul=("layer",)),
    # switched on after loading a checkpoint saved without it
    _case("apply-int8", weights_dtype="int8", apply=True),
    _case("apply-uint8", weights_dtype="uint8", apply=True),
    _case("apply-uint4-svd", weights_dtype="uint4", use_svd=True, svd_rank=8, apply=True),
    _case("apply-fp8", weights_dtype="float8_e4m3fn", apply=True),
    _case("apply-int8-not_use_matmul", weights_dtype="int8", modules_to_not_use_matmul=("layer",), apply=True),
    # convolutions saved with use_quantized_matmul_conv
    _case("conv2d-int8", "conv2d", (64, 64, 3), weights_dtype="int8"),
    _case("conv2d-uint8", "conv2d", (64, 64, 3), weights_dtype="uint8"),
    _case("conv2d-uint4", "conv2d", (64, 64, 3), weights_dtype="uint4"),
    _case("conv2d-fp8", "conv2d", (64, 64, 3), weights_dtype="float8_e4m3fn"),
    _case("conv1d-int8", "conv1d", (64, 64, 3), weights_dtype="int8"),
    _case("conv3d-int8", "conv3d", (32, 32, 3), weights_dtype="int8"),
]

#: Quantization kwargs of the tiny Qwen3 checkpoints (all with use_quantized_matmul=True).
MODEL_VARIANTS: dict[str, dict[str, Any]] = {
    "int8": {"weights_dtype": "int8"},
    "uint8": {"weights_dtype": "uint8"},
    "int4": {"weights_dtype": "int4"},
    "uint4": {"weights_dtype": "uint4"},
    "int5": {"weights_dtype": "int5"},
    "fp8": {"weights_dtype": "float8_e4m3fn"},
    "uint4_svd": {"weights_dtype": "uint4", "use_svd": True, "svd_rank": 8},
}


def layer_input(case: dict[str, Any], small: bool = False) -> torch.Tensor:
    """The seeded input of a layer case (rows of varying magnitude, so per-row scales differ)."""
    gen = torch.Generator().manual_seed(len(case["id"]) * 7919 + (1 if small else 0))
    dtype = getattr(torch, case.get("model_dtype", "float32"))
    channels = case["shape"][0]
    if case["kind"] == _L:
        lead = (SMALL_TOKENS,) if small else TOKENS
        x = torch.randn(*lead, channels, generator=gen)
        x = x * (0.5 + torch.rand(*lead, 1, generator=gen))
    else:
        spatial = {"conv1d": (40,), "conv2d": (7, 9), "conv3d": (5, 5, 6)}[case["kind"]]
        x = torch.randn(1 if small else 2, channels, *spatial, generator=gen)
    return x.to(dtype)


def prompt_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(17)
    return torch.randint(3, 280, (1, PROMPT_TOKENS), generator=gen)


def prompt_logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=prompt_ids()).logits.float()


# --------------------------------------------------------------------------------------------------- building
def _build_layer(case: dict[str, Any], root: Path) -> None:
    import oracle
    import sdnq.loader

    spec = dict(case)
    cid, kind, shape, apply = spec.pop("id"), spec.pop("kind"), tuple(spec.pop("shape")), spec.pop("apply", False)
    spec["model_dtype"] = getattr(torch, spec.get("model_dtype", "float32"))
    for key in ("modules_to_not_use_matmul",):
        if key in spec:
            spec[key] = tuple(spec[key])
    c = oracle.Case(id=cid, kind=kind, shape=shape, **spec)
    _, qmodel, config = oracle._quantize(c)
    stored = {k: v.detach().clone().contiguous() for k, v in qmodel.layer.state_dict().items() if v is not None}
    if apply:
        qmodel = sdnq.loader.apply_sdnq_options_to_model(qmodel, use_quantized_matmul=True)
    out = dict(stored)
    with torch.no_grad():
        for tag, small in (("", False), ("_small", True)):
            x = layer_input(case, small)
            out["x" + tag] = x
            out["y" + tag] = copy.deepcopy(qmodel).layer(x).contiguous()
    save_file(out, str(root / f"{cid}.safetensors"))
    meta = {"format_version": FORMAT_VERSION, "case": case, "quantization_config": config,
            "layer": c.layer_description()}
    (root / f"{cid}.json").write_text(json.dumps(meta, indent=1, default=str))


def _build_model(name: str, kwargs: dict[str, Any], dense: Path, root: Path) -> None:
    import sdnq  # noqa: F401  (registers the reference's transformers backend)
    import tiny_models as tm
    from transformers import AutoModelForCausalLM

    target = root / name
    tm.quantize_with_reference(dense, target, use_quantized_matmul=True, **kwargs)
    logits, refused = {}, {}
    for dtype in MODEL_DTYPES:
        # transformers' loader (the reference registered): its load_sdnq_model(dtype=...) leaves the activations in
        # float32 whatever the dtype; this path keeps the file's float32 scales and runs in the asked dtype
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=getattr(torch, dtype)).eval()
        try:
            logits[dtype] = prompt_logits(model)
        except RuntimeError as exc:  # the reference's own forward fails (fp8 layers in a bf16/fp16 model)
            refused[dtype] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    (root / f"{name}.refused.json").write_text(json.dumps(refused, indent=1))
    save_file(logits, str(root / f"{name}.logits.safetensors"))  # not in the folder: the loader reads every file


def build(root: str | os.PathLike) -> None:
    """Build every fixture missing under ``root`` (imports the reference: run in a child process)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tiny_models as tm

    torch.set_num_threads(1)
    root = Path(root)
    layers = root / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    for case in LAYER_CASES:
        if not (layers / f"{case['id']}.json").exists():
            _build_layer(case, layers)
    dense = root / "qwen3-dense"
    if not dense.is_dir():
        tm.build_qwen3_causal_lm(dense)
    for name, kwargs in MODEL_VARIANTS.items():
        if not (root / f"{name}.logits.safetensors").exists():
            _build_model(name, kwargs, dense, root)
    (root / "done.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))


if __name__ == "__main__":
    build(sys.argv[1])
