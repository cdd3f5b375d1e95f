"""The optional compiled decoder (``layers/native.py``, ``layers/native_decode.c``).

Oracle: the pure-torch codec (``format.codec.dequantize``), itself bit-exact with the reference (conformance
tests); the forward tests run with the compiled decoder too, since it is on by default.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from diffusers_sdnq.format import dequantize, plan_layer
from diffusers_sdnq.format.config import QuantConfig
from diffusers_sdnq.format.dtypes import all_dtype_names, get_dtype
from diffusers_sdnq.format.packing import LAYOUTS
from diffusers_sdnq.layers import forward as fwd
from diffusers_sdnq.layers import native
from diffusers_sdnq.quantize import quantize_weight

HAS_CC = native._compiler() is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine: the torch path is used")

WIDTHS = [f"uint{b}" for b in (*LAYOUTS, 8)] + [f"int{b}" for b in (*LAYOUTS, 8) if b > 1]
#: every float type the compiled loop decodes through its table (mini-floats of 1-15 bits, float8)
FLOATS = [n for n in all_dtype_names(include_aliases=False)
          if n.startswith("float") and native.handles(get_dtype(n))]


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """An empty build cache and no decoder loaded yet in this process."""
    monkeypatch.setenv("DIFFUSERS_SDNQ_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_STATE", {})
    return tmp_path


def _layer_tensors(weights_dtype: str, shape: tuple[int, int], group_size: int, seed: int = 0):
    cfg = {"quant_method": "sdnq", "weights_dtype": weights_dtype, "group_size": group_size,
           "dequantize_fp32": True, "sdnq_version": "0.2.8"}
    layout = plan_layer("linear", shape, QuantConfig.from_dict(cfg).options_for("l.weight", "linear"))
    gen = torch.Generator().manual_seed(seed)
    return layout, quantize_weight(torch.randn(shape, generator=gen), layout)


@needs_cc
def test_the_decoder_builds_and_passes_its_self_check() -> None:
    decoder = native.get()
    assert decoder is not None, "a C compiler is present, so the compiled decoder must load"
    assert decoder.path.exists()


def test_float_list_covers_mini_floats_and_float8() -> None:
    assert len(FLOATS) > 100 and {"float5_e2m2fn", "float8_e4m3fn", "float8_e5m2", "float3_e1m1fn"} <= set(FLOATS)
    assert "float16" not in FLOATS and "bfloat16" not in FLOATS


@needs_cc
@pytest.mark.parametrize("weights_dtype", WIDTHS + FLOATS)
@pytest.mark.parametrize("group_size", [0, 32])
def test_row_decoder_matches_the_torch_codec(weights_dtype: str, group_size: int) -> None:
    """Every integer width, grouped and per-row, float32 and bfloat16 out, blocks starting mid-weight."""
    shape = (192, 256)
    layout, tensors = _layer_tensors(weights_dtype, shape, group_size)
    decoder = fwd.RowDecoder(layout, tensors)
    assert decoder.native is not None, f"{weights_dtype}: expected the compiled path"
    for dtype in (torch.float32, torch.bfloat16):
        full = dequantize(layout, tensors, dtype)
        align = fwd.row_alignment(layout)
        for start, stop in ((0, shape[0]), (align * 8, shape[0]), (align * 4, align * 24)):
            assert torch.equal(decoder.rows(start, stop, dtype), full[start:stop]), (weights_dtype, dtype, start)


@needs_cc
def test_threads_split_large_blocks_exactly() -> None:
    """Above ~64k values a block is split between threads at tile boundaries: same values as one thread."""
    layout, tensors = _layer_tensors("uint5", (1024, 640), 64)
    decoder = fwd.RowDecoder(layout, tensors)
    assert decoder.native is not None
    out1, out2 = torch.empty(1024 * 640), torch.empty(1024 * 640)
    args = (tensors["weight"].reshape(-1), layout.dtype, 0, 1024 * 640, decoder.scale.reshape(-1),
            decoder.zero_point.reshape(-1), decoder.group)
    decoder.native.decode(*args, out1, threads=1)
    decoder.native.decode(*args, out2, threads=3)
    assert torch.equal(out1, out2)
    assert torch.equal(out1.view(1024, 640), dequantize(layout, tensors, torch.float32))


@needs_cc
def test_the_self_check_rejects_a_library_that_rounds_differently(fresh) -> None:
    """torch.addcmul rounds ``zero_point + code * scale`` once where the CPU has FMA; a library that rounds
    twice must then be refused (and the other way round), so the check really compares bits."""
    cc = native._compiler()
    results = {fused: native._agrees(native.NativeDecoder(native._build(cc, fused), fused)) for fused in (True, False)}
    assert sorted(results.values()) == [False, True], results
    chosen = native.get()
    assert chosen is not None and results[chosen.fused]


def test_opt_out_and_missing_compiler_fall_back_to_torch(fresh, monkeypatch: pytest.MonkeyPatch) -> None:
    layout, tensors = _layer_tensors("uint4", (128, 128), 32)
    expected = dequantize(layout, tensors, torch.float32)
    monkeypatch.setenv("DIFFUSERS_SDNQ_NATIVE", "0")
    assert native.get() is None
    decoder = fwd.RowDecoder(layout, tensors)
    assert decoder.native is None and torch.equal(decoder.rows(0, 128, torch.float32), expected)

    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.delenv("DIFFUSERS_SDNQ_NATIVE")
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.get() is None


def test_a_failing_compiler_falls_back_to_torch(fresh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    assert native.get() is None
    assert not list(fresh.rglob("*.so")), "no library may be left behind by a failed build"


@needs_cc
def test_a_damaged_cached_library_is_rebuilt(fresh) -> None:
    """A cache entry that does not load (a full disk, a copied cache) is built again, not trusted or fatal."""
    path = native._build(native._compiler(), True)
    path.write_bytes(b"not a shared library")  # never loaded in this process: safe to overwrite
    again = native.get()
    assert again is not None and again.path.read_bytes()[:4] == b"\x7fELF"


@needs_cc
def test_storage_it_does_not_handle_takes_the_torch_path() -> None:
    """bf16 scales, 16-bit floats and damaged storage go to the torch path (where their rounding and errors are
    defined)."""
    layout, tensors = _layer_tensors("uint4", (128, 128), 32)
    half = dict(tensors, scale=tensors["scale"].bfloat16(), zero_point=tensors["zero_point"].bfloat16())
    assert fwd.RowDecoder(layout, half).native is None
    assert torch.equal(fwd.RowDecoder(layout, half).rows(0, 128, torch.float32),
                       dequantize(layout, half, torch.float32))
    hlayout, htensors = _layer_tensors("float16", (128, 128), 32)  # 16-bit floats: converted by torch directly
    assert fwd.RowDecoder(hlayout, htensors).native is None
    short = dataclasses.replace(layout)
    truncated = dict(tensors, weight=tensors["weight"][:-1])
    assert fwd.RowDecoder(short, truncated).native is None  # the torch path then raises its own size error


def test_dequantize_weight_with_a_missing_companion_names_it() -> None:
    """The fast path never hides the codec's error for a layer that lost a stored tensor."""
    from diffusers_sdnq.format import SDNQShapeError
    from diffusers_sdnq.layers import SDNQLinear, assign_stored_tensor

    layout, tensors = _layer_tensors("uint4", (128, 128), 32)
    with torch.device("meta"):
        dense = torch.nn.Linear(128, 128, bias=False)
    layer = SDNQLinear.from_module(dense, layout, torch.float32)
    for name, value in tensors.items():
        assign_stored_tensor(layer, name, value)
    assert torch.equal(layer.dequantize_weight(), dequantize(layout, tensors, torch.float32))
    del layer._parameters["zero_point"]
    with pytest.raises(SDNQShapeError, match="zero_point"):
        layer.dequantize_weight()


