"""Reference-quantized single layers for the SDNQ format conformance matrix.

This module is test support only. It uses the installed ``sdnq`` package (GPL-3.0) strictly as a
black-box oracle through its public entry points (``SDNQConfig``, ``sdnq_post_load_quant``,
``dequantize_sdnq_model``) and reads its dtype table to enumerate the dtype names. Nothing of the
reference's implementation is reproduced here.

For every :class:`Case`, :func:`make_reference` builds a small seeded dense layer, quantizes it with the
reference, and writes three files into a directory:

* ``<id>.safetensors``          the quantized layer's state dict, keys without module prefix
                                 (``weight``, ``scale``, ``zero_point``, ``svd_up``, ``svd_down``,
                                 ``scale_2``, ``scale_zero_point``, ``zero_point_scale``, ``zero_point_2``,
                                 ``bias``);
* ``<id>.expected.safetensors`` ``weight`` = the reference's dequantized weight (model dtype),
                                 ``original_weight`` / ``original_bias`` = the dense layer before quantization,
                                 ``input`` / ``output`` = a seeded input and the quantized layer's forward
                                 output (absent when the reference's forward fails on this machine);
* ``<id>.json``                 ``quantization_config`` (the dict the reference serializes), the layer
                                 description (kind, class name, constructor args, model dtype, module name),
                                 the stored tensors' dtypes/shapes, and ``reference_debug`` (the reference's
                                 own per-layer decisions, for error messages only; never decode from it).

The quantized layer sits in a one-child container under the name :data:`MODULE_NAME`, so name-based
options (``modules_quant_config``, ``modules_dtype_dict``, ``modules_to_not_use_matmul``) see the
parameter name ``"layer.weight"``. Config keys that list parameter names use that full name.

Notes on driving the reference (0.2.8):

* ``sdnq_post_load_quant(model, **kwargs)`` silently drops ``scale_dtype`` and ``zero_point_dtype``
  (they fall into ``**kwargs`` and are not forwarded to ``SDNQConfig``). This module therefore always
  builds an ``SDNQConfig`` and passes it as ``quantization_config=``.
* ``sdnq_post_load_quant`` only walks children, so a bare layer passed as the model is never quantized;
  hence the container.
* A failing SVD is swallowed by the reference (the layer is quantized without SVD); we check for it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

MODULE_NAME = "layer"
PARAM_NAME = MODULE_NAME + ".weight"
ORACLE_FORMAT_VERSION = 1

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}

# Reference tensor keys that can appear on a quantized layer (besides "bias").
QUANT_KEYS = (
    "weight", "scale", "zero_point", "svd_up", "svd_down",
    "scale_2", "scale_zero_point", "zero_point_scale", "zero_point_2",
)

_LAYER_CLASSES = {
    "linear": "Linear",
    "embedding": "Embedding",
    "conv1d": "Conv1d",
    "conv2d": "Conv2d",
    "conv3d": "Conv3d",
    "conv_transpose1d": "ConvTranspose1d",
    "conv_transpose2d": "ConvTranspose2d",
    "conv_transpose3d": "ConvTranspose3d",
}


class ReferenceRejected(RuntimeError):
    """The reference refused or failed to quantize a case (or silently did not quantize it)."""


# --------------------------------------------------------------------------------------------------
# Case description
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One single-layer conformance case.

    ``shape`` holds the positional constructor args of the layer:
    linear (in_features, out_features); embedding (num_embeddings, embedding_dim);
    convN / conv_transposeN (in_channels, out_channels, kernel_size).
    The quantization kwargs default to ``SDNQConfig``'s defaults. Mapping-valued options are stored as
    tuples so the dataclass stays hashable: ``modules_dtype_dict`` as ((dtype, (pattern, ...)), ...),
    ``modules_quant_config`` as ((pattern, ((key, value), ...)), ...).
    """

    id: str
    kind: str
    shape: tuple[int, ...]
    model_dtype: torch.dtype = torch.float32
    bias: bool = True
    category: str = "misc"
    # --- sdnq quantization kwargs ---
    weights_dtype: str = "int8"
    group_size: int = 0
    use_svd: bool = False
    svd_rank: int = 32
    svd_steps: int = 8
    use_hadamard: bool = False
    hadamard_group_size: int = 256
    use_codebook: bool = False
    codebook_steps: int = 24
    use_quantized_matmul: bool = False
    quantized_matmul_dtype: str | None = None
    use_quantized_matmul_conv: bool = False
    quant_conv: bool = False
    quant_embedding: bool = False
    dequantize_fp32: bool = True
    scale_dtype: str | None = None
    zero_point_dtype: str | None = None
    use_codebook_scale: bool = False
    use_stochastic_rounding: bool = False
    modules_to_not_use_matmul: tuple[str, ...] = ()
    modules_dtype_dict: tuple[tuple[str, tuple[str, ...]], ...] = ()
    modules_quant_config: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    # --- what make_reference must find on the quantized layer (sanity checks) ---
    expect_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def layer_class_name(self) -> str:
        return _LAYER_CLASSES[self.kind]

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode("utf-8")) & 0x7FFFFFFF

    def sdnq_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``SDNQConfig`` (the user-facing quantization options of this case)."""
        return {
            "weights_dtype": self.weights_dtype,
            "group_size": self.group_size,
            "use_svd": self.use_svd,
            "svd_rank": self.svd_rank,
            "svd_steps": self.svd_steps,
            "use_hadamard": self.use_hadamard,
            "hadamard_group_size": self.hadamard_group_size,
            "use_codebook": self.use_codebook,
            "codebook_steps": self.codebook_steps,
            "use_quantized_matmul": self.use_quantized_matmul,
            "quantized_matmul_dtype": self.quantized_matmul_dtype,
            "use_quantized_matmul_conv": self.use_quantized_matmul_conv,
            "quant_conv": self.quant_conv,
            "quant_embedding": self.quant_embedding,
            "dequantize_fp32": self.dequantize_fp32,
            "scale_dtype": self.scale_dtype,
            "zero_point_dtype": self.zero_point_dtype,
            "use_codebook_scale": self.use_codebook_scale,
            "use_stochastic_rounding": self.use_stochastic_rounding,
            "modules_to_not_use_matmul": list(self.modules_to_not_use_matmul),
            "modules_dtype_dict": {k: list(v) for k, v in self.modules_dtype_dict},
            "modules_quant_config": {k: dict(v) for k, v in self.modules_quant_config},
        }

    def config_kwargs(self) -> dict[str, Any]:
        """``sdnq_kwargs`` plus the settings that make a lone small layer eligible for quantization."""
        kw = self.sdnq_kwargs()
        kw.update(add_skip_keys=False, minimum_allowed_numel=0, minimum_allowed_channel_size=0)
        return kw

    def layer_description(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "class_name": self.layer_class_name,
            "args": list(self.shape),
            "bias": self.bias,
            "model_dtype": DTYPE_NAMES[self.model_dtype],
            "module_name": MODULE_NAME,
            "param_name": PARAM_NAME,
        }

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.dtype):
                v = DTYPE_NAMES[v]
            out[f.name] = v
        return json.loads(json.dumps(out))


@dataclass
class RefResult:
    case: Case
    tensors_path: Path
    expected_path: Path
    json_path: Path
    tensors: dict[str, torch.Tensor]          # stored quantized state dict (keys without prefix)
    expected_weight: torch.Tensor             # reference's dequantized weight, model dtype
    original_weight: torch.Tensor             # dense weight before quantization, model dtype
    original_bias: torch.Tensor | None
    config: dict[str, Any]                    # serialized quantization_config
    meta: dict[str, Any]                      # whole json (layer description, reference_debug, ...)
    input: torch.Tensor | None = None         # seeded forward input (None if forward failed)
    output: torch.Tensor | None = None        # reference quantized layer's forward output

    @property
    def reference_debug(self) -> dict[str, Any]:
        return self.meta.get("reference_debug", {})

    def debug_str(self) -> str:
        return json.dumps(self.reference_debug, indent=1, default=str)


# --------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------
def reference_dtype_table() -> dict[str, dict]:
    """The reference's dtype table (name -> properties), read from the installed sdnq."""
    from sdnq.common import dtype_dict

    return dtype_dict


