"""The Triton decode kernels (``layers/triton_decode.py``), proved on CPU through Triton's interpreter.

Oracle: the pure-torch codec (``format.codec.dequantize``), bit-exact with the reference (conformance tests).
``TRITON_INTERPRET=1`` runs the very kernels the GPU runs, on CPU tensors, with numpy arithmetic. Two things the
interpreter does not model are handled explicitly: its ``tl.fma`` rounds twice (a GPU's rounds once), so the
``exact_fma`` fixture gives it a correctly rounded one (checked against exact rational arithmetic below); and it does
not round bfloat16 stores, so in interpreter mode the module rounds float32 results with torch (bfloat16 straight
from the kernel is checked on the GPU: ``test_cuda_*`` below and ``python -m bench --gpu``). Whether the generated
source compiles for a real GPU is checked with Triton's own compiler for sm_90 (it needs no GPU).
"""

from __future__ import annotations

import dataclasses
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from diffusers_sdnq.format import dequantize, plan_layer  # noqa: E402
from diffusers_sdnq.format.config import QuantConfig  # noqa: E402
from diffusers_sdnq.format.dtypes import all_dtype_names, get_dtype  # noqa: E402
from diffusers_sdnq.format.packing import LAYOUTS  # noqa: E402
from diffusers_sdnq.layers import triton_decode as td  # noqa: E402
from diffusers_sdnq.quantize import quantize_weight  # noqa: E402

_interpreter = pytest.importorskip("triton.runtime.interpreter")
INTERPRETER_FMA = _interpreter.InterpreterBuilder.create_fma
"""The interpreter's own fma (two roundings), before any test replaces it."""

INT_WIDTHS = [f"uint{b}" for b in LAYOUTS] + [f"int{b}" for b in LAYOUTS if b > 1] + \
    ["int8", "uint8", "int16", "uint16"]
FLOATS = [n for n in all_dtype_names(include_aliases=False)
          if (get_dtype(n).kind == "float" or n in ("float16", "bfloat16") or n.startswith("float8_e"))
          and n != "float32"]


def _fma32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """float32 ``x * y + z`` rounded once: the float64 product is exact, the float64 sum is rounded to odd (its
    exact error from TwoSum decides the sticky bit), and the round-to-odd value rounds to float32 correctly."""
    x64, y64, z64 = (np.asarray(a, dtype=np.float64) for a in (x, y, z))
    p = x64 * y64
    s = p + z64
    bb = s - p
    err = (p - (s - bb)) + (z64 - bb)
    inexact = err != 0
    toward_zero = inexact & (np.sign(err) != np.sign(s)) & (s != 0)
    t = np.where(toward_zero, np.nextafter(s, 0), s)
    bits = np.where(inexact, t.view(np.int64) | 1, t.view(np.int64))
    return bits.view(np.float64).astype(np.float32)


def _round_f32(exact: Fraction) -> np.float32:
    """Correctly rounded float32 of an exact rational (nearest, ties to even), by checking the neighbours."""
    f = np.float32(float(exact))
    best = None
    for c in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))):
        d = abs(Fraction(float(c)) - exact)
        even = int(np.array(c).view(np.int32)) % 2 == 0
        if best is None or d < best[0] or (d == best[0] and even):
            best = (d, c)
    return best[1]


@pytest.fixture(scope="module")
def interpreter():
    """Kernels in Triton's interpreter, with a correctly rounded fma, and no decoder chosen yet."""
    ti = _interpreter
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    mp.setattr(ti.InterpreterBuilder, "create_fma",
               lambda self, x, y, z: ti.TensorHandle(_fma32(x.data, y.data, z.data), z.dtype.scalar))
    mp.setattr(td, "_STATE", {})
    yield
    mp.undo()


def _layer(weights_dtype: str, shape=(32, 64), seed: int = 0, **options):
    cfg = {"quant_method": "sdnq", "weights_dtype": weights_dtype, "sdnq_version": "0.2.8", **options}
    layout = plan_layer("linear", shape, QuantConfig.from_dict(cfg).options_for("l.weight", "linear"))
    gen = torch.Generator().manual_seed(seed)
    return layout, quantize_weight(torch.randn(shape, generator=gen), layout)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_decodes(layout, tensors, dtypes=(torch.float32, torch.float16, torch.bfloat16), svd=True) -> None:
    for dtype in dtypes:
        got = td.dequantize(layout, tensors, dtype, svd=svd)
        assert got is not None, f"{layout.dtype.name}: expected the kernel path"
        expected = dequantize(layout, tensors, dtype)
        assert got.shape == expected.shape and got.dtype == dtype
        assert torch.equal(_bits(got.contiguous()), _bits(expected.contiguous())), (layout.dtype.name, dtype)


