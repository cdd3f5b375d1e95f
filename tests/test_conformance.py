"""Every case of the reference's conformance matrix decodes bit-exactly with our codec.

The reference quantizes one random layer per case (in a child process) and writes its stored tensors, its
quantization_config and its own dequantized weight. We plan the layer from the config alone, check the stored
tensors against the plan, dequantize, and require ``torch.equal`` with the reference's weight.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import oracle_matrix
from safetensors.torch import load_file

from diffusers_sdnq.format import check_stored, dequantize, layer_kind_of, plan_layer
from diffusers_sdnq.format.config import QuantConfig

ROOT, INDEX = oracle_matrix()
CASES = INDEX["cases"]


def _kind(class_name: str) -> str:
    return layer_kind_of(class_name)


def _dense_shape(layer: dict) -> tuple[int, ...]:
    cls = getattr(torch.nn, layer["class_name"])
    with torch.device("meta"):
        return tuple(cls(*layer["args"]).weight.shape)


# Cases we knowingly do not match bit for bit yet (strict: the test fails once they start to pass).
KNOWN_DIVERGENT: dict[str, str] = {}


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(reason=KNOWN_DIVERGENT[case], strict=True)] if case in KNOWN_DIVERGENT else []
        yield pytest.param(case, marks=marks, id=case)


def test_grouped_conv_transpose_that_cannot_exist_is_refused_clearly() -> None:
    """The reference itself cannot write a grouped ConvTranspose whose output channels differ from its input
    channels (its split does not fit); a config claiming one must not be decoded by guessing."""
    from diffusers_sdnq.format import SDNQConfigError

    assert "convT2d-uint4-grouped-nonsquare" in INDEX["rejected"]
    # sdnq_version: releases before 0.1.9 split dim 0 instead, where this layout is legal (docs/format-history.md)
    config = QuantConfig.from_dict({"quant_method": "sdnq", "weights_dtype": "uint4", "quant_conv": True,
                                    "sdnq_version": "0.2.8"})
    with pytest.raises(SDNQConfigError, match=r"ConvTranspose layer with weight \[64, 32, 3, 3\]"):
        plan_layer("conv_transpose", (64, 32, 3, 3), config.options_for("layer.weight", "conv_transpose"))


@pytest.mark.parametrize("case_id", list(_params()))
def test_reference_case_bit_exact(case_id: str) -> None:
    meta = json.loads((ROOT / f"{case_id}.json").read_text())
    stored = load_file(ROOT / f"{case_id}.safetensors")
    expected = load_file(ROOT / f"{case_id}.expected.safetensors")["weight"]
    layer = meta["layer"]
    config = QuantConfig.from_dict(meta["quantization_config"])
    kind = _kind(layer["class_name"])
    assert not config.is_skipped(layer["param_name"]), "the reference quantized this layer"
    layout = plan_layer(kind, _dense_shape(layer), config.options_for(layer["param_name"], kind))
    tensors = {k: v for k, v in stored.items() if k != "bias"}
    layout = check_stored(layout, tensors, prefix="layer.")
    ours = dequantize(layout, tensors, expected.dtype)
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    if not torch.equal(ours, expected):
        diff = (ours.float() - expected.float()).abs()
        pytest.fail(f"{case_id}: {int((diff > 0).sum())} of {diff.numel()} elements differ (max {diff.max():.3g}); "
                    f"layout {layout}\nreference: {meta.get('reference_debug')}")


def test_matrix_covers_every_reference_dtype() -> None:
    """Each name in the reference's dtype table (aliases included) has a bit-exact case."""
    from diffusers_sdnq.format import all_dtype_names

    names = {json.loads((ROOT / f"{c}.json").read_text())["case"]["weights_dtype"] for c in CASES}
    missing = set(all_dtype_names()) - names
    assert not missing, f"dtypes without a conformance case: {sorted(missing)}"
    print(f"\nconformance matrix: {len(CASES)} cases, {len(names)} dtype names, "
          f"{len(INDEX['rejected'])} rejected by the reference itself")


@pytest.mark.parametrize("case_id", CASES)
def test_layout_inferred_from_stored_tensors(case_id: str) -> None:
    """Without the config, the stored tensors alone give back width, grouping, transposition and SVD rank."""
    from diffusers_sdnq.format import infer_stored

    meta = json.loads((ROOT / f"{case_id}.json").read_text())
    config = QuantConfig.from_dict(meta["quantization_config"])
    layer = meta["layer"]
    kind = _kind(layer["class_name"])
    layout = plan_layer(kind, _dense_shape(layer), config.options_for(layer["param_name"], kind))
    stored = load_file(ROOT / f"{case_id}.safetensors")
    facts = infer_stored(kind, layout.weight_shape, stored)
    assert facts.bits == layout.dtype.bits
    assert facts.transposed == layout.transposed
    assert facts.has_zero_point == ("zero_point" in stored)
    if layout.svd_rank:
        assert facts.svd_rank == stored["svd_up"].shape[0 if layout.svd_transposed else 1]
    if not layout.codebook and layout.scale_qdtype is None:
        assert (facts.group_size, facts.num_groups) == (layout.group_size, layout.num_groups) or (
            layout.num_groups == 1 and facts.group_size in (-1, -2) and layout.group_size in (-1, -2)
            and math.prod(layout.scale_shape) == 1)