def reference_dtype_names() -> tuple[list[str], dict[str, str]]:
    """(canonical names in table order, {alias: canonical}). Aliases share the table entry object."""
    table = reference_dtype_table()
    first: dict[int, str] = {}
    canonical: list[str] = []
    aliases: dict[str, str] = {}
    for name, props in table.items():
        if id(props) in first:
            aliases[name] = first[id(props)]
        else:
            first[id(props)] = name
            canonical.append(name)
    return canonical, aliases


def _c(id: str, kind: str = "linear", shape: tuple[int, ...] = (256, 64), **kw: Any) -> Case:
    return Case(id=id, kind=kind, shape=shape, **kw)


def _dtype_cases() -> list[Case]:
    canonical, aliases = reference_dtype_names()
    cases = [_c(f"dtype-{n}", category="dtype", weights_dtype=n, expect_keys=("weight", "scale"))
             for n in canonical]
    cases += [_c(f"alias-{a}", category="dtype_alias", weights_dtype=a, expect_keys=("weight", "scale"))
              for a in aliases]
    return cases


def _group_cases() -> list[Case]:
    out = []
    for wd in ("int8", "uint4", "int4", "float4_e2m1fn", "uint3", "int12"):
        for gs, tag in ((0, "auto"), (-1, "row"), (-2, "tensor"), (32, "32")):
            out.append(_c(f"group-{tag}-{wd}", category="group_size", weights_dtype=wd, group_size=gs))
    # group sizes that must be re-fitted
    out += [
        _c("group-refit-1000x64-uint4", shape=(1000, 32), category="group_size", weights_dtype="uint4",
           group_size=64),  # -> 10 groups of 100
        _c("group-refit-1000x64-int8", shape=(1000, 32), category="group_size", weights_dtype="int8",
           group_size=64),
        _c("group-refit-1000auto-uint2", shape=(1000, 32), category="group_size", weights_dtype="uint2"),
        _c("group-refit-192x128-int6", shape=(192, 32), category="group_size", weights_dtype="int6",
           group_size=128),  # 192//128=1 -> row-wise
        _c("group-refit-96x64-uint5", shape=(96, 64), category="group_size", weights_dtype="uint5",
           group_size=64),  # -> row-wise
        _c("group-refit-160x64-uint4", shape=(160, 64), category="group_size", weights_dtype="uint4",
           group_size=64),  # ng 2 -> gs 80
        _c("group-refit-prime-uint4", shape=(97, 64), category="group_size", weights_dtype="uint4",
           group_size=32),  # prime width -> row-wise
        _c("group-big-uint4", shape=(256, 64), category="group_size", weights_dtype="uint4", group_size=4096),
        _c("group-8-uint1", category="group_size", weights_dtype="uint1", group_size=8),
        _c("group-16-float8_e4m3fn", category="group_size", weights_dtype="float8_e4m3fn", group_size=16),
        _c("group-32-float6_e3m3fnu", category="group_size", weights_dtype="float6_e3m3fnu", group_size=32),
    ]
    return out


def _svd_cases() -> list[Case]:
    out = []
    for shape in ((64, 64), (128, 64), (256, 128)):
        out.append(_c(f"svd-uint4-{shape[0]}x{shape[1]}", shape=shape, category="svd", weights_dtype="uint4",
                      use_svd=True, svd_rank=8, expect_keys=("svd_up", "svd_down")))
    out += [
        _c("svd-int8", category="svd", weights_dtype="int8", use_svd=True, svd_rank=8,
           expect_keys=("svd_up", "svd_down")),
        _c("svd-float4_e2m1fn", category="svd", weights_dtype="float4_e2m1fn", use_svd=True, svd_rank=8,
           expect_keys=("svd_up", "svd_down")),
        _c("svd-uint4-row", category="svd", weights_dtype="uint4", group_size=-1, use_svd=True, svd_rank=8,
           expect_keys=("svd_up", "svd_down")),
        _c("svd-int8-matmul", category="svd", weights_dtype="int8", use_svd=True, svd_rank=8,
           use_quantized_matmul=True, expect_keys=("svd_up", "svd_down")),
        _c("svd-uint4-matmul", category="svd", weights_dtype="uint4", use_svd=True, svd_rank=8,
           use_quantized_matmul=True, expect_keys=("svd_up", "svd_down")),
        _c("svd-uint4-bf16", category="svd", weights_dtype="uint4", use_svd=True, svd_rank=8,
           model_dtype=torch.bfloat16, expect_keys=("svd_up", "svd_down")),
        _c("svd-int8-matmul-fp16", category="svd", weights_dtype="int8", use_svd=True, svd_rank=8,
           use_quantized_matmul=True, model_dtype=torch.float16, expect_keys=("svd_up", "svd_down")),
        _c("svd-conv2d-uint4", kind="conv2d", shape=(64, 64, 3), category="svd", weights_dtype="uint4",
           quant_conv=True, use_svd=True, svd_rank=8, expect_keys=("svd_up", "svd_down")),
        _c("svd-conv2d-int8-matmulconv", kind="conv2d", shape=(64, 64, 3), category="svd", weights_dtype="int8",
           quant_conv=True, use_quantized_matmul_conv=True, use_svd=True, svd_rank=8,
           expect_keys=("svd_up", "svd_down")),
    ]
    return out


