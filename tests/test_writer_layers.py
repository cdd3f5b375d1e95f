"""Layer-level writer checks: every layout of the reference's conformance matrix, SVD determinism, dynamic order.

The conformance matrix (``tests/oracle.py``, built by the reference in a child process) holds for each case the
dense weight and the reference's own dequantized result. Our writer quantizes the same dense weight into the
layout the same config plans; the stored tensors must fit that layout exactly (what the reference's loader
re-derives), decode without error, and reconstruct the weight at least as well as the reference (≤ 1.05x its
mean squared error; the summary is printed).
"""

from __future__ import annotations

import json
import math
import statistics

import torch
from conftest import oracle_matrix
from safetensors.torch import load_file

from diffusers_sdnq.format import check_stored, dequantize, layer_kind_of, plan_layer
from diffusers_sdnq.format.config import QuantConfig
from diffusers_sdnq.quantize import candidates, default_threshold, quantize_weight, relative_error
from diffusers_sdnq.quantize.lowrank import low_rank

ROOT, INDEX = oracle_matrix()
CASES = INDEX["cases"]


def _case(case_id: str):
    meta = json.loads((ROOT / f"{case_id}.json").read_text())
    expected = load_file(ROOT / f"{case_id}.expected.safetensors")
    layer = meta["layer"]
    config = QuantConfig.from_dict(meta["quantization_config"])
    kind = layer_kind_of(layer["class_name"])
    dense = expected["original_weight"]
    layout = plan_layer(kind, tuple(dense.shape), config.options_for(layer["param_name"], kind))
    return config, layout, dense, expected["weight"]


def test_writer_quality_at_least_reference_on_the_matrix() -> None:
    """One loop over the ~500 cases (a test each would spend most of its time in pytest); the per-category
    summary is printed, every failing case is listed."""
    ratios: dict[str, float] = {}
    failures: list[str] = []
    for case_id in CASES:
        config, layout, dense, reference = _case(case_id)
        try:
            tensors = quantize_weight(dense, layout, dtype=dense.dtype, svd_steps=config.svd_steps,
                                      codebook_steps=config.codebook_steps)
            check_stored(layout, tensors, prefix="layer.")
            ours = dequantize(layout, tensors, dense.dtype)
        except Exception as exc:  # noqa: BLE001 - report every case, then fail
            failures.append(f"{case_id}: {type(exc).__name__}: {exc}")
            continue
        e_ours, e_ref = relative_error(dense, ours), relative_error(dense, reference)
        ratios[case_id] = e_ours / e_ref if e_ref > 0 else (1.0 if e_ours == 0 else math.inf)
        if not torch.isfinite(ours).all() or ratios[case_id] > 1.05:
            failures.append(f"{case_id}: ours {e_ours:.4g} vs reference {e_ref:.4g}")
    by_category: dict[str, list[float]] = {}
    for case_id, ratio in ratios.items():
        by_category.setdefault(case_id.split("-")[0], []).append(ratio)
    lines = [f"  {cat:10s} n={len(r):3d}  median {statistics.median(r):.3f}  max {max(r):.3f}"
             for cat, r in sorted(by_category.items())]
    print(f"\nour MSE / reference MSE on the conformance matrix ({len(ratios)} cases):\n" + "\n".join(lines))
    assert len(ratios) + len(failures) == len(CASES) and len(CASES) > 400
    assert not failures, "\n".join(failures[:20])


def test_svd_is_deterministic_and_leaves_global_rng_alone() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(300, 200, generator=gen) @ torch.randn(200, 400, generator=gen) / 200
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = low_rank(w, 16, 8, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    b = low_rank(w, 16, 8, seed=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)  # Eckart-Young optimum
    best = (w.double() - (u[:, :16] * s[:16]) @ vh[:16]).norm()
    ours = (w.double() - (a[0] @ a[1]).double()).norm()
    assert ours <= best * 1.001, (float(ours), float(best))


def test_dynamic_candidates_follow_the_measured_order() -> None:
    """Width by width: signed integer, signed floats (torch's first at 8 bits), unsigned integer, unsigned floats;
    never narrower than the configured type (measured on the reference, see quantize/dynamic.py)."""
    assert candidates("uint4")[:10] == ["uint4", "float4_e2m2fnu", "float4_e3m1fnu", "float4_e4m0fnu", "int5",
                                        "float5_e2m2fn", "float5_e3m1fn", "float5_e4m0fn", "uint5", "float5_e2m3fnu"]
    eight = candidates("int8")[:8]
    assert eight == ["int8", "float8_e4m3fn", "float8_e5m2", "float8_e2m5fn", "float8_e3m4fn", "float8_e4m3fn_sdnq",
                     "float8_e5m2fn", "uint8"]
    assert candidates("int4")[-1] == "float16_e5m11fnu"
    assert default_threshold(candidates("uint4")[0] and __import__("diffusers_sdnq").get_dtype("uint4")) == 1e-2
