"""What a CLI path points at: a pipeline folder, a model folder or a single file, and each component's files
and quantization config. Nothing here reads a tensor."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..format.config import QUANT_METHODS, QuantConfig
from ..layers.files import read_json_file
from .errors import CLIError
from .paths import input_roots, is_inside, plain_name, readable_problem

CONFIG_NAME = "config.json"
QUANT_CONFIG_NAME = "quantization_config.json"
INDEX_SUFFIX = ".safetensors.index.json"
STANDARD_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Component:
    """One model folder (a pipeline component or a bare model), or one bare file."""

    name: str
    """Component name in the pipeline; the folder or file name otherwise."""
    folder: Path
    files: list[Path] = field(default_factory=list)
    index_file: Path | None = None
    config: dict[str, Any] | None = None
    quant_dict: dict[str, Any] | None = None
    quant_source: str | None = None
    library: str | None = None
    class_name: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def quant_method(self) -> str | None:
        if self.quant_dict is None:
            return None
        method = self.quant_dict.get("quant_method")
        return str(getattr(method, "value", method)) if method is not None else "sdnq"

    @property
    def is_sdnq(self) -> bool:
        return self.quant_method in QUANT_METHODS


@dataclass
class Target:
    """What a CLI path points at."""

    path: Path
    kind: Literal["pipeline", "model", "file"]
    components: list[Component]
    pipeline_class: str | None = None
    other_entries: dict[str, Any] = field(default_factory=dict)
    """model_index.json entries that are not folders with weights (schedulers, tokenizers, ...)."""
    roots: list[Path] = field(default_factory=list)
    """Folders the input's files may lie in (through symbolic links): see :func:`.paths.input_roots`."""


def _read_json(path: Path) -> Any:
    return read_json_file(path, error=CLIError)