def _hadamard_cases() -> list[Case]:
    out = []
    for g in (256, 64, 16, 4, 128, 32, 8):
        out.append(_c(f"hadamard-g{g}-int8", category="hadamard", weights_dtype="int8",
                      use_hadamard=True, hadamard_group_size=g))
    for g in (256, 128, 16):
        out.append(_c(f"hadamard-g{g}-uint4", category="hadamard", weights_dtype="uint4",
                      use_hadamard=True, hadamard_group_size=g))
    # in_features not a power of two
    for inf in (192, 96, 80, 1000, 48):
        out.append(_c(f"hadamard-in{inf}-int8", shape=(inf, 32), category="hadamard", weights_dtype="int8",
                      use_hadamard=True))
    out += [
        _c("hadamard-in40-g256-uint4", shape=(40, 64), category="hadamard", weights_dtype="uint4",
           use_hadamard=True),  # g -> 8
        _c("hadamard-in34-uint4", shape=(34, 64), category="hadamard", weights_dtype="uint4",
           use_hadamard=True),  # g < 4 -> no rotation
        _c("hadamard-g1000-int8", shape=(256, 64), category="hadamard", weights_dtype="int8",
           use_hadamard=True, hadamard_group_size=1000),  # non-power-of-two request
        _c("hadamard-svd-uint4", category="hadamard", weights_dtype="uint4", use_hadamard=True,
           use_svd=True, svd_rank=8, expect_keys=("svd_up", "svd_down")),
        _c("hadamard-matmul-int8", category="hadamard", weights_dtype="int8", use_hadamard=True,
           use_quantized_matmul=True),
        _c("hadamard-float6_e3m2fn", category="hadamard", weights_dtype="float6_e3m2fn", use_hadamard=True,
           hadamard_group_size=64),
        _c("hadamard-bf16-uint4", category="hadamard", weights_dtype="uint4", use_hadamard=True,
           hadamard_group_size=64, model_dtype=torch.bfloat16),
        _c("hadamard-conv2d-int8", kind="conv2d", shape=(64, 64, 3), category="hadamard", weights_dtype="int8",
           quant_conv=True, use_hadamard=True, hadamard_group_size=16),
        _c("hadamard-conv2d-uint4-g64", kind="conv2d", shape=(64, 32, 3), category="hadamard",
           weights_dtype="uint4", quant_conv=True, use_hadamard=True, hadamard_group_size=64),
        _c("hadamard-conv1d-int8-matmulconv", kind="conv1d", shape=(64, 64, 3), category="hadamard",
           weights_dtype="int8", quant_conv=True, use_quantized_matmul_conv=True, use_hadamard=True,
           hadamard_group_size=32),
        _c("hadamard-convT2d-int8", kind="conv_transpose2d", shape=(64, 32, 3), category="hadamard",
           weights_dtype="int8", quant_conv=True, group_size=-1, use_hadamard=True, hadamard_group_size=16),
        _c("hadamard-embedding-int8", kind="embedding", shape=(64, 128), category="hadamard",
           weights_dtype="int8", quant_embedding=True, use_hadamard=True, hadamard_group_size=64),
    ]
    return out


def _codebook_cases() -> list[Case]:
    out = []
    for wd in ("uint2", "uint3", "uint4"):
        out.append(_c(f"codebook-{wd}-auto", category="codebook", weights_dtype=wd, use_codebook=True))
        out.append(_c(f"codebook-{wd}-row", category="codebook", weights_dtype=wd, use_codebook=True,
                      group_size=-1))
    out += [
        _c("codebook-uint4-g32", category="codebook", weights_dtype="uint4", use_codebook=True, group_size=32),
        _c("codebook-uint4-tensor", category="codebook", weights_dtype="uint4", use_codebook=True,
           group_size=-2),
        _c("codebook-uint1", category="codebook", weights_dtype="uint1", use_codebook=True),
        _c("codebook-uint5", category="codebook", weights_dtype="uint5", use_codebook=True, group_size=64),
        _c("codebook-uint8", category="codebook", weights_dtype="uint8", use_codebook=True, group_size=-1),
        _c("codebook-uint4-1024wide", shape=(1024, 32), category="codebook", weights_dtype="uint4",
           use_codebook=True),
        _c("codebook-uint4-svd", category="codebook", weights_dtype="uint4", use_codebook=True, use_svd=True,
           svd_rank=8, expect_keys=("svd_up", "svd_down")),
        _c("codebook-uint4-matmul", category="codebook", weights_dtype="uint4", use_codebook=True,
           use_quantized_matmul=True),
        _c("codebook-uint4-hadamard", category="codebook", weights_dtype="uint4", use_codebook=True,
           use_hadamard=True, hadamard_group_size=64),
        _c("codebook-uint4-bf16", category="codebook", weights_dtype="uint4", use_codebook=True,
           model_dtype=torch.bfloat16, dequantize_fp32=False),
        _c("codebook-conv2d-uint4-row", kind="conv2d", shape=(64, 32, 3), category="codebook",
           weights_dtype="uint4", quant_conv=True, use_codebook=True, group_size=-1),
        _c("codebook-conv2d-uint4-grouped", kind="conv2d", shape=(64, 32, 3), category="codebook",
           weights_dtype="uint4", quant_conv=True, use_codebook=True, group_size=32),
        _c("codebook-convT2d-uint4-row", kind="conv_transpose2d", shape=(64, 32, 3), category="codebook",
           weights_dtype="uint4", quant_conv=True, use_codebook=True, group_size=-1),
        _c("codebook-embedding-uint4", kind="embedding", shape=(64, 256), category="codebook",
           weights_dtype="uint4", quant_embedding=True, use_codebook=True),
        # signed / float weights are rejected by SDNQConfig (kept as documented rejections)
        _c("codebook-int4", category="codebook", weights_dtype="int4", use_codebook=True),
        _c("codebook-float4_e2m1fn", category="codebook", weights_dtype="float4_e2m1fn", use_codebook=True),
    ]
    return out


