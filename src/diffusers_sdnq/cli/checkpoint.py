"""What a CLI path points at: a pipeline folder, a model folder or a single file, and each component's files
and quantization config. Nothing here reads a tensor."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..format.config import QUANT_METHODS, QuantConfig

CONFIG_NAME = "config.json"
QUANT_CONFIG_NAME = "quantization_config.json"
INDEX_SUFFIX = ".safetensors.index.json"
STANDARD_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")


class CLIError(ValueError):
    """A problem with the user's input that the CLI reports as one clear message (no traceback)."""


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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CLIError(f"{path}: cannot read JSON ({exc})") from None


def _weight_files(folder: Path, comp: Component) -> None:
    """Fill ``comp.files`` / ``index_file``: the index's shards when there is one, else the safetensors files."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        preferred = [p for p in indexes if p.name[: -len(".index.json")] in STANDARD_WEIGHTS]
        index = (preferred or indexes)[0]
        if len(indexes) > 1:
            comp.notes.append(f"several shard indexes; using {index.name}, ignoring "
                              + ", ".join(p.name for p in indexes if p != index))
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            comp.problems.append(f"{index}: no 'weight_map' object")
            return
        comp.index_file = index
        for name in sorted(set(weight_map.values())):
            shard = folder / name
            if shard.is_file():
                comp.files.append(shard)
            else:
                comp.problems.append(f"{index} lists shard '{name}', which is missing from {folder}")
        return
    files = sorted(folder.glob("*.safetensors"))
    standard = [p for p in files if p.name in STANDARD_WEIGHTS]
    if len(files) > 1 and standard:
        comp.notes.append("ignoring variant weight files " + ", ".join(p.name for p in files if p != standard[0]))
        files = standard[:1]
    comp.files = files


def _quant_config(comp: Component, folder: Path) -> None:
    """Read ``quantization_config`` from config.json and/or quantization_config.json; note disagreement."""
    from_config = comp.config.get("quantization_config") if comp.config else None
    side = folder / QUANT_CONFIG_NAME
    from_file = _read_json(side) if side.is_file() else None
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


def _component(name: str, folder: Path, library: str | None = None, class_name: str | None = None) -> Component:
    comp = Component(name=name, folder=folder, library=library, class_name=class_name)
    cfg_path = folder / CONFIG_NAME
    if cfg_path.is_file():
        comp.config = _read_json(cfg_path)
        if not isinstance(comp.config, dict):
            raise CLIError(f"{cfg_path}: expected a JSON object")
        if class_name is None:
            if "_class_name" in comp.config:
                comp.library, comp.class_name = "diffusers", comp.config["_class_name"]
            elif comp.config.get("architectures"):
                comp.library, comp.class_name = "transformers", comp.config["architectures"][0]
    _quant_config(comp, folder)
    _weight_files(folder, comp)
    return comp


def find_target(path: str | Path) -> Target:
    """Resolve a CLI path: a pipeline folder, a model folder or a single ``.safetensors`` file."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{path}: no such file or folder")
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise CLIError(f"{path}: expected a .safetensors file, a model folder or a pipeline folder")
        comp = _component(path.stem, path.parent)
        comp.files, comp.index_file = [path], None
        comp.problems = [p for p in comp.problems if "shard" not in p]
        if comp.config is None and comp.quant_dict is None:
            comp.notes.append("no config next to the file: widths and grouping are inferred from the stored "
                              "tensors alone (guessed, marked '?')")
        return Target(path, "file", [comp])
    index = path / "model_index.json"
    if index.is_file():
        data = _read_json(index)
        if not isinstance(data, dict):
            raise CLIError(f"{index}: expected a JSON object")
        comps: list[Component] = []
        others: dict[str, Any] = {}
        for name, spec in data.items():
            if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
                continue
            folder = path / name
            if spec[0] is None or spec[1] is None:
                others[name] = spec
                continue
            if not folder.is_dir():
                comp = Component(name=name, folder=folder, library=spec[0], class_name=spec[1])
                comp.problems.append(f"model_index.json lists component '{name}' but {folder} is missing")
                comps.append(comp)
                continue
            comp = _component(name, folder, spec[0], spec[1])
            if comp.files or comp.index_file or comp.quant_dict is not None or comp.problems:
                comps.append(comp)
            else:
                others[name] = spec
        return Target(path, "pipeline", comps, pipeline_class=data.get("_class_name"), other_entries=others)
    comp = _component(path.name, path)
    if not comp.files and comp.config is None:
        raise CLIError(f"{path}: no model_index.json, config.json or .safetensors file here")
    return Target(path, "model", [comp])
