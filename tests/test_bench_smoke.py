"""``python -m bench --quick`` and ``python -m bench --gpu --dry-run`` run end to end and report their tables
(timings are not asserted: shared CPUs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import TESTS, cache_root

ROOT = TESTS.parent
sys.path.insert(0, str(ROOT))  # bench.gpu's report functions


def test_quick_bench_writes_ratio_table(tmp_path) -> None:
    work = cache_root() / "bench-quick"  # the reference-quantized checkpoints are reused between sessions
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDNQ_USE_TORCH_COMPILE": "0"}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--workdir", str(work), "--results", str(results)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    text = results.read_text()
    assert "### Ratios (one run)" in text and "## Machine" in text and "torch " in text
    row = re.search(r"^\| float32 \| uint4_svd \| ([0-9.]+) \| ([0-9.]+) \|", text, re.M)
    assert row, f"no float32 uint4_svd ratio row in:\n{text}"
    assert all(float(v) > 0 for v in row.groups())
    assert re.search(r"^\| uint4 \| \d+ \| [0-9.]+ \| \d+ % \|", text, re.M), "no dequantization throughput row"
    data = json.loads((work / "results.json").read_text())
    impls = {(r["impl"], r["variant"]) for r in data["results"]}
    assert {("dense", "dense"), ("reference", "uint4_svd"), ("ours", "uint4_svd")} <= impls
    ours = next(r for r in data["results"] if r["impl"] == "ours")
    ref = next(r for r in data["results"] if r["impl"] == "reference")
    # same checkpoint, same inputs: ours and the reference agree to float rounding
    assert abs(ours["rel_l2_vs_dense_fp32"] - ref["rel_l2_vs_dense_fp32"]) < 1e-4
    assert ours["quantized_layers"] == ref["quantized_layers"] > 0


def test_gpu_bench_dry_run_runs_every_stage(tmp_path) -> None:
    """``python -m bench --gpu --dry-run``: every stage of the GPU script on the CPU (tiny model, Triton interpreter),
    so the script that runs once on a rented GPU has run end to end before."""
    pytest.importorskip("triton")
    results = tmp_path / "RESULTS-gpu.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDNQ_USE_TORCH_COMPILE": "0", "OUT": str(tmp_path / "out")}
    (tmp_path / "out").mkdir()
    proc = subprocess.run([sys.executable, "-m", "bench", "--gpu", "--dry-run", "--workdir", str(tmp_path / "work"),
                           "--results", str(results), "--budget", "400"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"bench --gpu failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    text = results.read_text()
    assert (tmp_path / "out" / "RESULTS-gpu.md").read_text() == text  # copied where the device tool fetches files
    data = json.loads((tmp_path / "out" / "results-gpu.json").read_text())
    stages = data["stages"]
    assert {s for s, v in stages.items() if v["status"] not in ("done", "skipped")} == set(), stages
    assert {"bit-exact", "quantize", "dense", "ours", "reference"} <= set(stages)
    checks = [v for c in data["bit_exact"]["cases"] for v in c["results"].values()]
    assert checks and all(v["kernel"] and v["kernel_eq_torch"] for v in checks)
    rows = {(r["label"], r["variant"], r["mode"]): r for r in data["forward"]}
    for key in [("dense", "dense", "eager"), ("ours", "uint4_svd", "eager"), ("ours", "uint4_svd", "compiled"),
                ("ours", "uint4_svd", "group_offload"), ("reference", "uint4_svd", "eager")]:
        assert rows[key].get("forward_s", 0) > 0, rows.get(key)
    assert rows[("ours", "uint4_svd", "compiled")]["equal_to_eager"]
    assert rows[("ours", "uint4_svd", "group_offload")]["equal_to_eager"]
    assert "## Bit-exactness" in text and "### Goals of issue 18" in text and "Dry run on CPU" in text


def test_gpu_report_goals() -> None:
    """The goal lines of the GPU report, from made-up measurements (the GPU run cannot be repeated to fix them)."""
    from bench.gpu import goals

    gib = 2**30
    rows = [{"label": "dense", "impl": "dense", "variant": "dense", "mode": "eager", "forward_s": 1.0,
             "peak": 20 * gib, "weights_bytes": 8 * gib},
            {"label": "ours", "impl": "ours", "variant": "uint4_svd", "mode": "eager", "forward_s": 1.2, "peak": 15 * gib},
            {"label": "ours", "impl": "ours", "variant": "uint4_svd", "mode": "compiled", "forward_s": 1.05},
            {"label": "reference", "impl": "reference", "variant": "uint4_svd", "mode": "compiled", "forward_s": 1.5},
            {"label": "ours", "impl": "ours", "variant": "uint4_svd", "mode": "group_offload", "forward_s": 2.4,
             "peak": 3 * gib, "equal_to_eager": True}]
    checkpoints = {"uint4_svd": {"disk_bytes": 2 * gib, "largest_layer_numel": gib // 4}}
    text = "\n".join(goals(rows, checkpoints))
    assert "ours (compiled) / dense bf16 eager: 1.05 (goal <= 1.10) met" in text
    assert "ours (compiled) / reference (compiled, its compiled dequantizer): 0.70 (goal <= 1.00) met" in text
    # limit: checkpoint 2 + activations (20 - 8) + one dense layer 0.5 = 14.5 GiB < 15 GiB peak
    assert "ours peak VRAM 15.00 GiB" in text and "14.50 GiB: NOT met" in text
    assert "output equal to the resident model's: True" in text and "2.00x its forward time" in text