def _matmul_cases() -> list[Case]:
    out = []
    for wd in ("int8", "uint8", "float8_e4m3fn", "float16", "int16", "uint16", "float8_e5m2",
               "float8_e4m3fn_sdnq", "bfloat16", "float32", "int7", "uint4", "int4", "float6_e3m2fn",
               "float16_e5m10fn", "uint1"):
        out.append(_c(f"matmul-{wd}", category="matmul", weights_dtype=wd, use_quantized_matmul=True))
    out += [
        _c("matmul-int8-mm_fp8", category="matmul", weights_dtype="int8", use_quantized_matmul=True,
           quantized_matmul_dtype="float8_e4m3fn"),
        _c("matmul-int8-mm_uint8", category="matmul", weights_dtype="int8", use_quantized_matmul=True,
           quantized_matmul_dtype="uint8"),
        _c("matmul-uint8-mm_int8", category="matmul", weights_dtype="uint8", use_quantized_matmul=True,
           quantized_matmul_dtype="int8"),
        _c("matmul-int7-mm_int8", category="matmul", weights_dtype="int7", use_quantized_matmul=True,
           quantized_matmul_dtype="int8"),
        _c("matmul-float8_e4m3fn-mm_fp16", category="matmul", weights_dtype="float8_e4m3fn",
           use_quantized_matmul=True, quantized_matmul_dtype="float16"),
        _c("matmul-float16-mm_fp8", category="matmul", weights_dtype="float16", use_quantized_matmul=True,
           quantized_matmul_dtype="fp8"),
        _c("matmul-int8-g32", category="matmul", weights_dtype="int8", use_quantized_matmul=True, group_size=32),
        _c("matmul-int8-tensor", category="matmul", weights_dtype="int8", use_quantized_matmul=True,
           group_size=-2),
        _c("matmul-int8-out40", shape=(256, 40), category="matmul", weights_dtype="int8",
           use_quantized_matmul=True),  # out % 16 != 0 -> matmul off
        _c("matmul-int8-in48-out16", shape=(48, 16), category="matmul", weights_dtype="int8",
           use_quantized_matmul=True),  # out < 32
        _c("matmul-int8-bf16", category="matmul", weights_dtype="int8", use_quantized_matmul=True,
           model_dtype=torch.bfloat16),
        _c("matmul-float8_e4m3fn-bf16", category="matmul", weights_dtype="float8_e4m3fn",
           use_quantized_matmul=True, model_dtype=torch.bfloat16, dequantize_fp32=False),
        _c("matmul-float16-fp16-nofp32", category="matmul", weights_dtype="float16", use_quantized_matmul=True,
           model_dtype=torch.float16, dequantize_fp32=False),
        _c("matmul-int8-not_use_matmul", category="matmul", weights_dtype="int8", use_quantized_matmul=True,
           modules_to_not_use_matmul=(MODULE_NAME,)),
        _c("matmul-embedding-int8", kind="embedding", shape=(64, 128), category="matmul", weights_dtype="int8",
           quant_embedding=True, use_quantized_matmul=True),
    ]
    return out


def _conv_cases() -> list[Case]:
    out = []
    convs = (("conv1d", (64, 64, 3)), ("conv2d", (64, 64, 3)), ("conv3d", (32, 32, 3)))
    for kind, shape in convs:
        out += [
            _c(f"{kind}-int8-row", kind=kind, shape=shape, category="conv", weights_dtype="int8",
               quant_conv=True, group_size=-1),
            _c(f"{kind}-int8-auto", kind=kind, shape=shape, category="conv", weights_dtype="int8",
               quant_conv=True),
            _c(f"{kind}-uint4-auto", kind=kind, shape=shape, category="conv", weights_dtype="uint4",
               quant_conv=True),
            _c(f"{kind}-int4-g16", kind=kind, shape=shape, category="conv", weights_dtype="int4",
               quant_conv=True, group_size=16),
            _c(f"{kind}-float8_e4m3fn-row", kind=kind, shape=shape, category="conv",
               weights_dtype="float8_e4m3fn", quant_conv=True, group_size=-1),
            _c(f"{kind}-uint4-tensor", kind=kind, shape=shape, category="conv", weights_dtype="uint4",
               quant_conv=True, group_size=-2),
            _c(f"{kind}-int8-matmulconv", kind=kind, shape=shape, category="conv", weights_dtype="int8",
               quant_conv=True, use_quantized_matmul_conv=True),
            _c(f"{kind}-uint8-matmulconv", kind=kind, shape=shape, category="conv", weights_dtype="uint8",
               quant_conv=True, use_quantized_matmul_conv=True),
            _c(f"{kind}-float8_e4m3fn-matmulconv", kind=kind, shape=shape, category="conv",
               weights_dtype="float8_e4m3fn", quant_conv=True, use_quantized_matmul_conv=True),
            _c(f"{kind}-uint4-matmulconv", kind=kind, shape=shape, category="conv", weights_dtype="uint4",
               quant_conv=True, use_quantized_matmul_conv=True),
            _c(f"{kind}-int8-g16-matmulconv", kind=kind, shape=shape, category="conv", weights_dtype="int8",
               quant_conv=True, use_quantized_matmul_conv=True, group_size=16),
        ]
    out += [
        _c("conv2d-int8-matmul-linear-flag-only", kind="conv2d", shape=(64, 64, 3), category="conv",
           weights_dtype="int8", quant_conv=True, use_quantized_matmul=True),  # linear flag must not apply
        _c("conv2d-int8-matmulconv-in40", kind="conv2d", shape=(40, 64, 3), category="conv",
           weights_dtype="int8", quant_conv=True, use_quantized_matmul_conv=True),  # in % 16 != 0
        _c("conv2d-uint4-k1", kind="conv2d", shape=(128, 64, 1), category="conv", weights_dtype="uint4",
           quant_conv=True),
        _c("conv2d-float6_e3m2fn", kind="conv2d", shape=(64, 32, 3), category="conv",
           weights_dtype="float6_e3m2fn", quant_conv=True),
        _c("conv2d-int12", kind="conv2d", shape=(64, 32, 3), category="conv", weights_dtype="int12",
           quant_conv=True),
        _c("conv2d-uint1", kind="conv2d", shape=(64, 32, 3), category="conv", weights_dtype="uint1",
           quant_conv=True),
        _c("conv2d-nobias-int8", kind="conv2d", shape=(64, 32, 3), bias=False, category="conv",
           weights_dtype="int8", quant_conv=True),
        _c("conv2d-bf16-uint4", kind="conv2d", shape=(64, 32, 3), model_dtype=torch.bfloat16, category="conv",
           weights_dtype="uint4", quant_conv=True, dequantize_fp32=False),
        _c("conv2d-fp16-int8-matmulconv", kind="conv2d", shape=(64, 32, 3), model_dtype=torch.float16,
           category="conv", weights_dtype="int8", quant_conv=True, use_quantized_matmul_conv=True),
        # without quant_conv the reference leaves the conv dense (documented rejection)
        _c("conv2d-int8-no-quant_conv", kind="conv2d", shape=(64, 64, 3), category="conv", weights_dtype="int8"),
    ]
    # conv transpose: reduction over dim 0 (in_channels)
    out += [
        _c("convT1d-int8-row", kind="conv_transpose1d", shape=(64, 32, 3), category="conv_transpose",
           weights_dtype="int8", quant_conv=True, group_size=-1),
        _c("convT2d-int8-row", kind="conv_transpose2d", shape=(64, 32, 3), category="conv_transpose",
           weights_dtype="int8", quant_conv=True, group_size=-1),
        _c("convT2d-uint4-row", kind="conv_transpose2d", shape=(64, 32, 3), category="conv_transpose",
           weights_dtype="uint4", quant_conv=True, group_size=-1),
        _c("convT2d-float6_e3m2fn-row", kind="conv_transpose2d", shape=(64, 32, 3), category="conv_transpose",
           weights_dtype="float6_e3m2fn", quant_conv=True, group_size=-1),
        _c("convT3d-uint4-row", kind="conv_transpose3d", shape=(32, 32, 3), category="conv_transpose",
           weights_dtype="uint4", quant_conv=True, group_size=-1),
        _c("convT2d-int8-auto", kind="conv_transpose2d", shape=(64, 32, 3), category="conv_transpose",
           weights_dtype="int8", quant_conv=True),  # auto 512 >= 64 -> row-wise
        _c("convT2d-uint4-tensor", kind="conv_transpose2d", shape=(64, 32, 3), category="conv_transpose",
           weights_dtype="uint4", quant_conv=True, group_size=-2),
        _c("convT2d-int8-matmulconv", kind="conv_transpose2d", shape=(64, 64, 3), category="conv_transpose",
           weights_dtype="int8", quant_conv=True, use_quantized_matmul_conv=True, group_size=-1),
        # grouped conv-transpose: the reference splits dim 1 as (group_size, num_groups)
        _c("convT2d-uint4-grouped-square", kind="conv_transpose2d", shape=(64, 64, 3),
           category="conv_transpose", weights_dtype="uint4", quant_conv=True),
        _c("convT2d-int8-g32-square", kind="conv_transpose2d", shape=(64, 64, 3), category="conv_transpose",
           weights_dtype="int8", quant_conv=True, group_size=32),
        _c("convT2d-uint4-codebook-grouped-square", kind="conv_transpose2d", shape=(64, 64, 3),
           category="conv_transpose", weights_dtype="uint4", quant_conv=True, use_codebook=True, group_size=32),
        _c("convT2d-uint4-svd-grouped-square", kind="conv_transpose2d", shape=(64, 64, 3),
           category="conv_transpose", weights_dtype="uint4", quant_conv=True, use_svd=True, svd_rank=8),
        _c("convT1d-int6-grouped-square", kind="conv_transpose1d", shape=(128, 128, 3),
           category="conv_transpose", weights_dtype="int6", quant_conv=True, group_size=32),
        _c("convT2d-uint4-grouped-nonsquare", kind="conv_transpose2d", shape=(64, 32, 3),
           category="conv_transpose", weights_dtype="uint4", quant_conv=True),
    ]
    return out


