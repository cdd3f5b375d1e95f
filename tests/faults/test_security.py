"""Security properties: safetensors only (no pickle is ever unpickled by us), no remote code, no file outside
the model folder (the index case is in test_checkpoint_faults.py)."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cache_root
from safetensors.torch import load_file
from tiny_models import get_fixture

import diffusers_sdnq  # noqa: F401
from diffusers_sdnq.format import SDNQFormatError

SRC = Path(__file__).resolve().parents[2] / "src"


def _calls(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            out.append(ast.unparse(node.func))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out += [f"import {a.name}" for a in node.names] + ([f"from {node.module}"] if isinstance(node, ast.ImportFrom) else [])
        if isinstance(node, ast.keyword) and node.arg in ("trust_remote_code", "weights_only"):
            out.append(f"{node.arg}={ast.unparse(node.value)}")
    return out


def test_source_never_unpickles_or_trusts_remote_code() -> None:
    banned = ("torch.load", "pickle", "import pickle", "import dill", "from pickle", "eval", "exec",
              "trust_remote_code=True", "weights_only=False", "marshal")
    found = []
    for file in sorted(SRC.rglob("*.py")):
        for call in _calls(ast.parse(file.read_text(), filename=str(file))):
            if any(call == b or call.startswith(b + ".") for b in banned):
                found.append(f"{file.relative_to(SRC)}: {call}")
    assert not found, found


@pytest.mark.parametrize("comp", ["transformer", "text_encoder"])
def test_pickled_sdnq_weights_are_refused_before_loading(tmp_path: Path, monkeypatch, comp: str) -> None:
    source = get_fixture("flux2_klein", "int8", cache_root() / "models") / comp
    folder = tmp_path / comp
    shutil.copytree(source, folder)
    weights = next(folder.glob("*.safetensors"))
    name = "diffusion_pytorch_model.bin" if comp == "transformer" else "pytorch_model.bin"
    torch.save(load_file(weights), folder / name)
    weights.unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on an SDNQ checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(SDNQFormatError, match=f"safetensors files only, found {name}"):
        if comp == "transformer":
            from diffusers import Flux2Transformer2DModel

            Flux2Transformer2DModel.from_pretrained(folder)
        else:
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "sdnq"
