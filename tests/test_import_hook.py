"""The start-up hook: with diffusers-sdnq installed, an SDNQ checkpoint is never read as dense weights, even in a
process that never imports ``diffusers_sdnq``.

Each check runs in a fresh interpreter (the hook acts at start-up). The oracle for the weights is an explicit
``import diffusers_sdnq`` load of the same folder in another fresh interpreter, whose agreement with the
reference is tested in test_pipelines.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import cache_root
from safetensors.torch import load_file
from tiny_models import get_fixture

HOOK_ON = {**os.environ, "DIFFUSERS_SDNQ_AUTOLOAD": "1"}
HOOK_OFF = {**os.environ, "DIFFUSERS_SDNQ_AUTOLOAD": "0"}

LOAD = r'''
import json, sys
from pathlib import Path
explicit, root, out = sys.argv[1] == "explicit", Path(sys.argv[2]), Path(sys.argv[3])
if explicit:
    import diffusers_sdnq
import torch
from diffusers import Flux2Transformer2DModel
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
lm = AutoModelForCausalLM.from_pretrained(root / "text_encoder")
tr = Flux2Transformer2DModel.from_pretrained(root / "transformer")
tensors = {}
for tag, model in (("lm", lm), ("tr", tr)):
    for name, module in model.named_modules():
        if hasattr(module, "dequantize_weight"):
            tensors[f"{tag}.{name}"] = module.dequantize_weight().contiguous()
with torch.no_grad():
    tensors["logits"] = lm(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])).logits.contiguous()
save_file(tensors, str(out))
print(json.dumps({"sdnq_imported": "sdnq" in sys.modules, "ours_imported": "diffusers_sdnq" in sys.modules}))
'''


def _pth_installed() -> bool:
    return any((Path(p) / "diffusers_sdnq.pth").is_file()
               for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})


def _run(code: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_hook_file_is_installed() -> None:
    assert _pth_installed(), "diffusers_sdnq.pth is not in site-packages: reinstall with `pip install -e .`"


def test_startup_imports_nothing_heavy() -> None:
    code = ("import sys, json; print(json.dumps([m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'diffusers', 'transformers', 'peft', 'diffusers_sdnq', 'sdnq')]))")
    heavy = json.loads(_run(code, env=HOOK_ON).stdout.strip().splitlines()[-1])
    assert heavy == []
    code = "import sys; print(any(getattr(f, 'diffusers_sdnq_hook', False) for f in sys.meta_path))"
    assert _run(code, env=HOOK_ON).stdout.strip() == "True"
    assert _run(code, env=HOOK_OFF).stdout.strip() == "False"


def test_checkpoint_loads_quantized_without_importing_us(tmp_path: Path) -> None:
    folder = get_fixture("flux2_klein", "int8", cache_root() / "models")
    implicit, explicit = tmp_path / "implicit.safetensors", tmp_path / "explicit.safetensors"
    info = json.loads(_run(LOAD, "implicit", str(folder), str(implicit), env=HOOK_ON).stdout.strip().splitlines()[-1])
    assert info == {"sdnq_imported": False, "ours_imported": True}
    _run(LOAD, "explicit", str(folder), str(explicit), env=HOOK_OFF)
    got, want = load_file(implicit), load_file(explicit)
    n_lm = sum(k.startswith("lm.") for k in want)
    n_tr = sum(k.startswith("tr.") for k in want)
    assert n_lm > 0 and n_tr > 0
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_opt_out_leaves_transformers_alone() -> None:
    code = ("from transformers.quantizers import auto; import sys; "
            "print('sdnq' in auto.AUTO_QUANTIZER_MAPPING, 'diffusers_sdnq' in sys.modules)")
    assert _run(code, env=HOOK_OFF).stdout.strip() == "False False"
    assert _run(code, env=HOOK_ON).stdout.strip() == "True True"


@pytest.mark.parametrize("first", ["transformers", "diffusers", "peft", "diffusers_sdnq.integrations.transformers",
                                   "diffusers_sdnq.integrations.diffusers"])
def test_explicit_import_after_the_library_registers(first: str) -> None:
    """Hook off, library imported first, diffusers_sdnq second: still registered (no import-order trap). Importing
    one of our adapters first imports the library from inside our own import: the step waits for it."""
    code = (f"import {first}, importlib; import diffusers_sdnq; "
            "from transformers.quantizers import auto as ta; from diffusers.quantizers import auto as da; "
            "from diffusers_sdnq.integrations.transformers import SDNQHfQuantizer; "
            "from diffusers_sdnq.integrations.diffusers import SDNQDiffusersQuantizer; "
            "print(ta.AUTO_QUANTIZER_MAPPING['sdnq'] is SDNQHfQuantizer, "
            "da.AUTO_QUANTIZER_MAPPING['sdnq'] is SDNQDiffusersQuantizer)")
    assert _run(code, env=HOOK_OFF).stdout.strip() == "True True"
