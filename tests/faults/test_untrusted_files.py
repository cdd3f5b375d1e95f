"""Files of a model folder as an attacker or a broken download makes them: FIFOs, huge or malformed safetensors
headers, deeply nested JSON, wrongly typed config fields (issue 16, items 6, 9, 10).

Oracles: safetensors' own reader (what it refuses, we must refuse before saying "OK"), the fixtures' untouched
copies (which load), and the messages: each must name the file and, for config fields, the field.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from hostile import cli as _cli
from hostile import copy_tree as _copy
from hostile import fixture as _fixture
from hostile import unblocking_fifos
from safetensors import safe_open

import diffusers_sdnq  # noqa: F401
from diffusers_sdnq.format import SDNQConfigError, SDNQFormatError
from diffusers_sdnq.layers import read_safetensors_header


def _header(path: Path) -> tuple[dict, bytes]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        return header, fh.read()


def _write(path: Path, header: bytes | dict, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _safetensors_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                fh.get_slice(key)
        return True
    except Exception:  # noqa: BLE001
        return False


def _load_lm(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ 6. FIFOs


def test_a_fifo_named_safetensors_does_not_hang_a_dense_load(tmp_path: Path) -> None:
    """The SDNQ evidence scan opened every *.safetensors of a local folder: a FIFO hung from_pretrained of plain
    dense models. It is never opened now; the dense model loads."""
    folder = _copy(_fixture("qwen3", "dense"), tmp_path / "dense")
    fifo = folder / "extra.safetensors"
    os.mkfifo(fifo)
    model = unblocking_fifos([fifo], lambda: _load_lm(folder))
    assert not any(hasattr(m, "sdnq_layout") for m in model.modules())


def test_a_fifo_in_an_sdnq_checkpoint_is_refused_naming_it(tmp_path: Path) -> None:
    folder = _copy(_fixture("qwen3", "int8"), tmp_path / "q")
    fifo = folder / "extra.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(SDNQFormatError, match=f"{fifo}.*FIFO"):
        unblocking_fifos([fifo], lambda: read_safetensors_header(fifo))
    side = folder / "quantization_config.json"
    side.unlink()
    os.mkfifo(side)  # a FIFO sidecar is not a file: never opened, the load goes on from config.json
    fifo.unlink()
    model = unblocking_fifos([side], lambda: _load_lm(folder))
    assert any(hasattr(m, "sdnq_layout") for m in model.modules())


# ------------------------------------------------------------------------------------------------ 9. header bounds


def test_header_entry_count_is_bounded_before_parsing(tmp_path: Path, monkeypatch) -> None:
    """1.5 million empty tensors in a 95 MB header cost 46 s / 1.4 GB in `inspect`. The bound is checked on the
    raw bytes first; the limit is lowered here so the file stays small (the real one is 1,000,000)."""
    from diffusers_sdnq.layers import files as files_mod

    monkeypatch.setattr(files_mod, "MAX_HEADER_ENTRIES", 1000)
    path = tmp_path / "many.safetensors"
    entry = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    _write(path, {str(i): entry for i in range(1001)}, b"")
    assert _safetensors_accepts(path)  # valid for safetensors: only our bound refuses it
    with pytest.raises(SDNQFormatError, match=f"{path}.*1001 tensors, more than diffusers-sdnq reads"):
        read_safetensors_header(path)
    _write(path, {str(i): entry for i in range(1000)}, b"")
    assert len(read_safetensors_header(path)) == 1000


def test_header_larger_than_safetensors_allows_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", 100_000_001))
        fh.truncate(100_000_001 + 8)  # sparse: no disk used
    assert not _safetensors_accepts(path)
    with pytest.raises(SDNQFormatError, match="more than the format allows"):
        read_safetensors_header(path)


def _rewrite_first_shard(folder: Path, edit) -> Path:
    path = folder / "model.safetensors"
    header, data = _header(path)
    raw = edit(header)
    _write(path, raw if isinstance(raw, bytes) else header, data)
    return path


def _gap(header: dict) -> None:
    key = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[key]["data_offsets"] = [header[key]["data_offsets"][0] + 1, header[key]["data_offsets"][1] + 1]


def _overlap(header: dict) -> None:
    key = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start - 1, end - 1]


def _duplicate(header: dict) -> bytes:
    """A name written twice, the second time with another tensor's entry (JSON keeps the last one)."""
    first, other = [k for k in header if k != "__metadata__"][:2]
    return (json.dumps(header)[:-1] + ", " + json.dumps(first) + ": " + json.dumps(header[other]) + "}").encode()