def test_exact_fma_helper_rounds_once() -> None:
    """The fixture's fma against exact rational arithmetic, including a double-rounding trap (the float64 sum of
    the trap lands on a float32 tie that the exact value is above)."""
    rng = random.Random(0)
    xs = [np.float32(rng.uniform(-8, 8)) for _ in range(300)] + [np.float32(1 + 2**-12)]
    ys = [np.float32(rng.uniform(-8, 8)) for _ in range(300)] + [np.float32(1 + 2**-12)]
    zs = [np.float32(rng.uniform(-8, 8)) for _ in range(300)] + [np.float32(2.0**-80)]
    got = _fma32(np.array(xs), np.array(ys), np.array(zs))
    for i, (x, y, z) in enumerate(zip(xs, ys, zs)):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        assert got[i] == _round_f32(exact), (x, y, z)
    assert got[-1] == np.float32(1 + 2**-11 + 2**-23)  # a float64 sum first would give the tie's even 1 + 2**-11


@pytest.mark.parametrize("weights_dtype", INT_WIDTHS)
@pytest.mark.parametrize("group_size", [0, 32])
def test_every_integer_width_decodes_bit_exact(interpreter, weights_dtype: str, group_size: int) -> None:
    """Packed widths 1-15 (signed and unsigned), bytes, and int8/uint8/int16/uint16 weights: float32, float16 and
    bfloat16 results equal the codec's bit for bit."""
    layout, tensors = _layer(weights_dtype, group_size=group_size)
    _assert_decodes(layout, tensors)


@pytest.mark.parametrize("weights_dtype", FLOATS)
def test_every_float_code_type_decodes_bit_exact(interpreter, weights_dtype: str) -> None:
    """Every SDNQ mini-float (1-16 bits, signed and unsigned with zero point), float8 and 16-bit float weights."""
    layout, tensors = _layer(weights_dtype)
    _assert_decodes(layout, tensors, dtypes=(torch.float32,))


def test_float_list_is_complete() -> None:
    assert len(FLOATS) > 130 and {"float5_e2m2fn", "float8_e4m3fn", "float16_e5m10fn", "bfloat16"} <= set(FLOATS)


@pytest.mark.parametrize("case", ["svd", "codebook", "codebook_grouped", "double_quant", "hadamard", "transposed",
                                  "transposed_uint8", "tensorwise", "legacy_floats"])
def test_layout_variants_decode_bit_exact(interpreter, case: str) -> None:
    options = {
        "svd": ("uint4", {"use_svd": True, "svd_rank": 8, "group_size": 32}),
        "codebook": ("uint3", {"use_codebook": True}),
        "codebook_grouped": ("uint4", {"use_codebook": True, "group_size": 32}),
        "double_quant": ("uint4", {"scale_dtype": "int8", "zero_point_dtype": "uint8", "group_size": 16}),
        "hadamard": ("int5", {"use_hadamard": True, "hadamard_group_size": 32}),
        "transposed": ("int8", {"use_quantized_matmul": True}),
        "transposed_uint8": ("uint8", {"use_quantized_matmul": True}),
        "tensorwise": ("int6", {"group_size": -2}),
        "legacy_floats": ("float5_e2m2fn", {"sdnq_version": "0.2.0"}),
    }
    name, opts = options[case]
    layout, tensors = _layer(name, **opts)
    assert case != "transposed" or layout.transposed
    assert case != "legacy_floats" or layout.legacy_float_subnormals
    _assert_decodes(layout, tensors)
    if layout.svd_rank:  # without the SVD product: the forward's low-rank path
        no_svd = td.dequantize(layout, tensors, torch.float32, svd=False)
        bare = dequantize(layout, {k: (torch.zeros_like(v) if k.startswith("svd") else v)
                                   for k, v in tensors.items()}, torch.float32)
        assert torch.equal(no_svd, bare)


