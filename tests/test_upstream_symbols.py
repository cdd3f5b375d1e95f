"""Every private upstream symbol diffusers-sdnq patches or reads (``integrations/upstream.py``) exists, with the
expected kind, in the installed diffusers / transformers / accelerate / peft; a change gives a clear error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diffusers_sdnq.integrations import upstream


def test_every_listed_symbol_resolves_in_the_installed_versions():
    assert upstream.problems() == []


@pytest.mark.parametrize("library", ["diffusers", "transformers", "accelerate", "peft"])
def test_each_library_has_entries(library):
    assert any(s.library == library for s in upstream.SYMBOLS)
    upstream.check_library(library)


def test_a_changed_symbol_names_library_version_symbol_and_expectation(monkeypatch):
    gone = upstream.Symbol("diffusers", "diffusers.quantizers.auto:NO_SUCH_MAPPING", "dict", "read",
                           "a dict we would read")
    wrong = upstream.Symbol("transformers", "transformers.quantizers.auto:AutoHfQuantizer", "dict", "read",
                            "a dict, which it is not")
    monkeypatch.setitem(upstream._BY_PATH, gone.path, gone)
    monkeypatch.setitem(upstream._BY_PATH, wrong.path, wrong)
    with pytest.raises(upstream.UpstreamChangedError) as info:
        upstream.resolve(gone.path)
    message = str(info.value)
    import diffusers

    assert f"diffusers {diffusers.__version__}" in message and "NO_SUCH_MAPPING does not exist" in message
    assert "a dict we would read" in message
    with pytest.raises(upstream.UpstreamChangedError, match="is now a type, not a dict"):
        upstream.resolve(wrong.path)


def test_unlisted_symbols_cannot_be_resolved():
    with pytest.raises(KeyError):
        upstream.resolve("diffusers.models.modeling_utils:load_model_dict_into_meta")


def test_every_resolve_call_in_the_package_names_a_listed_symbol():
    """Static check: each ``resolve("...")`` literal in src is in the table (a typo would only fail at run time)."""
    import diffusers_sdnq

    root = Path(diffusers_sdnq.__file__).parent
    used = set()
    for file in root.rglob("*.py"):
        used |= set(re.findall(r'resolve\(\s*"([\w.]+:[\w.]+)"', file.read_text()))
    assert used and used <= set(upstream._BY_PATH), used - set(upstream._BY_PATH)


def test_docs_list_every_symbol():
    """docs/compatibility.md shows the table to readers; it must name every entry."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "compatibility.md").read_text()
    missing = [s.path for s in upstream.SYMBOLS if s.path.replace(":", ".") not in text]
    assert missing == []


def test_a_symbol_newer_than_the_installed_release_is_not_required(monkeypatch):
    future = upstream.Symbol("diffusers", "diffusers.quantizers.auto:NOT_YET_THERE", "dict", "read", "a future dict",
                             since="999.0")
    monkeypatch.setattr(upstream, "SYMBOLS", (*upstream.SYMBOLS, future))
    monkeypatch.setitem(upstream._BY_PATH, future.path, future)
    assert upstream.problems(["diffusers"]) == []
    upstream.check_library("diffusers")