def _embedding_cases() -> list[Case]:
    return [
        _c("embedding-int8", kind="embedding", shape=(64, 256), category="embedding", weights_dtype="int8",
           quant_embedding=True),
        _c("embedding-uint4-auto", kind="embedding", shape=(64, 256), category="embedding",
           weights_dtype="uint4", quant_embedding=True),
        _c("embedding-int4-row", kind="embedding", shape=(64, 256), category="embedding", weights_dtype="int4",
           quant_embedding=True, group_size=-1),
        _c("embedding-float8_e4m3fn", kind="embedding", shape=(64, 256), category="embedding",
           weights_dtype="float8_e4m3fn", quant_embedding=True),
        _c("embedding-float4_e2m1fn", kind="embedding", shape=(64, 256), category="embedding",
           weights_dtype="float4_e2m1fn", quant_embedding=True),
        _c("embedding-uint3-svd", kind="embedding", shape=(64, 256), category="embedding", weights_dtype="uint3",
           quant_embedding=True, use_svd=True, svd_rank=8, expect_keys=("svd_up", "svd_down")),
        _c("embedding-bf16-uint4", kind="embedding", shape=(64, 256), category="embedding",
           weights_dtype="uint4", quant_embedding=True, model_dtype=torch.bfloat16, dequantize_fp32=False),
        _c("embedding-uint4-no-quant_embedding", kind="embedding", shape=(64, 256), category="embedding",
           weights_dtype="uint4"),
    ]


def _model_dtype_cases() -> list[Case]:
    out = []
    for md in (torch.bfloat16, torch.float16):
        mdn = "bf16" if md is torch.bfloat16 else "fp16"
        for wd in ("int8", "uint8", "uint4", "int4", "float8_e4m3fn", "float6_e3m2fn", "int12", "uint12",
                   "int16", "float16_e5m10fn", "float8_e4m3fn_sdnq", "uint1", "float4_e2m2fnu"):
            for fp32 in (True, False):
                out.append(_c(f"{mdn}-{wd}-{'fp32' if fp32 else 'nofp32'}", model_dtype=md,
                              category="model_dtype", weights_dtype=wd, dequantize_fp32=fp32))
        out.append(_c(f"{mdn}-uint4-matmul-nofp32", model_dtype=md, category="model_dtype",
                      weights_dtype="uint4", use_quantized_matmul=True, dequantize_fp32=False))
        out.append(_c(f"{mdn}-int8-matmul-nofp32", model_dtype=md, category="model_dtype",
                      weights_dtype="int8", use_quantized_matmul=True, dequantize_fp32=False))
    out.append(_c("fp32-int8-nofp32", category="model_dtype", weights_dtype="int8", dequantize_fp32=False))
    out.append(_c("fp32-uint4-nofp32", category="model_dtype", weights_dtype="uint4", dequantize_fp32=False))
    return out


