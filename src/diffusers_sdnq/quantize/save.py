"""Saving SDNQ models: the library's own ``save_pretrained``, made atomic, plus ``quantization_config.json``.

diffusers and transformers write ``config.json`` (with ``quantization_config``) and the safetensors shards
(+ index) straight into the target folder, so an interrupted save leaves a mix of old and new files. Here the
library writes into a fresh folder next to the target; the SDNQ sidecar ``quantization_config.json`` (the
reference writes it too, and loaders fall back to it) is added; then each file is moved into place with an
atomic rename, weights first and the index and configs last, and shards of an earlier save that the new one
does not have are removed. A reader therefore sees either the old or the new version of every file.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

from torch import nn

SIDECAR_NAME = "quantization_config.json"
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin)(\.index\.json)?$")


def _move_order(name: str) -> tuple[int, str]:
    if name.endswith((".safetensors", ".bin")):
        return 0, name
    if name.endswith(".index.json"):
        return 1, name
    return 2, name


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """``type(model).save_pretrained`` into ``save_directory``, atomically, with the SDNQ sidecar config."""
    _refuse_pickle(model, save_directory, args, kwargs)
    target = Path(save_directory)
    if target.is_file():
        raise NotADirectoryError(f"{target} is a file; save_pretrained needs a folder")
    save = type(model).save_pretrained
    if kwargs.get("push_to_hub"):  # the Hub upload reads the folder as the library wrote it
        save(model, str(target), *args, **kwargs)
        _write_sidecar(target)
        return
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sdnq-save-", dir=target))
    try:
        save(model, str(tmp), *args, **kwargs)
        _write_sidecar(tmp)
        written = sorted((p.name for p in tmp.iterdir() if p.is_file()), key=_move_order)
        for name in written:
            os.replace(tmp / name, target / name)
        for subdir in (p for p in tmp.iterdir() if p.is_dir()):  # rare: libraries writing sub-folders
            dest = target / subdir.name
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(subdir, dest)
        _remove_stale_weights(target, set(written))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refuse_pickle(model: nn.Module, save_directory: Any, args: tuple, kwargs: dict) -> None:
    """``safe_serialization=False`` would write a pickled ``.bin`` that this package refuses to load: stop before
    anything is written."""
    try:
        bound = inspect.signature(type(model).save_pretrained).bind(model, save_directory, *args, **kwargs)
        safe = bound.arguments.get("safe_serialization", bound.arguments.get("kwargs", {}).get("safe_serialization"))
    except TypeError:  # a call the library itself will reject
        safe = kwargs.get("safe_serialization")
    if safe is not None and not safe:
        raise ValueError(f"{type(model).__name__}.save_pretrained(safe_serialization=False): an SDNQ model is saved "
                         "as safetensors only; diffusers-sdnq loads SDNQ weights only from safetensors files (a "
                         "pickled .bin could run code when loaded), so the .bin would not load again. Save with "
                         "safe_serialization=True (the default). Nothing was written.")


def _write_sidecar(folder: Path) -> None:
    config = folder / "config.json"
    if not config.is_file():
        return
    data = json.loads(config.read_text(encoding="utf-8"))
    quant = data.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") not in ("sdnq", "sdnq_training"):
        return
    tmp = folder / (SIDECAR_NAME + ".tmp")
    tmp.write_text(json.dumps(quant, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / SIDECAR_NAME)


def _remove_stale_weights(folder: Path, written: set[str]) -> None:
    """Weight files of an earlier save that this save did not write (e.g. shards when it now fits one file)."""
    new_weights = {n for n in written if _WEIGHT_FILE.match(n)}
    if not new_weights:
        return
    stems = {re.sub(r"(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$", "", n) for n in new_weights}
    for path in folder.iterdir():
        name = path.name
        if path.is_file() and name not in written and _WEIGHT_FILE.match(name):
            stem = re.sub(r"(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$", "", name)
            if stem in stems:
                path.unlink()


def _bound_save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    save_pretrained(self, save_directory, *args, **kwargs)


def install_atomic_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (and pipelines saving it) use :func:`save_pretrained`. Idempotent.

    A bound method on the instance, so ``copy.deepcopy`` rebinds it to the copy.
    """
    current = model.__dict__.get("save_pretrained")
    if isinstance(current, types.MethodType) and current.__func__ is _bound_save_pretrained:
        return
    if not hasattr(type(model), "save_pretrained"):
        return
    model.save_pretrained = types.MethodType(_bound_save_pretrained, model)
