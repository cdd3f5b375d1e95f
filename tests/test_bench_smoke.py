"""``python -m bench --quick`` runs end to end and reports its tables (timings are not asserted: shared CPUs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import TESTS, cache_root

ROOT = TESTS.parent


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
