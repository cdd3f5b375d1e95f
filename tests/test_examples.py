"""Every script in examples/ runs to completion offline, as a user would run it.

Scripts are discovered with a glob, so an example added later is tested without touching this file. Each runs in
a fresh interpreter (``.py``) or bash (``.sh``) with the network off, a private TMPDIR and working directory,
the package's start-up hook left on (a user's default), and the installed ``diffusers-sdnq`` command on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh") and not p.name.startswith("_"))
#: the examples issue 9 asks for (load + generate, LoRA inference, LoRA training, quantize and save, CLI usage)
REQUIRED = {"quickstart.py", "load_and_generate.py", "lora_inference.py", "lora_training.py", "quantize_and_save.py",
            "cli_usage.sh"}
#: generous against a loaded CI machine; each example takes well under a minute on 2 idle cores
TIMEOUT_S = 300


def test_required_examples_exist() -> None:
    missing = REQUIRED - {p.name for p in SCRIPTS}
    assert not missing, f"examples/ lacks {sorted(missing)}"


def _command(script: Path) -> list[str]:
    if script.suffix == ".py":
        return [sys.executable, str(script)]
    bash = shutil.which("bash")
    assert bash, "bash is needed to run the shell examples"
    return [bash, str(script)]


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)  # the venv's diffusers-sdnq console script
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TMPDIR": str(tmp_path),
           "DIFFUSERS_SDNQ_AUTOLOAD": "1", "PYTHON": sys.executable,
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(_command(script), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script.name} ran longer than {TIMEOUT_S}s:\n{(exc.stdout or b'')[-3000:]!r}")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, (f"{script.name} exited with {proc.returncode} after {seconds:.0f}s\n"
                                  f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
