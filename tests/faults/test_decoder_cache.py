"""The compiled decoder's cache (issue 16 item 4): a damaged, planted or unprotected library is never loaded, and
any failure leaves the torch path in use with one log line.

``dlopen`` of a truncated library dies with SIGBUS, of a mangled one with SIGILL, and runs a planted one's
constructor, so every case runs in a child process: a crash is the child's exit status (a test failure), not a
dead pytest. The library is compiled once per module with a compiler wrapper; each case copies that cache, damages
it, and runs the child with the wrapper set to fail, so nothing can be rebuilt there and the child shows exactly
what it did with the damaged files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TESTS

from diffusers_sdnq.layers import native

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler: the torch path is always used")

RUNNER = r"""
import json, logging, os, sys
import torch
from diffusers_sdnq.format import dequantize, plan_layer
from diffusers_sdnq.format.config import QuantConfig
from diffusers_sdnq.layers import forward as fwd
from diffusers_sdnq.layers import native
from diffusers_sdnq.quantize import quantize_weight



def scenario(cache, patch, fail_compiler, log_file):
    # no torch operation runs before the fork: OpenMP's threads do not survive one
    cfg = QuantConfig.from_dict({"weights_dtype": "uint4", "group_size": 32, "sdnq_version": "0.2.8"})
    layout = plan_layer("linear", (128, 128), cfg.options_for("l.weight", "linear"))
    tensors = quantize_weight(torch.randn(128, 128, generator=torch.Generator().manual_seed(0)), layout)
    expected = dequantize(layout, tensors, torch.float32)
    os.environ["DIFFUSERS_SDNQ_CACHE"] = cache
    if fail_compiler:
        os.environ["SDNQ_TEST_CC_FAIL"] = "1"
    logging.basicConfig(level=logging.DEBUG, filename=log_file, format="%(name)s %(message)s")
    if patch == "self-check-fails":
        native._agrees = lambda decoder: False
    elif patch == "decode-raises":
        def refuse(self, *args, **kwargs):
            raise RuntimeError("native decode refused its arguments")
        native.NativeDecoder.decode = refuse
    decoder = native.get()
    again = native.get()  # decided once: never an exception on a later call (a forward)
    rows = fwd.RowDecoder(layout, tensors).rows(0, 128, torch.float32)
    return {"decoder": decoder is not None, "same": again is decoder, "exact": bool(torch.equal(rows, expected))}


results = {}
for name, (cache, patch, fail_compiler) in json.loads(sys.argv[1]).items():
    out_file, log_file = f"{cache}.json", f"{cache}.log"
    pid = os.fork()  # each case in its own process: a crash in dlopen kills only that case
    if pid == 0:
        try:
            result = scenario(cache, patch, fail_compiler, log_file)
            with open(out_file, "w") as fh:
                json.dump(result, fh)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    result = {"status": status}
    if os.WIFSIGNALED(status):
        result["signal"] = os.WTERMSIG(status)
    if os.path.exists(out_file):
        result.update(json.load(open(out_file)))
    log = open(log_file).read().splitlines() if os.path.exists(log_file) else []
    result["log"] = [line for line in log if line.startswith("diffusers_sdnq") and "diffusers-sdnq:" in line]
    results[name] = result
print(json.dumps(results))
"""

WRAPPER = """#!/bin/sh
if [ -n "$SDNQ_TEST_CC_FAIL" ]; then echo "compiler disabled by the test" >&2; exit 1; fi
exec {cc} "$@"
"""


def _run(cases: dict[str, tuple[str, str, bool]], wrapper: Path) -> dict[str, dict]:
    """Run each (cache folder, patch, compiler disabled) case in its own forked process of one child."""
    env = {**os.environ, "CC": str(wrapper), "DIFFUSERS_SDNQ_NATIVE": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("SDNQ_TEST_CC_FAIL", None)
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """Every case's outcome: the library is built once, then each case gets a damaged copy of that cache."""
    root = tmp_path_factory.mktemp("decoder")
    wrapper = root / "cc-wrapper"
    wrapper.write_text(WRAPPER.format(cc=native._compiler()))
    wrapper.chmod(0o755)
    cache = root / "cache"
    built = _run({"build": (str(cache), "none", False)}, wrapper)["build"]
    assert built["decoder"], f"the decoder must build and load in an empty cache: {built}"
    assert list((cache / "native").glob("*.so.sha256")), "a SHA-256 record is written beside the library"
    cases: dict[str, tuple[str, str, bool]] = {}
    for name, prepare in CASES.items():
        copy = root / name
        shutil.copytree(cache, copy)
        patch = prepare(_library(copy), root / f"{name}-marker")
        cases[name] = (str(copy), patch or "none", True)
    out = _run(cases, wrapper)
    out["_root"] = {"path": str(root)}
    return out


def _library(cache: Path) -> Path:
    return next((cache / "native").glob("sdnq_decode_*.so"))


def _truncate(lib: Path, marker: Path) -> None:
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])


def _flip(lib: Path, marker: Path) -> None:
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the code section of a ~40 KB library
    lib.write_bytes(bytes(data))