def _surrogate(header: dict) -> bytes:
    key = next(k for k in header if k != "__metadata__")
    return json.dumps(header).replace(json.dumps(key), json.dumps(key)[:-1] + '\\ud800"', 1).encode()


def _nested(header: dict) -> bytes:
    key = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)
    return text.replace(json.dumps(key) + ": ", json.dumps(key) + ": " + "[" * 200_000 + "]" * 200_000
                        + ", \"x\": ", 1).encode()


REJECTED = {"gap": _gap, "overlap": _overlap, "duplicate": _duplicate, "surrogate": _surrogate, "nested": _nested}


@pytest.mark.parametrize("case", list(REJECTED))
def test_headers_safetensors_rejects_fail_inspect_verify_and_loading(tmp_path: Path, capsys, case: str) -> None:
    """`inspect` exited 0 (and `verify` said OK) on headers safetensors itself refuses."""
    folder = _copy(_fixture("qwen3", "int8"), tmp_path / "q")
    path = _rewrite_first_shard(folder, REJECTED[case])
    assert not _safetensors_accepts(path), "the damage must be one safetensors refuses"
    with pytest.raises(SDNQFormatError, match=str(path)):
        read_safetensors_header(path)
    for argv in (["inspect", str(folder)], ["verify", str(folder), "--no-progress"]):
        code, text = _cli(capsys, *argv)
        assert code == 1 and str(path) in text, (argv, text)
        assert "Traceback" not in text and "RecursionError" not in text
    with pytest.raises(ValueError):  # ours (SDNQFormatError) or the library's own, never a raw RecursionError
        _load_lm(folder)


class ScanCountingDict(dict):
    """A header dict that counts full scans (iteration, ``items``, ``keys``, ``values``)."""

    scans = 0

    def __iter__(self):
        ScanCountingDict.scans += 1
        return super().__iter__()

    def items(self):
        ScanCountingDict.scans += 1
        return super().items()

    def keys(self):
        ScanCountingDict.scans += 1
        return super().keys()

    def values(self):
        ScanCountingDict.scans += 1
        return super().values()


def test_planning_scans_the_header_a_bounded_number_of_times(tmp_path: Path, monkeypatch) -> None:
    """A header of many "layers" (a scale beside each weight) was planned with a scan of every key per layer:
    quadratic in the header, hours for a crafted one. The number of full scans is counted (not timed): it must not
    grow with the number of layers, in the CLI's planning and in the loader's."""
    from diffusers_sdnq.cli import plan as cli_plan
    from diffusers_sdnq.layers import replace

    def header(layers: int) -> ScanCountingDict:
        out = ScanCountingDict()
        for i in range(layers):
            dict.__setitem__(out, f"blocks.{i}.lin.weight", ((2, 2), __import__("torch").uint8))
            dict.__setitem__(out, f"blocks.{i}.lin.scale", ((2, 1), __import__("torch").float32))
        return out

    scans = {}
    for layers in (200, 2000):
        stored = header(layers)
        monkeypatch.setattr(cli_plan, "read_checkpoint_headers", lambda files, s=stored: (s, {k: "x.safetensors"
                                                                                             for k in dict.keys(s)}))
        comp = cli_plan.Component(name="many", folder=tmp_path, files=[tmp_path / "x.safetensors"])
        ScanCountingDict.scans = 0
        plan = cli_plan.plan_component(comp, use_model=False)
        assert len(plan.layers) == layers, plan.problems[:3]
        scans[("cli", layers)] = ScanCountingDict.scans
    assert scans[("cli", 2000)] == scans[("cli", 200)] < 50, scans

    import torch

    from diffusers_sdnq.format.config import QuantConfig

    class Lin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2, bias=False)

    config = QuantConfig.from_dict({"weights_dtype": "uint4", "group_size": -1, "sdnq_version": "0.2.8"})
    for layers in (20, 200):
        with torch.device("meta"):
            model = torch.nn.Module()
            model.blocks = torch.nn.ModuleList([Lin() for _ in range(layers)])
        stored = header(layers)
        ScanCountingDict.scans = 0
        try:
            replace.plan_model(model, config, stored)
        except ValueError:
            pass  # whether these tiny layers fit a layout does not matter here, only how often the header is read
        scans[("load", layers)] = ScanCountingDict.scans
    assert scans[("load", 200)] == scans[("load", 20)] < 50, scans


