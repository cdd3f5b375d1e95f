"""The documentation keeps up with the code: every error and warning type is in docs/troubleshooting.md, and every
relative link in docs/*.md and README.md points at a file (and heading) that exists inside the repository.

Both are read from the source text (``ast``), not by importing the package, so a module that fails to import
cannot hide its exception classes from this check.
"""

from __future__ import annotations

import ast
import builtins
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "diffusers_sdnq"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


# ------------------------------------------------------------------------------------------------ source scan
def _modules() -> list[tuple[Path, ast.Module]]:
    files = sorted(SRC.rglob("*.py")) + [ROOT / "src" / "diffusers_sdnq_autoload.py"]
    return [(f, ast.parse(f.read_text(encoding="utf-8"), filename=str(f))) for f in files]


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _builtin_exception(name: str) -> bool:
    obj = getattr(builtins, name, None)
    return isinstance(obj, type) and issubclass(obj, BaseException)


def defined_exception_classes() -> dict[str, Path]:
    """Classes defined in src that derive (directly or through each other) from a builtin exception or warning."""
    bases: dict[str, tuple[list[str], Path]] = {}
    for file, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = ([n for n in map(_name, node.bases) if n], file)
    found: dict[str, Path] = {}
    changed = True
    while changed:
        changed = False
        for cls, (parents, file) in bases.items():
            if cls not in found and any(_builtin_exception(p) or p in found for p in parents):
                found[cls] = file
                changed = True
    return found


def raised_and_warned_types() -> dict[str, str]:
    """Exception types named in ``raise X(...)`` / ``raise X`` and warning categories of ``warnings.warn``,
    each with one place it occurs."""
    own = defined_exception_classes()
    out: dict[str, str] = {}
    for file, tree in _modules():
        rel = file.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = _name(target)
                if name and (name in own or _builtin_exception(name)):
                    out.setdefault(name, f"{rel}:{node.lineno}")
            elif isinstance(node, ast.Call) and _name(node.func) == "warn" and (
                    not isinstance(node.func, ast.Attribute) or _name(node.func.value) == "warnings"):
                category = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "category"), None)
                name = _name(category) if category is not None else "UserWarning"
                if name:
                    out.setdefault(name, f"{rel}:{node.lineno}")
    return out


def test_the_scan_finds_the_known_types() -> None:
    """Guards the scanner itself: the codec's documented hierarchy must be found, with its builtin bases."""
    found = defined_exception_classes()
    for name in ("SDNQFormatError", "SDNQShapeError", "SDNQConfigError", "SDNQDtypeError", "SDNQNonFiniteWarning",
                 "SDNQUnusedPatternWarning", "SDNQFuseError"):
        assert name in found, sorted(found)
    assert "SDNQLinear" not in found and "QuantConfig" not in found
    used = raised_and_warned_types()
    assert {"SDNQShapeError", "SDNQNonFiniteWarning", "UserWarning"} <= set(used), used


def _mentioned(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text) is not None


def test_every_exception_class_is_in_troubleshooting() -> None:
    text = TROUBLESHOOTING.read_text(encoding="utf-8")
    missing = {n: str(f.relative_to(ROOT)) for n, f in defined_exception_classes().items() if not _mentioned(text, n)}
    assert not missing, f"add these error/warning classes to docs/troubleshooting.md (cause and fix): {missing}"


def test_every_raised_or_warned_type_is_in_troubleshooting() -> None:
    text = TROUBLESHOOTING.read_text(encoding="utf-8")
    missing = {n: where for n, where in raised_and_warned_types().items() if not _mentioned(text, n)}
    assert not missing, f"src raises or warns these types, undocumented in docs/troubleshooting.md: {missing}"


# ------------------------------------------------------------------------------------------------ links
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    return _CODE.sub("", _FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, marks, '_', '-' and spaces
    kept), spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_slug_rules() -> None:
    assert github_slug("Unknown config fields — `UserWarning`, once") == "unknown-config-fields--userwarning-once"
    assert github_slug("`quantization_config` was stripped") == "quantization_config-was-stripped"
    assert github_slug("The start-up hook") == "the-start-up-hook"


def relative_links(page: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(page.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: ... are not checked


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    problems = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if ROOT not in (dest, *dest.parents):
            problems.append(f"{target}: points outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: {dest.relative_to(ROOT)} does not exist")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            problems.append(f"{target}: no heading '#{fragment}' in {dest.relative_to(ROOT)}")
    assert not problems, f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_link_scanner_sees_links() -> None:
    """Guards the scanner: index.md links every page, so it must report them (and skip links in code)."""
    links = relative_links(ROOT / "docs" / "index.md")
    assert {"troubleshooting.md", "format.md", "loading.md", "../bench/RESULTS.md"} <= set(links), links
    assert not relative_links_in("`[x](nowhere.md)`\n```\n[y](nowhere.md)\n```\n")


def relative_links_in(text: str) -> list[str]:
    return _LINK.findall(_prose(text))
