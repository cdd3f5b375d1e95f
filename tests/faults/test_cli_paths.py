"""The CLI against hostile folders and careless invocations: nothing is written or deleted outside the output
folder, nothing is read outside the input folder, and every refusal is one clear error (issue 16, items 1, 2, 6,
7, 8).

Inputs are copies of the tiny reference-written fixtures (tests/tiny_models.py) with one thing made hostile. The
oracle is the file system itself: a snapshot (every path, its kind and its bytes) of the whole temporary tree before
and after each command, plus the command's exit status and message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hostile import cli as _cli
from hostile import copy_tree as _copy
from hostile import fixture as _fixture
from hostile import no_partials as _no_partials
from hostile import snapshot as _snapshot
from hostile import unblocking_fifos
from safetensors.torch import load_file

# ------------------------------------------------------------------------------------------------ 1. component names


@pytest.mark.parametrize("kind", ["parent", "absolute", "nested"])
def test_component_names_from_model_index_cannot_leave_the_output(tmp_path: Path, capsys, kind: str) -> None:
    """A component named "../victim" (or an absolute path) made `dequantize pipe out` rewrite the neighbouring
    model's config.json and truncate its weights. Every command now refuses the pipeline, naming the entry."""
    work = tmp_path / "work"
    pipe = _copy(_fixture("flux2_klein", "int8"), work / "pipe")
    victim = _copy(_fixture("qwen3", "int8"), work / "victim")
    name = {"parent": "../victim", "absolute": str(victim), "nested": "text_encoder/../../victim"}[kind]
    index = json.loads((pipe / "model_index.json").read_text())
    index[name] = ["transformers", "Qwen3ForCausalLM"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    before = _snapshot(tmp_path)
    out = work / "out"
    for argv in (["dequantize", str(pipe), str(out), "--no-progress"], ["inspect", str(pipe)],
                 ["verify", str(pipe), "--no-progress"],
                 ["quantize", str(pipe), str(out), "--weights-dtype", "int8", "--no-progress"]):
        code, text = _cli(capsys, *argv)
        assert code == 1, (argv, text)
        assert "model_index.json" in text and repr(name) in text, text
    assert _snapshot(tmp_path) == before, "a refused command changed files"
    assert not out.exists() and not _no_partials(tmp_path)


# ------------------------------------------------------------------------------------------------ 2. --overwrite


def test_overwrite_never_deletes_the_input(tmp_path: Path, capsys) -> None:
    """`dequantize work/model work --overwrite` deleted work/model and everything else in work."""
    work = tmp_path / "work"
    model = _copy(_fixture("qwen3", "int8"), work / "model")
    dense = _copy(_fixture("qwen3", "dense"), work / "dense")
    (work / "keep.txt").write_text("other files of the user")
    before = _snapshot(tmp_path)
    cases = [
        (["dequantize", str(model), str(work)], "must not contain the input"),  # output contains the input
        (["dequantize", str(model), str(tmp_path)], "must not contain the input"),
        (["dequantize", str(model), str(model)], "must not be the input"),
        (["dequantize", str(model), str(model / "sub")], "must not be the input"),  # output inside the input
        (["dequantize", str(model / "model.safetensors"), str(model / "model.safetensors")], "must not be"),
        (["quantize", str(dense), str(work), "--weights-dtype", "int8"], "must not contain the input"),
        (["quantize", str(dense), str(dense / "q"), "--weights-dtype", "int8"], "must not be the input"),
    ]
    for argv, needle in cases:
        code, text = _cli(capsys, *argv, "--overwrite", "--no-progress")
        assert code == 1 and needle in text, (argv, text)
    link = tmp_path / "link-to-work"
    link.symlink_to(work)  # the same folder under another name
    code, text = _cli(capsys, "dequantize", str(model), str(link), "--overwrite", "--no-progress")
    assert code == 1 and "must not contain the input" in text, text
    link.unlink()
    assert _snapshot(tmp_path) == before
    assert not _no_partials(tmp_path)


def test_overwrite_still_replaces_an_unrelated_output(tmp_path: Path, capsys) -> None:
    """The rules above refuse only overlaps: a plain --overwrite still works, and a file output may sit beside
    its input."""
    model = _copy(_fixture("qwen3", "int8"), tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, text = _cli(capsys, "dequantize", str(model), str(out), "--overwrite", "--no-progress")
    assert code == 0, text
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    code, text = _cli(capsys, "dequantize", str(model / "model.safetensors"), str(model / "dense.safetensors"),
                      "--no-progress")
    assert code == 0, text
    assert set(load_file(model / "dense.safetensors")) == set(load_file(out / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ 7. index entries


@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                   "sub/model.safetensors"])
def test_index_shards_outside_the_folder_are_refused_naming_index_and_entry(tmp_path: Path, capsys,
                                                                            entry: str) -> None:
    """`inspect` reported nothing and `dequantize` copied the outside file into its output."""
    model = _copy(_fixture("qwen3", "int8"), tmp_path / "model")
    (tmp_path / "outside.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    keys = sorted(load_file(model / "model.safetensors"))
    weight_map = {k: ("model.safetensors" if i else entry) for i, k in enumerate(keys)}
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    dense = _copy(_fixture("qwen3", "dense"), tmp_path / "dense")
    (dense / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: ("model.safetensors" if i else entry) for i, k in enumerate(sorted(load_file(dense / "model.safetensors")))}}))
    before = _snapshot(tmp_path)
    for argv in (["inspect", str(model)], ["verify", str(model), "--no-progress"],
                 ["dequantize", str(model), str(tmp_path / "out"), "--no-progress"],
                 ["quantize", str(dense), str(tmp_path / "out"), "--weights-dtype", "int8", "--no-progress"]):
        code, text = _cli(capsys, *argv)
        assert code == 1, (argv, text)
        assert "index.json" in text and repr(entry) in text, (argv, text)
    assert _snapshot(tmp_path) == before and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ 8. links


