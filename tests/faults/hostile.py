"""Helpers of the hostile-input tests (tests/faults/test_cli_paths.py, test_untrusted_files.py, ...)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from pathlib import Path

import pytest
from conftest import cache_root
from tiny_models import get_fixture

from diffusers_sdnq.cli import main


def fixture(name: str, variant: str) -> Path:
    return get_fixture(name, variant, cache_root() / "models")


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o644)
    return dst


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): its kind and, for files, a hash of its bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            elif path.is_file():
                out[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def unblocking_fifos(fifos: list[Path], call, timeout: float = 120.0):
    """Run ``call()`` in a thread; if it is still running after ``timeout`` (blocked opening one of ``fifos``),
    open their write ends to release it and fail. A hang guard only: a correct run never opens a FIFO."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail(f"still running after {timeout:.0f} s: a FIFO among {[str(f) for f in fifos]} was opened")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def no_partials(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".*partial-*")]