def _no_record(lib: Path, marker: Path | None = None) -> None:
    lib.with_name(lib.name + ".sha256").unlink()


def _writable(lib: Path, marker: Path) -> None:
    lib.chmod(0o666)


def _record_writable(lib: Path, marker: Path) -> None:
    lib.with_name(lib.name + ".sha256").chmod(0o666)


PLANT = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) { close(open("MARKER", O_CREAT | O_WRONLY, 0644)); }
int sdnq_threaded(void) { return 0; }
int sdnq_decode(void) { return 0; }
"""


def _plant(lib: Path, marker: Path) -> None:
    """Replace the library by one whose constructor leaves ``marker`` behind if it is ever loaded."""
    source = marker.with_suffix(".c")
    source.write_text(PLANT.replace("MARKER", str(marker)))
    subprocess.run([native._compiler(), "-shared", "-fPIC", str(source), "-o", str(lib)], check=True)


def _plant_with_record(lib: Path, marker: Path) -> None:
    """A planted library whose record matches it: only trustworthy in a folder nobody else can write."""
    _plant(lib, marker)
    lib.with_name(lib.name + ".sha256").write_text(f"{hashlib.sha256(lib.read_bytes()).hexdigest()} "
                                                   f"{lib.stat().st_size}\n")


def _plant_without_record(lib: Path, marker: Path) -> None:
    _plant(lib, marker)
    _no_record(lib)


def _foreign_folder(lib: Path, marker: Path) -> None:
    """Another user's folder, writable by all (a shared DIFFUSERS_SDNQ_CACHE): nothing in it is trusted."""
    _plant_with_record(lib, marker)
    if os.geteuid() == 0:
        os.chown(lib.parent, 4242, 4242)
    lib.parent.chmod(0o777)


def _group_writable_own_folder(lib: Path, marker: Path) -> None:
    lib.parent.chmod(0o775)


CASES = {
    "truncated": _truncate, "flipped-byte": _flip, "no-record": _no_record, "world-writable-library": _writable,
    "world-writable-record": _record_writable, "planted": _plant, "planted-without-record": _plant_without_record,
    "foreign-folder": _foreign_folder, "intact": lambda lib, marker: None,
    "own-folder-0775": _group_writable_own_folder,
    "self-check-fails": lambda lib, marker: "self-check-fails", "decode-raises": lambda lib, marker: "decode-raises",
}


@pytest.mark.parametrize("case", ["truncated", "flipped-byte", "no-record", "world-writable-library",
                                  "world-writable-record"])
def test_a_damaged_or_unprotected_library_is_never_loaded(results, case: str) -> None:
    """A truncated library killed every process with SIGBUS in dlopen (SIGILL for mangled code); without a valid
    record or with loose permissions it is not trusted. The compiler is disabled in the child, so nothing is
    rebuilt: the torch path decodes, after one log line."""
    out = results[case]
    assert out["status"] == 0, f"the case's process died: {out}"
    assert not out["decoder"] and out["same"] and out["exact"], out
    assert len(out["log"]) == 1, out["log"]


def test_an_intact_cache_is_loaded_without_compiling(results) -> None:
    """The control case: the checks accept the library they wrote (the compiler is disabled in the child)."""
    out = results["intact"]
    assert out["status"] == 0 and out["decoder"] and out["same"] and out["exact"] and not out["log"], out


@pytest.mark.parametrize("case", ["planted", "planted-without-record", "foreign-folder"])
def test_a_planted_library_s_code_never_runs(results, case: str) -> None:
    """A library put at the cache's predictable path (a shared DIFFUSERS_SDNQ_CACHE) must not be loaded: its
    constructor would run inside dlopen. ("planted": the library replaced, its old record kept.)"""
    out = results[case]
    assert out["status"] == 0, out
    assert not (Path(results["_root"]["path"]) / f"{case}-marker").exists(), "the planted library's code ran"
    assert not out["decoder"] and out["exact"] and len(out["log"]) == 1, out
    if case == "foreign-folder":
        assert "not a private folder" in out["log"][0], out["log"]
        folder = Path(results["_root"]["path"]) / case / "native"
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777  # another user's folder is left alone


@pytest.mark.parametrize("case", ["self-check-fails", "decode-raises"])
def test_a_failing_self_check_falls_back_to_torch_once(results, case: str) -> None:
    """A library whose self-check failed (or raised) made every forward raise; now the process decides once, logs
    one line and decodes with torch."""
    out = results[case]
    assert out["status"] == 0 and not out["decoder"] and out["same"] and out["exact"], out
    assert len(out["log"]) == 1, out["log"]


def test_a_group_writable_cache_of_our_own_is_made_private(results) -> None:
    """Caches made by older releases got the umask's mode (0775 on many systems): ours is tightened to 0700
    and its (verified) library used."""
    out = results["own-folder-0775"]
    assert out["status"] == 0 and out["decoder"], out
    assert stat.S_IMODE(os.stat(Path(results["_root"]["path"]) / "own-folder-0775" / "native").st_mode) == 0o700