def test_storage_variants(interpreter) -> None:
    """9-15-bit words stored as uint16 (as some files do) and uint1 bytes widened to int64 (the reference's)."""
    layout, tensors = _layer("uint11", group_size=32)
    _assert_decodes(layout, dict(tensors, weight=tensors["weight"].view(torch.uint16)), dtypes=(torch.float32,))
    layout, tensors = _layer("uint1")
    assert tensors["weight"].dtype == torch.int64
    _assert_decodes(layout, tensors, dtypes=(torch.float32,))


@pytest.mark.parametrize("weights_dtype", ["uint3", "int11", "float5_e2m2fn", "int8"])
def test_any_value_range(interpreter, weights_dtype: str) -> None:
    """Values [first, first + count) from anywhere, even mid-chunk: the slice of the whole decode."""
    layout, tensors = _layer(weights_dtype, shape=(48, 64), group_size=16)
    p = td.plan(layout)
    decoder = td.get("cpu")
    scale, zero = tensors["scale"], tensors.get("zero_point")
    full = torch.empty(p.numel)
    decoder.decode(p, layout, tensors["weight"], scale, zero, full)
    assert torch.equal(full.view(48, 64), dequantize(layout, tensors, torch.float32))
    for first, count in ((3, 1), (5, 1021), (1000, p.numel - 1000), (p.numel - 7, 7)):
        part = torch.empty(count)
        decoder.decode(p, layout, tensors["weight"], scale, zero, part, first, count)
        assert torch.equal(part, full[first:first + count]), (first, count)


def test_unsupported_storage_takes_the_torch_path(interpreter) -> None:
    """bf16 companions, conv-shaped scales, 32-bit weights and damaged tensors: None (the caller uses torch)."""
    layout, tensors = _layer("uint4", group_size=32)
    assert td.dequantize(layout, dict(tensors, scale=tensors["scale"].bfloat16()), torch.float32) is None
    assert td.dequantize(layout, dict(tensors, weight=tensors["weight"][:-1]), torch.float32) is None
    assert td.dequantize(layout, dict(tensors, weight=tensors["weight"].to(torch.int16)), torch.float32) is None
    assert td.dequantize(layout, tensors, torch.float64) is None
    cfg = QuantConfig.from_dict({"quant_method": "sdnq", "weights_dtype": "uint4", "quant_conv": True,
                                 "sdnq_version": "0.2.8"})
    conv = plan_layer("conv", (32, 16, 3, 3), cfg.options_for("c.weight", "conv"))
    assert td.plan(conv) is None
    assert td.plan(dataclasses.replace(layout, dtype=get_dtype("int32"))) is None


def test_the_self_check_keeps_the_rounding_torch_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a correctly rounded fma the variant chosen rounds like torch.addcmul on this CPU; with the
    interpreter's own two-rounding fma a CPU whose torch fuses gets no decoder at all (the check compares bits)."""
    ti = _interpreter
    monkeypatch.setattr(ti.InterpreterBuilder, "create_fma", INTERPRETER_FMA)
    x, s, z = (torch.randn(4096, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch_fuses = torch.equal(torch.addcmul(z, x, s), torch.from_numpy(_fma32(x.numpy(), s.numpy(), z.numpy())))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(td, "_STATE", {})
    plain = td.get("cpu")
    if torch_fuses:
        assert plain is None
    else:
        assert plain is not None and not plain.fused
    monkeypatch.setattr(td, "_STATE", {})
    monkeypatch.setattr(ti.InterpreterBuilder, "create_fma",
                        lambda self, a, b, c: ti.TensorHandle(_fma32(a.data, b.data, c.data), c.dtype.scalar))
    chosen = td.get("cpu")
    assert chosen is not None and chosen.fused == torch_fuses


def test_switched_off_or_not_interpreting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(td, "_STATE", {})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert td.get("cpu") is None  # CPU tensors only ever go through the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DIFFUSERS_SDNQ_TRITON", "0")
    assert td.get("cpu") is None


def test_kernels_are_generated_from_the_packing_tables() -> None:
    """One kernel per unit layout, each reading exactly its layout's segments (a new width in LAYOUTS gets a
    kernel without any code written for it)."""
    layouts = td.unit_layouts()
    assert set(layouts) == set(LAYOUTS) | {8, 16}
    for key, lay in layouts.items():
        source = td.kernel_source(lay)
        assert source.count("tl.load(base +") == len(lay.segments), key
        lines = [line for line in source.splitlines() if "tl.load(base +" in line]
        for (k, lo, _n, u, pos), line in zip(lay.segments, lines):
            assert f"tl.load(base + {u}, mask=live{f' & (slot == {k})' if lay.values > 1 else ''}," in line
            assert (f">> {pos})" in line) == bool(pos) and (f"<< {lo})" in line) == bool(lo), line


@pytest.fixture
def gpu_kernels(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The generated kernels as GPU kernels (``triton.jit`` decides at decoration time), whatever the
    interpreter fixture set."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return td._kernels(False)


def _compile_for_hopper(kernel, out: str, **constants) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"units": "*u8", "out": out, "scale": "*fp32", "zero": "*fp32", "table": "*fp32", "first": "i32",
           "count": "i32", "group": "i32", "qmin": "i32", "levels": "i32", "xor": "i32"}
    const = {"HAS_ZERO": False, "HAS_TABLE": False, "CODEBOOK": False, "FUSED": True, "TRANSPOSED": False,
             "WIDE": False, "BLOCK": td.BLOCK, **constants}
    sig.update(dict.fromkeys(const, "constexpr"))
    compiled = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32))
    return compiled.asm


