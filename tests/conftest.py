"""Shared test set-up: offline, no torch.compile in the oracle, and reference fixtures built once per session.

The reference package (``sdnq``, GPL, test-only) registers itself into diffusers/transformers when imported,
so every reference run happens in a child process; the pytest process itself never imports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Children inherit this: the reference's children must not get our start-up hook (it would register our backend
# before the reference's and pin it, so the "reference" would load with ours). Our children import
# diffusers_sdnq explicitly; tests of the hook itself set it back to 1.
os.environ["DIFFUSERS_SDNQ_AUTOLOAD"] = "0"

import pytest  # noqa: E402

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

_CACHE_ROOT = Path(os.environ.get("DIFFUSERS_SDNQ_TEST_CACHE") or tempfile.mkdtemp(prefix="sdnq-tests-"))


def cache_root() -> Path:
    """Where reference fixtures live for this session (set DIFFUSERS_SDNQ_TEST_CACHE to reuse across runs)."""
    _CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    return _CACHE_ROOT


def oracle_matrix() -> tuple[Path, dict]:
    """Build (once) the single-layer conformance matrix with the reference, in a child process."""
    target = cache_root() / "oracle"
    index = target / "index.json"
    if not index.exists():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, str(TESTS / "oracle.py"), "--build", str(target)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the oracle matrix failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return target, json.loads(index.read_text())


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    return cache_root() / "models"


def run_python(code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (tests dir on sys.path); raise with its output on failure."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