# ------------------------------------------------------------------------------------------------ 10. JSON and types

DEEP = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("where", ["config.json", "quantization_config.json"])
def test_deeply_nested_json_is_an_error_naming_the_file(tmp_path: Path, capsys, where: str) -> None:
    folder = _copy(_fixture("qwen3", "int8"), tmp_path / "q")
    text = (folder / where).read_text()
    (folder / where).write_text(text.rstrip()[:-1] + f', "deep": {DEEP}}}')
    with pytest.raises(SDNQConfigError, match=f"{folder / where}.*nested too deeply"):
        _load_lm(folder)
    code, out = _cli(capsys, "inspect", str(folder))
    assert code == 1 and str(folder / where) in out and "RecursionError" not in out, out


FIELD_CASES = {
    "hadamard_group_size": ({"hadamard_group_size": "x"}, r"hadamard_group_size must be an integer"),
    "override-type": ({"modules_quant_config": {"*": {"group_size": "32"}}},
                      r"modules_quant_config\['\*'\]\.group_size must be an integer"),
    "override-not-object": ({"modules_quant_config": {"*": 3}}, r"modules_quant_config\['\*'\] must be an object"),
    "bool-field": ({"use_svd": "yes"}, r"use_svd must be true or false"),
    "list-item": ({"modules_to_not_convert": ["lm_head", 7]}, r"modules_to_not_convert\[1\] must be a layer name"),
    "dtype-dict-value": ({"modules_dtype_dict": {"int8": "lm_head"}}, r"modules_dtype_dict\['int8'\] must be a list"),
    "invalid-pattern": ({"modules_to_not_use_matmul": ["mlp[*"]}, r"modules_to_not_use_matmul: entry 0 'mlp\[\*'"),
    "invalid-pattern-dict": ({"modules_dtype_dict": {"int8": ["(a*"]}}, r"modules_dtype_dict\['int8'\]: entry 0"),
    "nested-extra": ({"future": json.loads("[" * 40 + "]" * 40)}, r"future is nested more than 32 levels"),
}


@pytest.mark.parametrize("case", list(FIELD_CASES))
def test_wrong_config_fields_name_the_file_and_the_field(tmp_path: Path, capsys, case: str) -> None:
    """A TypeError deep in the loader named no file or field; per-module overrides were not checked at all."""
    folder = _copy(_fixture("qwen3", "int8"), tmp_path / "q")
    change, pattern = FIELD_CASES[case]
    for name in ("config.json", "quantization_config.json"):
        data = json.loads((folder / name).read_text())
        target = data["quantization_config"] if name == "config.json" else data
        target.update(change)
        (folder / name).write_text(json.dumps(data))
    with pytest.raises(SDNQConfigError, match=pattern) as info:
        _load_lm(folder)
    assert str(folder) in str(info.value), str(info.value)
    code, out = _cli(capsys, "inspect", str(folder))
    assert code == 1 and str(folder) in out, out
    import re

    assert re.search(pattern, out), out


def test_untouched_copy_loads(tmp_path: Path) -> None:
    """Baseline of the damage helpers above: the unedited copy loads quantized."""
    folder = _copy(_fixture("qwen3", "int8"), tmp_path / "q")
    assert any(hasattr(m, "sdnq_layout") for m in _load_lm(folder).modules())
    shutil.rmtree(folder)
