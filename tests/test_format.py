"""Codec properties that need no reference: packing round trips, table checks, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_sdnq.format import (
    DTYPES,
    LAYOUTS,
    LayerOptions,
    SDNQDtypeError,
    SDNQShapeError,
    check_stored,
    dequantize,
    floats,
    get_dtype,
    pack,
    packed_shape,
    plan_layer,
    unpack,
)


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from(sorted(LAYOUTS)), chunks=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_is_identity(bits: int, chunks: int, seed: int) -> None:
    n = chunks * LAYOUTS[bits].values_per_chunk
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert tuple(packed.shape) == packed_shape(n, bits)
    assert torch.equal(unpack(packed, bits, n).long(), codes)


@pytest.mark.parametrize("bits", sorted(LAYOUTS))
def test_each_value_bit_lands_in_its_own_unit_bit(bits: int) -> None:
    """Independent check of the layout tables: a single set bit packs to a single set bit."""
    layout = LAYOUTS[bits]
    seen = set()
    for k in range(layout.values_per_chunk):
        for b in range(bits):
            codes = torch.zeros(layout.values_per_chunk, dtype=torch.int64)
            codes[k] = 1 << b
            units = pack(codes, bits).reshape(-1).to(torch.int64) & ((1 << layout.unit_bits) - 1)
            hot = [(u, p) for u in range(units.numel()) for p in range(layout.unit_bits) if units[u] >> p & 1]
            assert len(hot) == 1
            seen.add(hot[0])
    assert len(seen) == layout.values_per_chunk * bits


def test_custom_float_decode_matches_ieee_half() -> None:
    """float16_e5m10fn codes are IEEE half bit patterns apart from inf/nan, so torch can check our decoder."""
    qd = get_dtype("float16_e5m10fn")
    codes = torch.arange(0, 2**16, dtype=torch.int32)
    finite = ((codes >> 10) & 0x1F) != 0x1F
    ours = floats.decode(codes[finite], qd)
    half = codes[finite].to(torch.int16).view(torch.float16).float()
    assert torch.equal(ours, half)


def test_custom_float_encode_decode_round_trip() -> None:
    qd = get_dtype("float6_e3m2fn")
    codes = torch.arange(0, 64, dtype=torch.int32)
    values = floats.decode(codes, qd)
    again = floats.decode(floats.encode(values, qd), qd)
    assert torch.equal(again, values)


def test_dtype_table_has_every_family() -> None:
    assert len(DTYPES) == 176
    assert get_dtype("fp8").name == "float8_e4m3fn" and get_dtype("bool").name == "uint1"
    assert get_dtype("float8_e4m3fn_sdnq").qmax == 480.0 and get_dtype("float6_e3m2fn").qmax == 28.0


def test_unknown_dtype_is_a_value_error_naming_it() -> None:
    with pytest.raises(SDNQDtypeError, match="uint33") as info:
        get_dtype("uint33")
    assert isinstance(info.value, ValueError)


def _uint4_layer():
    layout = plan_layer("linear", (64, 256), LayerOptions(weights_dtype="uint4"))
    w = torch.randn(64, 256)
    codes = torch.randint(0, 16, (64 * 256,))
    tensors = {"weight": pack(codes, 4), "scale": torch.rand(64, 4, 1), "zero_point": torch.randn(64, 4, 1)}
    return layout, tensors, w


def test_wrong_byte_count_names_the_tensor() -> None:
    layout, tensors, _ = _uint4_layer()
    tensors["weight"] = tensors["weight"][:-2]
    with pytest.raises(SDNQShapeError, match=r"blk\.weight.*uint8 \[8190\].*expected uint8 \[8192\]"):
        check_stored(layout, tensors, prefix="blk.")
    with pytest.raises(SDNQShapeError, match="weight"):
        dequantize(layout, tensors)


def test_wrong_scale_shape_and_missing_zero_point_are_reported_together() -> None:
    layout, tensors, _ = _uint4_layer()
    tensors["scale"] = torch.rand(64, 2, 1)
    del tensors["zero_point"]
    with pytest.raises(SDNQShapeError) as info:
        check_stored(layout, tensors, prefix="blk.")
    msg = str(info.value)
    assert "'blk.scale' is float32 [64, 2, 1], expected" in msg and "missing tensor 'blk.zero_point'" in msg


def test_unexpected_tensor_is_reported() -> None:
    layout, tensors, _ = _uint4_layer()
    tensors["svd_up"] = torch.zeros(64, 8)
    with pytest.raises(SDNQShapeError, match="unexpected tensor 'blk.svd_up'"):
        check_stored(layout, tensors, prefix="blk.")


def test_dequantize_matches_float_math() -> None:
    """Independent computation: uint4 asymmetric dequantization is zero_point + code * scale per group."""
    torch.manual_seed(1)
    layout, tensors, _ = _uint4_layer()
    codes = unpack(tensors["weight"], 4).reshape(64, 4, 64).double()
    expected = (tensors["zero_point"].double() + codes * tensors["scale"].double()).reshape(64, 256)
    # exact in float64; the codec rounds once (fused multiply-add) in float32: within half an ulp of the result
    got = dequantize(layout, tensors).double()
    assert ((got - expected).abs() <= expected.abs() * 2.0**-24 + 1e-30).all()


def test_package_never_imports_the_reference() -> None:
    code = "import sys, diffusers_sdnq, diffusers_sdnq.format, diffusers_sdnq.layers; assert 'sdnq' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_format_package_has_no_hf_imports() -> None:
    code = ("import sys, diffusers_sdnq.format.codec, diffusers_sdnq.format.config, diffusers_sdnq.format.layout;"
            "bad=[m for m in ('diffusers','transformers','peft','sdnq') if m in sys.modules]; assert not bad, bad")
    # import the subpackage without the package __init__ (which registers into diffusers/transformers)
    code = "import importlib.util, sys, types\n" \
           "spec = importlib.util.find_spec('diffusers_sdnq'); pkg = types.ModuleType('diffusers_sdnq');" \
           "pkg.__path__ = list(spec.submodule_search_locations); sys.modules['diffusers_sdnq'] = pkg\n" + code
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_width_mismatch_says_what_the_files_hold() -> None:
    """A config that says uint4 for a layer stored as 5-bit codes: the error names both."""
    layout, tensors, _ = _uint4_layer()
    numel = 64 * 256
    tensors["weight"] = pack(torch.randint(0, 32, (numel,)), 5)
    with pytest.raises(SDNQShapeError) as info:
        check_stored(layout, tensors, prefix="blk.")
    msg = str(info.value)
    assert "'blk.weight' is uint8 [2048, 5], expected uint8 [8192]" in msg
    assert "look like: 5-bit codes, 4 groups of 64, transposed" not in msg
    assert "look like: 5-bit codes, 4 groups of 64, a zero point" in msg
