"""Configuration from the environment never breaks a user's import (issue 16 item 5).

``DIFFUSERS_SDNQ_FORWARD=chunk_mb=abc`` broke ``from transformers import AutoTokenizer``, ``from diffusers import
DiffusionPipeline`` and ``import peft`` in every process of the environment: the value was parsed while the
start-up hook set the package up, and the hook only caught ImportError. Each check runs in a fresh interpreter
with the hook on (it acts at start-up).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import TESTS

pytestmark = pytest.mark.skipif(
    not any((Path(p) / "diffusers_sdnq.pth").is_file()
            for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}),
    reason="the start-up hook (diffusers_sdnq.pth) is not installed in this environment")

IMPORTS = r'''
import sys, warnings
warnings.simplefilter("default")
from transformers import AutoTokenizer
from diffusers import DiffusionPipeline
import peft
print("imported", "diffusers_sdnq" in sys.modules)
if "--check-defaults" in sys.argv:
    from diffusers_sdnq.layers import forward, native
    assert forward.DEFAULT_OPTIONS == forward.ForwardOptions(chunk_mb=4.0), forward.DEFAULT_OPTIONS
    assert native.enabled_by_env() is True
    print("defaults used")
'''


def _run(code: str, *args: str, extra_path: str = "", **env: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (extra_path, os.environ.get("PYTHONPATH", ""), str(TESTS)) if p)
    full = {**os.environ, "DIFFUSERS_SDNQ_AUTOLOAD": "1", "PYTHONPATH": path, **env}
    return subprocess.run([sys.executable, "-c", code, *args], env=full, capture_output=True, text=True,
                          timeout=600)


def test_bad_environment_values_warn_once_and_use_the_defaults() -> None:
    proc = _run(IMPORTS, "--check-defaults", DIFFUSERS_SDNQ_FORWARD="chunk_mb=abc,svd=maybe,chunk_mb=4",
                DIFFUSERS_SDNQ_NATIVE="maybe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported True" in proc.stdout and "defaults used" in proc.stdout, proc.stdout
    forward = [line for line in proc.stderr.splitlines() if "SDNQEnvironmentWarning" in line and "FORWARD" in line]
    assert len(forward) == 1, proc.stderr[-3000:]
    assert "DIFFUSERS_SDNQ_FORWARD='chunk_mb=abc,svd=maybe,chunk_mb=4'" in forward[0]
    assert "'chunk_mb=abc', 'svd=maybe'" in forward[0]
    native = [line for line in proc.stderr.splitlines() if "SDNQEnvironmentWarning" in line and "NATIVE" in line]
    assert len(native) == 1 and "DIFFUSERS_SDNQ_NATIVE='maybe'" in native[0], proc.stderr[-3000:]


def test_any_failure_of_the_start_up_hook_is_logged_not_raised(tmp_path: Path) -> None:
    """A broken install (here: the package's hook module raising RuntimeError on import) must not break
    ``import peft``: the hook logs one line and the import completes."""
    fake = tmp_path / "fake" / "diffusers_sdnq" / "integrations"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "hooks.py").write_text("raise RuntimeError('broken install')\n")
    # a stand-in "peft" (one of the watched modules) keeps this child light: the hook reacts to its name
    (tmp_path / "fake" / "peft").mkdir()
    (tmp_path / "fake" / "peft" / "__init__.py").write_text("VALUE = 1\n")
    proc = _run("import peft; print('imported', peft.VALUE)", extra_path=str(tmp_path / "fake"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported" in proc.stdout
    assert "could not set itself up after" in proc.stderr and "RuntimeError: broken install" in proc.stderr, \
        proc.stderr[-3000:]