def _double_quant_cases() -> list[Case]:
    out = []
    for sd in ("uint8", "int8", "float8_e4m3fn", "uint4", "int4", "float16", "bfloat16", "float6_e3m3fnu",
               "float4_e2m1fn", "uint3", "int12", "float8_e4m3fn_sdnq"):
        out.append(_c(f"dq-uint4-scale_{sd}", category="double_quant", weights_dtype="uint4", scale_dtype=sd,
                      expect_keys=("scale_2", "zero_point_scale")))
        out.append(_c(f"dq-int8-scale_{sd}", category="double_quant", weights_dtype="int8", group_size=32,
                      scale_dtype=sd, expect_keys=("scale_2",)))
    out += [
        _c("dq-uint4-scale_uint8-zp_int8", category="double_quant", weights_dtype="uint4", scale_dtype="uint8",
           zero_point_dtype="int8", expect_keys=("scale_2", "zero_point_scale")),
        _c("dq-uint4-scale_int8-zp_uint4", category="double_quant", weights_dtype="uint4", scale_dtype="int8",
           zero_point_dtype="uint4", expect_keys=("scale_2", "zero_point_scale", "zero_point_2")),
        _c("dq-uint4-zp_only_uint8", category="double_quant", weights_dtype="uint4", zero_point_dtype="uint8",
           expect_keys=("zero_point_scale", "zero_point_2")),
        _c("dq-uint4-scale_none-zp_int8", category="double_quant", weights_dtype="uint4", scale_dtype="none",
           zero_point_dtype="int8", expect_keys=("zero_point_scale",)),
        _c("dq-uint4-cbscale_uint4", category="double_quant", weights_dtype="uint4", scale_dtype="uint4",
           use_codebook_scale=True, expect_keys=("scale_2", "zero_point_scale")),
        _c("dq-uint4-cbscale_uint8", category="double_quant", weights_dtype="uint4", scale_dtype="uint8",
           use_codebook_scale=True, expect_keys=("scale_2", "zero_point_scale")),
        _c("dq-int8-cbscale_uint3", category="double_quant", weights_dtype="int8", group_size=32,
           scale_dtype="uint3", use_codebook_scale=True, expect_keys=("scale_2",)),
        _c("dq-uint4-cbscale_int8", category="double_quant", weights_dtype="uint4", scale_dtype="int8",
           use_codebook_scale=True),  # codebook needs unsigned ints -> expected rejection
        _c("dq-codebook-uint4-scale_uint8", category="double_quant", weights_dtype="uint4", use_codebook=True,
           scale_dtype="uint8", expect_keys=("scale_2",)),
        _c("dq-codebook-uint4-cbscale_uint4", category="double_quant", weights_dtype="uint4", use_codebook=True,
           scale_dtype="uint4", use_codebook_scale=True, expect_keys=("scale_2",)),
        _c("dq-int8-matmul-scale_uint8", category="double_quant", weights_dtype="int8",
           use_quantized_matmul=True, scale_dtype="uint8", expect_keys=("scale_2",)),
        _c("dq-svd-uint4-scale_int8", category="double_quant", weights_dtype="uint4", use_svd=True, svd_rank=8,
           scale_dtype="int8", expect_keys=("scale_2", "svd_up")),
        _c("dq-hadamard-uint4-scale_uint8", category="double_quant", weights_dtype="uint4", use_hadamard=True,
           hadamard_group_size=64, scale_dtype="uint8", expect_keys=("scale_2",)),
        _c("dq-bf16-uint4-scale_uint8", category="double_quant", weights_dtype="uint4", scale_dtype="uint8",
           model_dtype=torch.bfloat16, dequantize_fp32=False, expect_keys=("scale_2",)),
        _c("dq-fp16-int4-scale_float8_e4m3fn", category="double_quant", weights_dtype="int4",
           scale_dtype="float8_e4m3fn", model_dtype=torch.float16, expect_keys=("scale_2",)),
        _c("dq-uint4-tensor-scale_uint8", category="double_quant", weights_dtype="uint4", group_size=-2,
           scale_dtype="uint8", expect_keys=("scale_2",)),
        _c("dq-conv2d-uint4-scale_uint8", kind="conv2d", shape=(64, 32, 3), category="double_quant",
           weights_dtype="uint4", quant_conv=True, scale_dtype="uint8", expect_keys=("scale_2",)),
        _c("dq-convT2d-int8-scale_int8", kind="conv_transpose2d", shape=(64, 32, 3), category="double_quant",
           weights_dtype="int8", quant_conv=True, group_size=-1, scale_dtype="int8", expect_keys=("scale_2",)),
        _c("dq-embedding-uint4-scale_uint4", kind="embedding", shape=(64, 256), category="double_quant",
           weights_dtype="uint4", quant_embedding=True, scale_dtype="uint4", expect_keys=("scale_2",)),
        _c("dq-uint4-scale_uint1", category="double_quant", weights_dtype="uint4", scale_dtype="uint1",
           expect_keys=("scale_2",)),
        _c("dq-uint4-scale_float16_e5m10fn", category="double_quant", weights_dtype="uint4",
           scale_dtype="float16_e5m10fn", expect_keys=("scale_2",)),
    ]
    return out


def _override_cases() -> list[Case]:
    """Per-layer overrides that a loader must re-derive from the config (name-based)."""
    return [
        _c("override-mqc-int6", category="overrides", weights_dtype="int8",
           modules_quant_config=((MODULE_NAME, (("weights_dtype", "int6"),)),)),
        _c("override-mqc-uint4-svd", category="overrides", weights_dtype="int8",
           modules_quant_config=((MODULE_NAME, (("weights_dtype", "uint4"), ("use_svd", True),
                                                ("svd_rank", 8))),), expect_keys=("svd_up",)),
        _c("override-mqc-group", category="overrides", weights_dtype="uint4",
           modules_quant_config=(("layer*", (("group_size", 32),)),)),
        _c("override-mqc-hadamard", category="overrides", weights_dtype="uint4",
           modules_quant_config=((PARAM_NAME, (("use_hadamard", True), ("hadamard_group_size", 16))),)),
        _c("override-mqc-nomatmul", category="overrides", weights_dtype="int8", use_quantized_matmul=True,
           modules_quant_config=((MODULE_NAME, (("use_quantized_matmul", False),)),)),
        _c("override-mqc-scale_dtype", category="overrides", weights_dtype="uint4",
           modules_quant_config=((MODULE_NAME, (("scale_dtype", "uint8"),)),), expect_keys=("scale_2",)),
        _c("override-dtype_dict-uint3", category="overrides", weights_dtype="int8",
           modules_dtype_dict=(("uint3", (MODULE_NAME,)),)),
        _c("override-dtype_dict-minimum_6bit", category="overrides", weights_dtype="uint4",
           modules_dtype_dict=(("minimum_6bit", (MODULE_NAME,)),)),
        _c("override-dtype_dict-minimum_uint5bit", category="overrides", weights_dtype="int3",
           modules_dtype_dict=(("minimum_uint5bit", (MODULE_NAME,)),)),
        _c("override-dtype_dict-8bit", category="overrides", weights_dtype="uint4",
           modules_dtype_dict=(("8bit", ("." + MODULE_NAME,)),)),
        _c("override-dtype_dict-nomatch", category="overrides", weights_dtype="uint4",
           modules_dtype_dict=(("int8", ("other",)),)),
        _c("misc-stochastic-int4", category="misc", weights_dtype="int4", use_stochastic_rounding=True),
        _c("misc-nobias-uint4", bias=False, category="misc", weights_dtype="uint4"),
        _c("misc-small-32x32-uint2", shape=(32, 32), category="misc", weights_dtype="uint2"),
    ]