def _weight_files(folder: Path, comp: Component, roots: list[Path]) -> None:
    """Fill ``comp.files`` / ``index_file``: the index's shards when there is one, else the safetensors files.

    Every file must be a regular file inside the input (:func:`.paths.readable_problem`), and every shard an
    index names must be a plain file name in the folder: anything else is a problem naming the index and the
    entry, and is never opened."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        preferred = [p for p in indexes if p.name[: -len(".index.json")] in STANDARD_WEIGHTS]
        index = (preferred or indexes)[0]
        if len(indexes) > 1:
            comp.notes.append(f"several shard indexes; using {index.name}, ignoring "
                              + ", ".join(p.name for p in indexes if p != index))
        problem = readable_problem(index, roots)
        if problem:
            comp.problems.append(problem)
            return
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            comp.problems.append(f"{index}: no 'weight_map' object of tensor name -> shard file name")
            return
        comp.index_file = index
        for name in sorted(set(weight_map.values())):
            if not plain_name(name):
                comp.problems.append(f"{index}: shard entry {name!r} is not a file name in {folder} (an absolute "
                                     "path, a '..' or a sub-folder); the index is damaged or crafted, the entry "
                                     "is not read")
                continue
            shard = folder / name
            if not shard.exists() and not shard.is_symlink():
                comp.problems.append(f"{index} lists shard '{name}', which is missing from {folder}")
            elif problem := readable_problem(shard, roots):
                comp.problems.append(f"{index} lists shard '{name}': {problem}")
            else:
                comp.files.append(shard)
        return
    files = sorted(folder.glob("*.safetensors"))
    standard = [p for p in files if p.name in STANDARD_WEIGHTS]
    if len(files) > 1 and standard:
        comp.notes.append("ignoring variant weight files " + ", ".join(p.name for p in files if p != standard[0]))
        files = standard[:1]
    for file in files:
        problem = readable_problem(file, roots)
        if problem:
            comp.problems.append(problem)
        else:
            comp.files.append(file)


def _quant_config(comp: Component, folder: Path) -> None:
    """Read ``quantization_config`` from config.json and/or quantization_config.json; note disagreement."""
    from_config = comp.config.get("quantization_config") if comp.config else None
    side = folder / QUANT_CONFIG_NAME
    from_file = _read_json(side) if side.exists() or side.is_symlink() else None
    if from_config is not None and from_file is not None:
        if _normalized(from_config) != _normalized(from_file):
            comp.notes.append(f"{CONFIG_NAME} and {QUANT_CONFIG_NAME} hold different quantization configs; "
                              f"using {CONFIG_NAME}'s (what diffusers/transformers read)")
    if from_config is not None:
        comp.quant_dict, comp.quant_source = dict(from_config), str(folder / CONFIG_NAME)
    elif from_file is not None:
        comp.quant_dict, comp.quant_source = dict(from_file), str(side)


def _normalized(data: Any) -> Any:
    if not isinstance(data, Mapping):
        return data
    with contextlib.suppress(ValueError):
        return QuantConfig.from_dict(data).to_dict()
    return dict(data)


def _component(name: str, folder: Path, roots: list[Path], library: str | None = None,
               class_name: str | None = None, scan_weights: bool = True) -> Component:
    comp = Component(name=name, folder=folder, library=library, class_name=class_name)
    for json_file in (folder / CONFIG_NAME, folder / QUANT_CONFIG_NAME):
        if (json_file.exists() or json_file.is_symlink()) and (problem := readable_problem(json_file, roots)):
            raise CLIError(problem)
    cfg_path = folder / CONFIG_NAME
    if cfg_path.exists():
        comp.config = _read_json(cfg_path)
        if not isinstance(comp.config, dict):
            raise CLIError(f"{cfg_path}: expected a JSON object")
        if class_name is None:
            if "_class_name" in comp.config:
                comp.library, comp.class_name = "diffusers", comp.config["_class_name"]
            elif isinstance(comp.config.get("architectures"), list) and comp.config["architectures"]:
                comp.library, comp.class_name = "transformers", comp.config["architectures"][0]
            if not isinstance(comp.class_name, str):
                comp.library = comp.class_name = None
    _quant_config(comp, folder)
    if scan_weights:
        _weight_files(folder, comp, roots)
    return comp


def find_target(path: str | Path) -> Target:
    """Resolve a CLI path: a pipeline folder, a model folder or a single ``.safetensors`` file."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{path}: no such file or folder")
    roots = input_roots(path)
    if not path.is_dir():
        if not path.name.endswith(".safetensors"):
            raise CLIError(f"{path}: expected a .safetensors file, a model folder or a pipeline folder")
        if problem := readable_problem(path, roots):
            raise CLIError(problem)
        comp = _component(path.stem, path.parent, roots, scan_weights=False)
        comp.files = [path]
        if comp.config is None and comp.quant_dict is None:
            comp.notes.append("no config next to the file: widths and grouping are inferred from the stored "
                              "tensors alone (guessed, marked '?')")
        return Target(path, "file", [comp], roots=roots)
    index = path / "model_index.json"
    if index.exists() or index.is_symlink():
        if problem := readable_problem(index, roots):
            raise CLIError(problem)
        data = _read_json(index)
        if not isinstance(data, dict):
            raise CLIError(f"{index}: expected a JSON object")
        comps: list[Component] = []
        others: dict[str, Any] = {}
        for name, spec in data.items():
            if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
                continue
            if spec[0] is None or spec[1] is None:
                others[name] = spec
                continue
            if not plain_name(name):
                raise CLIError(f"{index}: component name {name!r} is not a folder name in {path} (an absolute "
                               "path, a '..' or a separator); model_index.json is damaged or crafted, nothing is "
                               "read or written")
            if not isinstance(spec[0], str) or not isinstance(spec[1], str):
                comp = Component(name=name, folder=path / name)
                comp.problems.append(f"{index}: component '{name}' must be [library, class name] strings, got "
                                     f"{spec!r}")
                comps.append(comp)
                continue
            folder = path / name
            if not folder.is_dir():
                comp = Component(name=name, folder=folder, library=spec[0], class_name=spec[1])
                comp.problems.append(f"model_index.json lists component '{name}' but {folder} is missing")
                comps.append(comp)
                continue
            real = Path(os.path.realpath(folder))
            if not any(is_inside(real, root) for root in roots):
                raise CLIError(f"{index}: component '{name}' is {folder}, a symbolic link to {real} outside the "
                               "input folder; diffusers-sdnq does not read files outside the folder it was given")
            comp = _component(name, folder, roots, spec[0], spec[1])
            if comp.files or comp.index_file or comp.quant_dict is not None or comp.problems:
                comps.append(comp)
            else:
                others[name] = spec
        pipeline_class = data.get("_class_name")
        return Target(path, "pipeline", comps, pipeline_class=pipeline_class if isinstance(pipeline_class, str)
                      else None, other_entries=others, roots=roots)
    comp = _component(path.name, path, roots)
    if not comp.files and comp.config is None and not comp.problems:
        raise CLIError(f"{path}: no model_index.json, config.json or .safetensors file here")
    return Target(path, "model", [comp], roots=roots)