@needs_cc
@pytest.mark.parametrize("name", ["uint4", "int4", "int8", "uint8"])
@pytest.mark.parametrize("group", [7, 33, 64, 100, 4096])
def test_vectorized_widths_match_torch_at_any_group_and_offset(name: str, group: int) -> None:
    """4- and 8-bit codes take 16/32-wide loops (a table per scale for 4 bits) where the CPU has AVX-512: runs of
    one scale that start mid-byte, end mid-vector or straddle tiles must give the same bits as the torch path."""
    from diffusers_sdnq.format import packing

    qd = get_dtype(name)
    gen = torch.Generator().manual_seed(group)
    n = group * 150 // 2 * 2
    codes = torch.randint(0, 2**qd.bits, (n,), generator=gen, dtype=torch.int32)
    stored = packing.pack(codes, qd.bits) if qd.bits == 4 else (codes - 128 * qd.signed).to(qd.torch_dtype)
    scale = torch.rand(n // group, generator=gen) * 3e-2 + 1e-3
    zero = torch.randn(n // group, generator=gen) * 0.1 if qd.unsigned else None
    full = native._reference_decode(stored, qd, group, scale, zero).reshape(-1)
    decoder = native.get()
    for dtype in (torch.float32, torch.bfloat16):
        for first, count in ((0, n), (2, n - 4), (group + group % 2, n // 4 * 2)):  # even: whole bytes
            out = torch.empty(count, dtype=dtype)
            decoder.decode(stored, qd, first, count, scale, zero, group, out, threads=2)
            assert torch.equal(out, full[first:first + count].to(dtype)), (dtype, first, count)


@needs_cc
def test_quantized_matmul_helpers_agree_with_torch() -> None:
    """Activation codes, the scaled epilogue and the re-quantization (layers/qmatmul.py) equal the torch
    operations they replace, bit for bit, on every input/output dtype (zero rows, infinities, halves)."""
    decoder = native.get()
    assert native._qmm_agrees(decoder)
    assert native.qmm_helpers() is decoder


@needs_cc
def test_quantized_matmul_helpers_that_differ_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = native.get()
    real = decoder.scale_rows

    def off_by_an_ulp(*args, **kwargs):
        out = real(*args, **kwargs)
        return None if out is None else torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(decoder, "scale_rows", off_by_an_ulp)
    assert not native._qmm_agrees(decoder)
    monkeypatch.setattr(decoder, "qmm_ok", None)
    assert native.qmm_helpers() is None  # the quantized matmul then runs on torch operations
    monkeypatch.setattr(decoder, "qmm_ok", None)
