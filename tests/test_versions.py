"""The declared version range, the constraints file that pins its lower ends and the CI script agree."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _dependencies() -> dict[str, Requirement]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {Requirement(d).name: Requirement(d) for d in data["project"]["dependencies"]}


def _pins() -> dict[str, str]:
    lines = (ROOT / ".ci" / "constraints-min.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))


def test_constraints_pin_every_declared_lower_bound():
    pins = _pins()
    for name, req in _dependencies().items():
        lower = [s.version for s in req.specifier if s.operator == ">="]
        if not lower:
            continue
        assert name in pins, f"{name}: declared {req.specifier} but not pinned in .ci/constraints-min.txt"
        assert Version(pins[name]) >= Version(lower[0]) and Version(pins[name]).release[:len(Version(lower[0]).release)] \
            == Version(lower[0]).release, (name, pins[name], str(req.specifier))


def test_installed_versions_are_in_the_declared_range():
    for name, req in _dependencies().items():
        assert req.specifier.contains(importlib.metadata.version(name), prereleases=True), (name, str(req.specifier))


def test_ci_runs_the_readme_test_command_and_the_minimum_pass():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"# 2\) install the test dependencies and run the test suite\n(.+)\n", readme).group(1)
    script = (ROOT / ".ci" / "run").read_text()
    assert command in script
    assert "-c .ci/constraints-min.txt" in script and "status_of" in script