def candidate_cases() -> list[Case]:
    """Every case tried, including the ones the reference rejects."""
    cases = (
        _dtype_cases() + _group_cases() + _svd_cases() + _hadamard_cases() + _codebook_cases()
        + _matmul_cases() + _conv_cases() + _embedding_cases() + _model_dtype_cases()
        + _double_quant_cases() + _override_cases()
    )
    ids = [c.id for c in cases]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise AssertionError(f"duplicate case ids: {sorted(dupes)}")
    return cases


# Cases the reference (sdnq 0.2.8, torch 2.13 CPU) refuses, crashes on, or silently leaves unquantized.
# id -> reason (first line of the reference's error). Regenerate with `python tests/oracle.py --probe`.
# Root causes, as observed:
# * conv + use_quantized_matmul_conv + unpacked dtype: the weight is flattened to (out, in*k) first, then an
#   explicit group split (num_groups>1) is attempted on the flattened dim -> crash while quantizing (*-g16-matmulconv);
#   with SVD or Hadamard on such a flattened conv the reference quantizes fine but its own dequantizer crashes.
# * grouped ConvTranspose splits dim 1 (out channels) as (group_size, num_groups): crashes unless in == out.
# * use_codebook / use_codebook_scale need unsigned integer dtypes.
# * conv / embedding layers stay dense without quant_conv / quant_embedding (added to modules_to_not_convert).
REJECTED: dict[str, str] = {
    'svd-conv2d-int8-matmulconv': 'dequantize_sdnq_model failed: RuntimeError: Bad in-place call: input tensor size [64, 64, 3, 3] and output tensor size [64, 576] should match',
    'hadamard-conv1d-int8-matmulconv': "dequantize_sdnq_model failed: RuntimeError: unflatten: Provided sizes [-1, 32] don't multiply up to the size of dim 2 (3) in the input tensor",
    'codebook-int4': 'ValueError: SDNQ: use_codebook is only supported with unsigned integer dtypes but found int4',
    'codebook-float4_e2m1fn': 'ValueError: SDNQ: use_codebook is only supported with unsigned integer dtypes but found float4_e2m1fn',
    'conv1d-int8-g16-matmulconv': "RuntimeError: unflatten: Provided sizes [4, 16] don't multiply up to the size of dim 1 (192) in the input tensor",
    'conv2d-int8-g16-matmulconv': "RuntimeError: unflatten: Provided sizes [4, 16] don't multiply up to the size of dim 1 (576) in the input tensor",
    'conv3d-int8-g16-matmulconv': "RuntimeError: unflatten: Provided sizes [2, 16] don't multiply up to the size of dim 1 (864) in the input tensor",
    'conv2d-int8-no-quant_conv': "reference left the layer unquantized (class Conv2d; modules_to_not_convert=['layer.weight'])",
    'convT2d-uint4-grouped-nonsquare': "RuntimeError: unflatten: Provided sizes [32, 2] don't multiply up to the size of dim 1 (32) in the input tensor",
    'embedding-uint4-no-quant_embedding': "reference left the layer unquantized (class Embedding; modules_to_not_convert=['layer.weight'])",
    'dq-uint4-cbscale_int8': 'AssertionError: Codebook quantization only supports unsigned integer types.',
}


def all_cases() -> list[Case]:
    """The conformance matrix: every candidate that the reference quantizes successfully."""
    return [c for c in candidate_cases() if c.id not in REJECTED]


def rejected_cases() -> list[tuple[Case, str]]:
    by_id = {c.id: c for c in candidate_cases()}
    return [(by_id[i], why) for i, why in REJECTED.items() if i in by_id]


def cases_by_id() -> dict[str, Case]:
    return {c.id: c for c in candidate_cases()}


# --------------------------------------------------------------------------------------------------
# Building and quantizing one layer
# --------------------------------------------------------------------------------------------------
class _Holder(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer


def build_dense_layer(case: Case) -> torch.nn.Module:
    """The seeded dense layer of a case, in the case's model dtype (deterministic from the case id)."""
    cls = getattr(torch.nn, case.layer_class_name)
    if case.kind == "embedding":
        layer = cls(*case.shape)
    else:
        layer = cls(*case.shape, bias=case.bias)
    gen = torch.Generator().manual_seed(case.seed)
    w = layer.weight
    with torch.no_grad():
        # row-dependent magnitudes plus a few outliers, so scales differ between rows/groups
        base = torch.randn(w.shape, generator=gen, dtype=torch.float32)
        rows = 0.02 + 0.08 * torch.rand((w.shape[0],) + (1,) * (w.ndim - 1), generator=gen)
        dense = base * rows
        outliers = torch.rand(w.shape, generator=gen) < 0.002
        dense = torch.where(outliers, dense * 8.0, dense)
        w.copy_(dense)
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(0.01 * torch.randn(layer.bias.shape, generator=gen))
    return layer.to(case.model_dtype)


def make_input(case: Case) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case.seed ^ 0x5A5A5A)
    a = case.shape
    if case.kind == "linear":
        shape = (3, a[0])
    elif case.kind == "embedding":
        return torch.randint(0, a[0], (2, 7), generator=gen)
    else:
        nd = int(case.kind[-2])
        spatial = {1: (9,), 2: (6, 6), 3: (4, 4, 4)}[nd]
        shape = (1, a[0], *spatial)
    return torch.randn(shape, generator=gen).to(case.model_dtype)


def _sdnq():
    os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
    import sdnq
    from sdnq.dequantizer import dequantize_sdnq_model

    return sdnq, dequantize_sdnq_model


def _config_to_json_dict(cfg: Any) -> dict[str, Any]:
    # Same dict the reference writes with to_json_file / into config.json.
    return json.loads(json.dumps(cfg.to_dict(), sort_keys=True, default=str))


def _debug_of(layer: torch.nn.Module) -> dict[str, Any]:
    deq = getattr(layer, "sdnq_dequantizer", None)
    dbg: dict[str, Any] = {"layer_repr_class": type(layer).__name__}
    if deq is None:
        return dbg
    for name in (
        "weights_dtype", "group_size", "quantized_weight_shape", "quantized_scale_shape",
        "quantized_zero_point_shape", "result_shape", "original_shape", "use_quantized_matmul",
        "re_quantize_for_matmul", "quantized_matmul_dtype", "use_hadamard", "hadamard_group_size",
        "use_codebook", "scale_dtype", "zero_point_dtype", "use_codebook_scale", "result_dtype", "svd_rank",
    ):
        v = getattr(deq, name, None)
        dbg[name] = v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
    dbg["dequantizer_repr"] = repr(deq)
    return dbg


