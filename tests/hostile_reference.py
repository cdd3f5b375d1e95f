"""What the reference (``sdnq``, test-only oracle) does with the inputs of the hostile-input tests, measured once in
one child process and cached under the test cache (``DIFFUSERS_SDNQ_TEST_CACHE``) like the other fixtures:

* ``patterns.json``: for each name pattern, which layers of a small model the reference leaves dense when the
  pattern is its ``modules_to_not_convert`` (tests/faults/test_patterns.py);
* ``fnuz/<dtype>/`` and ``fnuz/<dtype>.expected.safetensors``: the tiny Qwen3 quantized by the reference to the fp8
  "fnuz" types (``F8_E4M3FNUZ`` / ``F8_E5M2FNUZ`` in the file), and the reference's own dequantized weights of
  those files (tests/test_cli.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import TESTS, cache_root
from tiny_models import get_fixture

VERSION = 1

NAMES = ["blocks.0.attn.to_q", "blocks.0.attn.to_k", "blocks.10.mlp.fc1", "blocks.1.mlp.fc1", "blocksX0.attn.to_q",
         "proj_out", "xblocks.0.to_q"]
PATTERNS = ["blocks.1*", "blocks.*.to_q", "blocks.0.*", "*to_[qk]*", "blocks.(0|1).attn*", ".blocks.0.attn.to_q*",
            "blocks.0.attn.to_q", "attn.to_q", "to_?*", "*.to_q", "b*0.attn", ".blocks", "blocks*fc1$",
            "^blocks\\.1\\d*", "bl.{2,4}s.1*", "[^x]+0*", "(.+)+X*", "to_q", "proj_out.weight"]
FNUZ_DTYPES = ("float8_e4m3fnuz", "float8_e5m2fnuz")

CHILD = r'''
import json, os, sys
os.environ["SDNQ_USE_TORCH_COMPILE"] = "0"
import torch
import sdnq
from sdnq.dequantizer import dequantize_sdnq_model
from safetensors.torch import save_file
import tiny_models as tm

names, patterns, dense, out, dtypes = (json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4],
                                       json.loads(sys.argv[5]))

def build():
    root = torch.nn.Module()
    for n in names:
        parent = root
        for part in n.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(n.split(".")[-1], torch.nn.Linear(32, 32))
    return root

skipped = {}
for p in patterns:
    m = build()
    sdnq.sdnq_post_load_quant(m, weights_dtype="int8", modules_to_not_convert=[p], minimum_allowed_numel=0,
                              minimum_allowed_channel_size=0, add_skip_keys=False)
    skipped[p] = [n for n in names if not hasattr(m.get_submodule(n), "sdnq_dequantizer")]
with open(os.path.join(out, "patterns.json"), "w") as fh:
    json.dump(skipped, fh)

for dtype in dtypes:
    dst = os.path.join(out, "fnuz", dtype)
    tm.quantize_with_reference(dense, dst, weights_dtype=dtype)
    model, _ = tm.load_with_reference(dst)
    layers = [n for n, m in model.named_modules() if hasattr(m, "sdnq_dequantizer")]
    model = dequantize_sdnq_model(model)
    save_file({n: model.get_submodule(n).weight.detach().float().contiguous() for n in layers},
              os.path.join(out, "fnuz", f"{dtype}.expected.safetensors"))
'''


def reference_outputs() -> Path:
    """The folder of the reference's outputs, built on first use (one child process, ~10 s)."""
    root = cache_root() / f"hostile-reference-v{VERSION}"
    if (root / "patterns.json").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "fnuz").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "DIFFUSERS_SDNQ_AUTOLOAD": "0", "SDNQ_USE_TORCH_COMPILE": "0"}
    dense = get_fixture("qwen3", "dense", cache_root() / "models")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(NAMES), json.dumps(PATTERNS), str(dense), str(tmp),
                           json.dumps(FNUZ_DTYPES)], capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"the reference child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    try:
        tmp.rename(root)
    except OSError:  # built meanwhile by another session
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def reference_patterns() -> dict[str, list[str]]:
    """{pattern: layers (of :data:`NAMES`) the reference leaves dense}."""
    return json.loads((reference_outputs() / "patterns.json").read_text())
