"""Damaged SDNQ checkpoints: each fails with a specific error type and a message that names the file and the
tensor (or warns, where documented in docs/troubleshooting.md), and the failed load writes or changes nothing.

Good checkpoints are the reference-made tiny Flux2Klein components (uint4 + SVD; tests/tiny_models.py); each case
damages a copy in a temp folder. Every case runs through diffusers (the transformer) and transformers (the Qwen3
text encoder). Undamaged, both folders load (tests/test_pipelines.py checks them bit for bit).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import cache_root
from safetensors.torch import load_file, save_file
from tiny_models import get_fixture

import diffusers_sdnq  # noqa: F401
from diffusers_sdnq.format import SDNQConfigError, SDNQDtypeError, SDNQFormatError, SDNQShapeError
from diffusers_sdnq.format.errors import SDNQNonFiniteWarning, SDNQUnusedPatternWarning
from diffusers_sdnq.layers import SDNQLayerMixin

COMPONENTS = ("transformer", "text_encoder")


@pytest.fixture(scope="module")
def source() -> Path:
    return get_fixture("flux2_klein", "uint4_svd", cache_root() / "models")


def _load(comp: str, path: Path):
    if comp == "transformer":
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel.from_pretrained(path)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- damage helpers


def _weights_file(folder: Path) -> Path:
    return next(p for p in folder.glob("*.safetensors"))


def _edit_tensors(folder: Path, edit: Callable[[dict], str]) -> str:
    file = _weights_file(folder)
    tensors = load_file(file)
    expected = edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return expected


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_both_configs(folder: Path, edit: Callable[[dict], None]) -> None:
    _edit_json(folder / "config.json", lambda c: edit(c["quantization_config"]))
    _edit_json(folder / "quantization_config.json", edit)


def _first(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def truncated(folder: Path) -> str:
    file = _weights_file(folder)
    with open(file, "r+b") as fh:
        fh.truncate(file.stat().st_size - 1000)
    return f"{file}: tensor '.*' ends at byte \\d+ of the data section but the file holds only \\d+; the file is truncated"


def corrupt_header(folder: Path) -> str:
    file = _weights_file(folder)
    data = bytearray(file.read_bytes())
    data[20:30] = b"\xff" * 10
    file.write_bytes(bytes(data))
    return f"{file}: corrupt safetensors header"


def header_too_long(folder: Path) -> str:
    file = _weights_file(folder)
    data = bytearray(file.read_bytes())
    data[0:8] = (2**40).to_bytes(8, "little")
    file.write_bytes(bytes(data))
    return f"{file}: safetensors header claims {2**40} bytes but the file has"


def wrong_width(folder: Path) -> str:
    """The config says int5 where the bytes are uint4 codes."""
    _edit_both_configs(folder, lambda q: q.update(weights_dtype="int5", modules_dtype_dict={}))
    return r"'.*\.weight' is uint8 \[.*\], expected uint8 \[.*\].*the stored tensors look like: 4-bit codes"


def short_weight(folder: Path) -> str:
    def edit(t: dict) -> str:
        key = _first(t, ".scale")[: -len("scale")] + "weight"
        t[key] = t[key].reshape(-1)[:-8].clone()
        return f"'{key}' is uint8"
    return _edit_tensors(folder, edit)


def wrong_group_count(folder: Path) -> str:
    def edit(t: dict) -> str:
        key = _first(t, ".scale")
        t[key] = torch.cat([t[key], t[key]], dim=1) if t[key].ndim == 3 else torch.cat([t[key], t[key]], dim=0)
        return f"'{key}' is float32 \\[{', '.join(map(str, t[key].shape))}\\], expected"
    return _edit_tensors(folder, edit)


def missing_scale(folder: Path) -> str:
    def edit(t: dict) -> str:
        key = _first(t, ".scale")
        del t[key]
        return f"'{key[: -len('scale')]}weight'.* is uint8 .* but there is no '{key}'"
    return _edit_tensors(folder, edit)


def missing_zero_point(folder: Path) -> str:
    def edit(t: dict) -> str:
        key = _first(t, ".zero_point")
        del t[key]
        return f"missing tensor '{key}'"
    return _edit_tensors(folder, edit)


def extra_companion(folder: Path) -> str:
    def edit(t: dict) -> str:
        key = _first(t, ".scale")[: -len("scale")] + "scale_2"
        t[key] = torch.ones(1)
        return f"unexpected tensor '{key}'"
    return _edit_tensors(folder, edit)


def orphan_tensor(folder: Path) -> str:
    def edit(t: dict) -> str:
        t["no_such_layer.scale"] = torch.ones(4)
        return "SDNQ tensors that match no quantizable layer of the model: 'no_such_layer.scale'"
    return _edit_tensors(folder, edit)


def svd_rank_mismatch(folder: Path) -> str:
    def edit(t: dict) -> str:
        key = _first(t, ".svd_down")
        t[key] = t[key][:-2].clone()
        return f"'{key}' is float32 \\[{t[key].shape[0]}, {t[key].shape[1]}\\], expected"
    return _edit_tensors(folder, edit)


def missing_svd(folder: Path) -> str:
    def edit(t: dict) -> str:
        key = _first(t, ".svd_up")
        del t[key]
        return f"missing tensor '{key}'"
    return _edit_tensors(folder, edit)


def unknown_dtype(folder: Path) -> str:
    _edit_both_configs(folder, lambda q: q.update(weights_dtype="uint99"))
    return "Unknown SDNQ .*weights_dtype 'uint99'"


def configs_disagree(folder: Path) -> str:
    _edit_json(folder / "quantization_config.json", lambda q: q.update(weights_dtype="int8"))
    return (f"{folder / 'config.json'} and {folder / 'quantization_config.json'} disagree on how the weights are "
            "stored \\(weights_dtype: 'uint4' vs 'int8'\\)")


def stripped_config(folder: Path) -> str:
    _edit_json(folder / "config.json", lambda c: c.pop("quantization_config"))
    (folder / "quantization_config.json").unlink()
    return f"{folder}: \\d+ layer\\(s\\) are stored SDNQ-quantized .* has no 'quantization_config'"


def _shard(folder: Path, *, duplicate: bool = False, drop_second: bool = False, escape: bool = False) -> None:
    file = _weights_file(folder)
    tensors = load_file(file)
    file.unlink()
    base = file.name[: -len(".safetensors")]
    keys = sorted(tensors)
    half = len(keys) // 2
    names = [f"{base}-0000{i}-of-00002.safetensors" for i in (1, 2)]
    save_file({k: tensors[k] for k in keys[: half + duplicate]}, folder / names[0], metadata={"format": "pt"})
    save_file({k: tensors[k] for k in keys[half:]}, folder / names[1], metadata={"format": "pt"})
    second = names[1]
    if drop_second:
        (folder / names[1]).unlink()
    if escape:
        shutil.move(folder / names[1], folder.parent / names[1])
        second = f"../{names[1]}"
    weight_map = {k: (names[0] if i < half else second) for i, k in enumerate(keys)}
    (folder / f"{base}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def key_in_two_shards(folder: Path) -> str:
    _shard(folder, duplicate=True)
    return "tensor '.*' is in two checkpoint shards: .*-00001-of-00002.safetensors and .*-00002-of-00002.safetensors"


def index_missing_shard(folder: Path) -> str:
    _shard(folder, drop_second=True)
    return "-00002-of-00002.safetensors"


def index_escapes_folder(folder: Path) -> str:
    _shard(folder, escape=True)
    return r"\.\./.*-00002-of-00002\.safetensors"


#: case -> (damage, error type for diffusers, error type for transformers)
ERRORS: dict[str, tuple[Callable[[Path], str], type[Exception], type[Exception]]] = {
    "truncated-file": (truncated, SDNQFormatError, SDNQFormatError),
    "corrupt-header": (corrupt_header, SDNQFormatError, SDNQFormatError),
    "header-length": (header_too_long, SDNQFormatError, SDNQFormatError),
    "width-vs-config": (wrong_width, SDNQShapeError, SDNQShapeError),
    "short-packed-weight": (short_weight, SDNQShapeError, SDNQShapeError),
    "wrong-group-count": (wrong_group_count, SDNQShapeError, SDNQShapeError),
    "missing-scale": (missing_scale, SDNQShapeError, SDNQShapeError),
    "missing-zero-point": (missing_zero_point, SDNQShapeError, SDNQShapeError),
    "extra-companion": (extra_companion, SDNQShapeError, SDNQShapeError),
    "orphan-sdnq-tensor": (orphan_tensor, SDNQShapeError, SDNQShapeError),
    "svd-rank-mismatch": (svd_rank_mismatch, SDNQShapeError, SDNQShapeError),
    "missing-svd-factor": (missing_svd, SDNQShapeError, SDNQShapeError),
    "unknown-dtype": (unknown_dtype, SDNQDtypeError, SDNQDtypeError),
    "configs-disagree": (configs_disagree, SDNQConfigError, SDNQConfigError),
    "stripped-config": (stripped_config, SDNQConfigError, SDNQConfigError),
    "key-in-two-shards": (key_in_two_shards, SDNQFormatError, SDNQFormatError),
    # the libraries catch these two themselves, with messages that name the shard (transformers >= 5.25 refuses an
    # escaping shard itself, before our check: either error is a ValueError naming the shard)
    "index-missing-shard": (index_missing_shard, OSError, OSError),
    "index-escapes-folder": (index_escapes_folder, ValueError, ValueError),
}


@pytest.mark.parametrize("comp", COMPONENTS)
@pytest.mark.parametrize("case", list(ERRORS))
def test_damaged_checkpoint_fails_clearly(source: Path, tmp_path: Path, comp: str, case: str) -> None:
    folder = tmp_path / comp
    shutil.copytree(source / comp, folder)
    damage, diffusers_error, transformers_error = ERRORS[case]
    pattern = damage(folder)
    before = _snapshot(tmp_path)
    with pytest.raises(diffusers_error if comp == "transformer" else transformers_error) as info:
        _load(comp, folder)
    assert _snapshot(tmp_path) == before, "a failed load changed files on disk"
    import re

    assert re.search(pattern, str(info.value), flags=re.S), f"{pattern!r} not in:\n{info.value}"


# ---------------------------------------------------------------------------------------------- warnings


@pytest.mark.parametrize("comp", COMPONENTS)
def test_non_finite_scale_warns_naming_the_tensor(source: Path, tmp_path: Path, comp: str) -> None:
    """Documented choice: NaN/Inf in a scale is a warning (the file may be what the user wants to inspect)."""
    folder = tmp_path / comp
    shutil.copytree(source / comp, folder)
    names: list[str] = []

    def edit(t: dict) -> str:
        key = _first(t, ".scale")
        t[key].view(-1)[0] = float("nan")
        names.append(key)
        return key
    _edit_tensors(folder, edit)
    with pytest.warns(SDNQNonFiniteWarning, match=names[0].replace(".", r"\.")):
        model = _load(comp, folder)
    layer = model.get_submodule(names[0][: -len(".scale")])
    assert torch.isnan(layer.dequantize_weight()).any()


@pytest.mark.parametrize("comp", COMPONENTS)
def test_dtype_dict_naming_a_missing_layer_warns(source: Path, tmp_path: Path, comp: str) -> None:
    folder = tmp_path / comp
    shutil.copytree(source / comp, folder)
    _edit_both_configs(folder, lambda q: q["modules_dtype_dict"].setdefault("int8", []).append("no.such.layer"))
    with pytest.warns(SDNQUnusedPatternWarning, match="'no.such.layer'"):
        model = _load(comp, folder)
    assert any(isinstance(m, SDNQLayerMixin) for m in model.modules())


@pytest.mark.parametrize("comp", COMPONENTS)
def test_future_config_fields_are_kept_and_warned_once(source: Path, tmp_path: Path, comp: str) -> None:
    folder = tmp_path / comp
    shutil.copytree(source / comp, folder)
    field = f"future_option_{comp}"
    _edit_both_configs(folder, lambda q: q.update({field: {"x": 1}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _load(comp, folder)
    hits = [w for w in caught if field in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in caught]
    config = model.config.quantization_config
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    assert as_dict[field] == {"x": 1}
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"][field] == {"x": 1}


def test_undamaged_copies_load(source: Path, tmp_path: Path) -> None:
    """The damage helpers' baseline: an untouched copy (and a correctly sharded one) loads quantized."""
    for comp in COMPONENTS:
        folder = tmp_path / comp
        shutil.copytree(source / comp, folder)
        _shard(folder)
        model = _load(comp, folder)
        assert sum(isinstance(m, SDNQLayerMixin) for m in model.modules()) > 0
    assert os.path.isdir(tmp_path)