def _make_link(model: Path, tmp_path: Path, kind: str) -> Path:
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    target = {"loop": ".", "root": "/", "outside-folder": str(tmp_path), "outside-file": str(secret),
              "dangling": str(tmp_path / "nothing-here")}[kind]
    link = model / ("notes.txt" if kind in ("outside-file", "dangling") else "extra")
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("kind", ["loop", "root", "outside-folder", "outside-file", "dangling"])
def test_links_are_not_followed_out_of_the_input(tmp_path: Path, capsys, kind: str) -> None:
    """A `loop -> .` link was copied ~40 times before failing; a link to / would have copied the tree."""
    model = _copy(_fixture("qwen3", "int8"), tmp_path / "model")
    link = _make_link(model, tmp_path, kind)
    before = _snapshot(tmp_path)
    out = tmp_path / "out"
    code, text = _cli(capsys, "dequantize", str(model), str(out), "--no-progress")
    reason = {"loop": "symbolic link to a folder", "root": "symbolic link to a folder",
              "outside-folder": "symbolic link to a folder", "outside-file": "outside the input folder",
              "dangling": "broken symbolic link"}[kind]
    assert code == 1 and str(link) in text and reason in text, text  # refused before anything is copied
    assert _snapshot(tmp_path) == before and not out.exists() and not _no_partials(tmp_path)


@pytest.mark.parametrize("what", ["weights", "config"])
def test_linked_weights_or_config_outside_the_input_are_not_read(tmp_path: Path, capsys, what: str) -> None:
    model = _copy(_fixture("qwen3", "int8"), tmp_path / "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    name = "model.safetensors" if what == "weights" else "config.json"
    shutil.move(model / name, elsewhere / name)
    (model / name).symlink_to(elsewhere / name)
    for argv in (["inspect", str(model)], ["dequantize", str(model), str(tmp_path / "out"), "--no-progress"]):
        code, text = _cli(capsys, *argv)
        assert code == 1 and "outside the input folder" in text and str(model / name) in text, text
    assert not (tmp_path / "out").exists()


def test_a_hugging_face_cache_snapshot_with_links_into_blobs_works(tmp_path: Path, capsys) -> None:
    """The Hub cache keeps files in <repo>/blobs and links them from snapshots/<rev>: that layout must keep
    working, and the output holds real files."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    source = _fixture("qwen3", "int8")
    for file in sorted(source.rglob("*")):
        if file.is_file():
            blob = repo / "blobs" / hashlib.sha1(file.read_bytes()).hexdigest()
            blob.write_bytes(file.read_bytes())
            link = snapshot / file.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    out = tmp_path / "out"
    code, text = _cli(capsys, "dequantize", str(snapshot), str(out), "--no-progress")
    assert code == 0, text
    assert all(not p.is_symlink() for p in out.rglob("*"))
    code, text = _cli(capsys, "dequantize", str(snapshot), str(repo / "blobs"), "--overwrite", "--no-progress")
    assert code == 1 and "holds the input's files" in text, text


# ------------------------------------------------------------------------------------------------ 6. FIFOs (CLI)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "README.md"])
def test_fifos_in_the_input_are_never_opened(tmp_path: Path, capsys, name: str) -> None:
    """Opening a FIFO for reading blocks until a writer appears: the CLI must refuse it without opening it (a hang
    here is the failure; it cannot be timed out in-process, so the test relies on the command returning)."""
    model = _copy(_fixture("qwen3", "int8"), tmp_path / "model")
    if (model / name).exists():
        (model / name).unlink()
    os.mkfifo(model / name)
    argv = (["dequantize", str(model), str(tmp_path / "out"), "--no-progress"] if name == "README.md"
            else ["inspect", str(model)])
    code, text = unblocking_fifos([model / name], lambda: _cli(capsys, *argv))
    assert code == 1 and "FIFO" in text and name in text, text
    assert not (tmp_path / "out").exists() and not _no_partials(tmp_path)