def _quantize(case: Case) -> tuple[_Holder, _Holder, dict[str, Any]]:
    """(dense holder, quantized holder, serialized config). Raises ReferenceRejected."""
    sdnq, _ = _sdnq()
    dense = _Holder(build_dense_layer(case))
    qmodel = copy.deepcopy(dense)
    try:
        cfg = sdnq.SDNQConfig(**case.config_kwargs())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(case.seed)  # svd_lowrank / stochastic rounding use the global RNG
            qmodel = sdnq.sdnq_post_load_quant(qmodel, quantization_config=cfg)
    except Exception as e:  # the reference refused or crashed
        raise ReferenceRejected(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}") from e

    layer = qmodel.layer
    if not hasattr(layer, "sdnq_dequantizer") or not hasattr(layer, "scale"):
        raise ReferenceRejected(
            f"reference left the layer unquantized (class {type(layer).__name__}; "
            f"modules_to_not_convert={cfg.modules_to_not_convert})"
        )
    missing = [k for k in case.expect_keys if getattr(layer, k, None) is None]
    if missing:
        raise ReferenceRejected(f"reference silently dropped option(s): quantized layer lacks {missing}")
    return dense, qmodel, _config_to_json_dict(qmodel.quantization_config)


def _state_dict_of(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in layer.state_dict().items():
        if v is None:
            continue
        out[k] = v.detach().clone().contiguous()
    return out


def _paths(case: Case, directory: Path) -> tuple[Path, Path, Path]:
    return (
        directory / f"{case.id}.safetensors",
        directory / f"{case.id}.expected.safetensors",
        directory / f"{case.id}.json",
    )


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _atomic_save_json(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _load_result(case: Case, directory: Path) -> RefResult:
    tpath, epath, jpath = _paths(case, directory)
    tensors = load_file(str(tpath))
    expected = load_file(str(epath))
    meta = json.loads(jpath.read_text())
    return RefResult(
        case=case,
        tensors_path=tpath,
        expected_path=epath,
        json_path=jpath,
        tensors=tensors,
        expected_weight=expected["weight"],
        original_weight=expected["original_weight"],
        original_bias=expected.get("original_bias"),
        config=meta["quantization_config"],
        meta=meta,
        input=expected.get("input"),
        output=expected.get("output"),
    )


@dataclass
class _Run:
    dense: torch.nn.Module
    stored: dict[str, torch.Tensor]
    expected_weight: torch.Tensor
    config: dict[str, Any]
    debug: dict[str, Any]
    extra: dict[str, torch.Tensor]


def _run_reference(case: Case, with_forward: bool = True) -> _Run:
    """Quantize, dequantize (and optionally run forward) with the reference. Raises ReferenceRejected.

    Runs single-threaded: results do not depend on the thread count, and the tiny matmuls inside
    svd_lowrank are far slower multi-threaded on a busy 2-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_reference_st(case, with_forward)
    finally:
        torch.set_num_threads(threads)


def _run_reference_st(case: Case, with_forward: bool) -> _Run:
    _, dequantize_sdnq_model = _sdnq()
    dense, qmodel, config = _quantize(case)
    qlayer = qmodel.layer
    stored = _state_dict_of(qlayer)
    unknown = set(stored) - set(QUANT_KEYS) - {"bias"}
    if unknown:
        raise AssertionError(f"{case.id}: unexpected tensors in the reference's state dict: {sorted(unknown)}")
    debug = _debug_of(qlayer)

    # Dequantize a pristine copy. (The reference's forward may dequantize in place, e.g. for
    # weights_dtype="float32", corrupting the module it runs on, so never reuse a module after forward.)
    try:
        deq_model = dequantize_sdnq_model(copy.deepcopy(qmodel))
    except Exception as e:
        raise ReferenceRejected(
            f"dequantize_sdnq_model failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        ) from e
    expected_weight = deq_model.layer.weight.detach().clone().contiguous()
    if expected_weight.shape != dense.layer.weight.shape:
        raise AssertionError(f"{case.id}: dequantized shape {tuple(expected_weight.shape)} "
                             f"!= original {tuple(dense.layer.weight.shape)}")

    # Forward of the quantized layer on a seeded input (optional; some paths are unsupported on CPU).
    extra: dict[str, torch.Tensor] = {}
    if with_forward:
        x = make_input(case)
        try:
            with torch.no_grad():
                y = copy.deepcopy(qmodel).layer(x)
            extra = {"input": x.contiguous(), "output": y.detach().contiguous()}
        except Exception as e:
            debug["forward_error"] = f"{type(e).__name__}: {e}"
    return _Run(dense.layer, stored, expected_weight, config, debug, extra)


def make_reference(case: Case, directory: str | os.PathLike) -> RefResult:
    """Quantize ``case`` with the reference and write/reuse its three files in ``directory``.

    Raises ReferenceRejected when the reference refuses the case (see REJECTED / rejected_cases()).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tpath, epath, jpath = _paths(case, directory)
    if tpath.exists() and epath.exists() and jpath.exists():
        try:
            meta = json.loads(jpath.read_text())
            if meta.get("oracle_format_version") == ORACLE_FORMAT_VERSION and meta.get("case") == case.to_json():
                return _load_result(case, directory)
        except (OSError, ValueError, KeyError):
            pass

    run = _run_reference(case)
    expected = {"weight": run.expected_weight, "original_weight": run.dense.weight.detach().contiguous(), **run.extra}
    if getattr(run.dense, "bias", None) is not None:
        expected["original_bias"] = run.dense.bias.detach().contiguous()

    meta = {
        "oracle_format_version": ORACLE_FORMAT_VERSION,
        "case": case.to_json(),
        "layer": case.layer_description(),
        "quantization_config": run.config,
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in run.stored.items()},
        "reference_debug": run.debug,
    }
    _atomic_save_tensors(run.stored, tpath)
    _atomic_save_tensors(expected, epath)
    _atomic_save_json(meta, jpath)
    return _load_result(case, directory)


def probe_rejections() -> dict[str, str]:
    """Run every candidate through the reference (no files) and return {id: reason} for failures."""
    out = {}
    for case in candidate_cases():
        try:
            _run_reference(case, with_forward=False)
        except ReferenceRejected as e:
            out[case.id] = str(e)
    return out


if __name__ == "__main__":  # pragma: no cover - maintenance helper
    import sys

    if "--build" in sys.argv:  # build the whole matrix into DIR and list the case ids in DIR/index.json
        target = Path(sys.argv[sys.argv.index("--build") + 1])
        built = [make_reference(case, target).case.id for case in all_cases()]
        _atomic_save_json({"cases": built, "rejected": {c.id: r for c, r in rejected_cases()}}, target / "index.json")
        print(f"{len(built)} cases in {target}")
    if "--probe" in sys.argv:
        for k, v in probe_rejections().items():
            print(f"    {k!r}: {v!r},")