@pytest.mark.parametrize("variant", ["int", "table"])
def test_generated_kernels_compile_for_a_gpu(gpu_kernels: dict, variant: str) -> None:
    """Triton's compiler (no GPU needed) accepts every generated kernel and emits Hopper machine code; the
    interpreter alone would accept code a GPU build refuses."""
    kernels = gpu_kernels
    flags = {"int": {"HAS_ZERO": True, "FUSED": True}, "table": {"HAS_TABLE": True, "TRANSPOSED": True,
                                                                  "WIDE": True}}[variant]
    out = "*bf16" if variant == "int" else "*fp16"
    keys = sorted(kernels) if variant == "int" else [3, 8, 16]
    for key in keys:
        try:
            asm = _compile_for_hopper(kernels[key], out, **flags)
        except (RuntimeError, FileNotFoundError) as exc:  # no ptxas / CUDA toolkit pieces in this Triton wheel
            pytest.skip(f"Triton cannot build for sm_90 here: {exc}")
        assert "sm_90" in asm["ptx"] and asm.get("cubin"), key


def test_unfused_and_codebook_variants_compile(gpu_kernels: dict) -> None:
    kernels = gpu_kernels
    _compile_for_hopper(kernels[4], "*fp32", HAS_ZERO=True, FUSED=False)
    _compile_for_hopper(kernels[4], "*bf16", CODEBOOK=True)


# -------------------------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("weights_dtype", ["uint4", "int4", "uint3", "int8", "uint8", "uint11", "int15", "uint1",
                                           "float5_e2m2fn", "float8_e4m3fn", "bfloat16"])
@pytest.mark.parametrize("group_size", [0, 32])
def test_cuda_kernels_are_bit_exact(monkeypatch: pytest.MonkeyPatch, weights_dtype: str, group_size: int) -> None:
    """On the GPU: the kernels' float32, float16 and bfloat16 results (bfloat16 rounded by the kernel itself)
    against the torch codec on the same device."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels, whatever the interpreter fixture set
    monkeypatch.setattr(td, "_STATE", {})
    assert td.get("cuda") is not None, "Triton is installed and a GPU is present: the kernels must pass their check"
    layout, tensors = _layer(weights_dtype, shape=(256, 512), group_size=group_size)
    _assert_decodes(layout, {k: v.cuda() for k, v in tensors.items()})


def test_shipped_kernels_are_the_generated_ones() -> None:
    """The kernels ship as a generated file in the package (nothing is written or imported from a cache at run
    time); it must be exactly what the packing tables generate today."""
    assert td.GENERATED.read_text(encoding="utf-8") == td.generated_source(), \
        "src/diffusers_sdnq/layers/triton_kernels.py is stale: run python -m diffusers_sdnq.layers.triton_decode"
