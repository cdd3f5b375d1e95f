"""The ``diffusers-sdnq`` command line, end to end on the tiny reference-quantized fixtures.

Oracles, none of them produced by the CLI's own code:
* inspect: the reference quantizer's in-memory summary (``reference_summary.json``: quantized count, dtype per
  layer, skipped linears), tensor counts and byte sizes read with ``safetensors.safe_open``, dense shapes and
  parameter counts from the *dense* fixture the checkpoint was made from.
* verify: files corrupted on purpose (truncated, NaN written into a scale, a scale of the wrong shape, a missing
  zero point, a header whose shape disagrees with its byte range, a shard index pointing at the wrong shard).
* dequantize: the output is loaded by plain diffusers/transformers in a child process in which diffusers_sdnq
  cannot be imported, and compared bit for bit with the weights our loader dequantizes (itself tested against the
  reference in test_pipelines.py) and with every other tensor as stored.
* quantize: the round-to-nearest error bound |w - deq(w)| <= scale / 2 against the dense fixture.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TESTS
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import get_fixture

from diffusers_sdnq.cli import main
from diffusers_sdnq.format import get_dtype

QUANTIZED = {"flux2_klein": ("transformer", "text_encoder"), "zimage": ("transformer", "text_encoder"),
             "flux1": ("transformer", "text_encoder", "text_encoder_2"), "qwen3": ("",)}
COMPANION_SUFFIXES = (".scale", ".zero_point", ".svd_up", ".svd_down")


# ----------------------------------------------------------------------------------------------------------------
# helpers (independent of the CLI: safetensors' own reader, plain json)
# ----------------------------------------------------------------------------------------------------------------


def fixture(fixtures_root: Path, name: str, variant: str) -> Path:
    return get_fixture(name, variant, fixtures_root)


def st_headers(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor in a folder's safetensors files, read with safetensors' own reader."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                t = fh.get_slice(key)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8,
                         "I8": torch.int8, "I16": torch.int16, "I64": torch.int64, "U16": torch.uint16,
                         "F8_E4M3": torch.float8_e4m3fn}[t.get_dtype()]
                out[key] = (tuple(t.get_shape()), dtype)
    return out


def nbytes(meta: tuple[tuple[int, ...], torch.dtype]) -> int:
    return math.prod(meta[0]) * torch.empty((), dtype=meta[1]).element_size()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def copy_fixture(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    return dst


def header_of(file: Path) -> tuple[int, dict]:
    with open(file, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        return hlen, json.loads(fh.read(hlen))


def split_into_shards(folder: Path, weights: str = "diffusion_pytorch_model") -> None:
    """Rewrite a folder's single safetensors file as two shards plus an index (diffusers naming)."""
    file = folder / f"{weights}.safetensors"
    tensors = load_file(str(file))
    keys = sorted(tensors)
    # a layer's tensors may straddle shards; split in the middle of a layer on purpose
    half = next(i for i in range(len(keys) // 2, len(keys)) if keys[i].endswith(".scale"))
    names = [f"{weights}-00001-of-00002.safetensors", f"{weights}-00002-of-00002.safetensors"]
    parts = [keys[:half], keys[half:]]
    weight_map = {}
    for name, part in zip(names, parts):
        save_file({k: tensors[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    file.unlink()
    (folder / f"{weights}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def cli_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


# ----------------------------------------------------------------------------------------------------------------
# entry points and --help
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["", "inspect", "verify", "dequantize", "quantize"])
def test_help_every_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"] if command else ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: diffusers-sdnq" in out
    if command:
        assert f"diffusers-sdnq {command}" in out
    else:
        assert all(c in out for c in ("inspect", "verify", "dequantize", "quantize"))


def test_console_script_declared_and_python_m(fixtures_root):
    """pyproject's console script resolves to cli.main, and ``python -m diffusers_sdnq`` runs the same CLI."""
    from importlib.metadata import entry_points

    scripts = [ep for ep in entry_points(group="console_scripts") if ep.name == "diffusers-sdnq"]
    assert scripts and scripts[0].value == "diffusers_sdnq.cli:main"
    assert scripts[0].load() is main
    path = fixture(fixtures_root, "qwen3", "int8")
    proc = subprocess.run([sys.executable, "-m", "diffusers_sdnq", "inspect", "--json", str(path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(TESTS)})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    summary = json.loads((path / "reference_summary.json").read_text())["model"]
    assert report["components"][path.name]["quantized_layers"] == summary["quantized"]
    bad = subprocess.run([sys.executable, "-m", "diffusers_sdnq", "verify", str(path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "no such file" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["uint4_svd", "dynamic", "int8"])
@pytest.mark.parametrize("name", ["flux2_klein", "zimage", "flux1", "qwen3"])
def test_inspect_json_counts(name, variant, fixtures_root, capsys):
    path = fixture(fixtures_root, name, variant)
    dense_root = fixture(fixtures_root, name, "dense")
    code, out, _ = run_cli(capsys, "inspect", "--json", str(path))
    assert code == 0
    report = json.loads(out)
    assert report["kind"] == ("model" if name == "qwen3" else "pipeline")
    summary = json.loads((path / "reference_summary.json").read_text())
    for comp in QUANTIZED[name]:
        key = comp or path.name
        got = report["components"][key]
        ref = summary[comp or "model"]
        folder, dense_folder = path / comp, dense_root / comp
        headers, dense = st_headers(folder), st_headers(dense_folder)
        prefixes = sorted(k[: -len(".scale")] for k in headers if k.endswith(".scale"))
        # counts: reference's own summary and the files' .scale keys
        assert got["quantized_layers"] == ref["quantized"] == len(prefixes)
        assert got["dtypes"] == {k: v for k, v in sorted(ref["weights_dtypes"].items())}
        widths = Counter()
        for dtype_name, count in ref["weights_dtypes"].items():
            widths[str(get_dtype(dtype_name).bits)] += count
        assert got["widths"] == dict(sorted(widths.items(), key=lambda kv: int(kv[0])))
        for dtype_name, layers in ref["modules_dtype_dict"].items():  # dynamic: the reference's per-layer choice
            for weight_name in layers:
                assert got["layers"][weight_name[: -len(".weight")]]["dtype"] == dtype_name, weight_name
        assert sum(1 for s in got["skipped"] if s["kind"] == "linear") == ref["skipped_linears"]
        assert got["sdnq_version"] == json.loads((folder / "config.json").read_text())["quantization_config"][
            "sdnq_version"]
        # shapes and sizes: the dense fixture the checkpoint was made from
        for p in prefixes:
            assert tuple(got["layers"][p]["shape"]) == dense[f"{p}.weight"][0], p
        ranks = Counter(str(min(headers[f"{p}.svd_up"][0])) for p in prefixes if f"{p}.svd_up" in headers)
        assert got["svd_ranks"] == dict(ranks)
        layer_bytes = sum(nbytes(m) for k, m in headers.items()
                          if k.rpartition(".")[0] in prefixes and not k.endswith(".bias"))
        layer_numel = sum(math.prod(dense[f"{p}.weight"][0]) for p in prefixes)
        assert got["bits_per_weight"] == pytest.approx(layer_bytes * 8 / layer_numel, abs=1e-4)
        dense_float = sum(math.prod(m[0]) for m in dense.values() if m[1].is_floating_point)
        assert got["dense_parameters"] == dense_float
        assert got["bytes_dense_bf16"] == 2 * dense_float + sum(nbytes(m) for m in dense.values()
                                                                if not m[1].is_floating_point)
        assert got["bytes_on_disk"] == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        assert got["bytes_tensors"] == sum(nbytes(m) for m in headers.values())
    # the header-only path (no model class) describes every layer the same way
    code, out, _ = run_cli(capsys, "inspect", "--json", "--no-model", str(path))
    assert code == 0
    no_model = json.loads(out)
    for comp in QUANTIZED[name]:
        key = comp or path.name
        assert no_model["components"][key]["layers"] == report["components"][key]["layers"]
        assert no_model["components"][key]["shape_source"] == "stored tensors"


def test_inspect_human_output(fixtures_root, capsys):
    path = fixture(fixtures_root, "flux2_klein", "dynamic")
    code, out, _ = run_cli(capsys, "inspect", "--layers", str(path))
    assert code == 0
    summary = json.loads((path / "reference_summary.json").read_text())
    assert f"quantized layers: {summary['transformer']['quantized']}" in out
    for dtype_name, count in summary["transformer"]["weights_dtypes"].items():
        assert f"{dtype_name} ×{count}" in out
    assert "vae  diffusers.AutoencoderKLFlux2  not quantized" in out
    assert "transformer_blocks.0.attn.to_q: int5 [128, 128]" in out


@pytest.mark.parametrize("variant", ["uint4_svd", "dynamic", "int8"])
def test_inspect_single_file_without_config(variant, fixtures_root, tmp_path, capsys):
    """A bare .safetensors file: widths, grouping, SVD rank and dense shapes come from the tensors alone."""
    path = fixture(fixtures_root, "flux2_klein", variant)
    bare = tmp_path / "bare.safetensors"
    shutil.copy(path / "transformer" / "diffusion_pytorch_model.safetensors", bare)
    code, out, _ = run_cli(capsys, "inspect", "--json", str(bare))
    assert code == 0
    got = json.loads(out)["components"]["bare"]
    assert got["guessed"] and got["quant_method"] == "sdnq?"
    dense = st_headers(fixture(fixtures_root, "flux2_klein", "dense") / "transformer")
    summary = json.loads((path / "reference_summary.json").read_text())["transformer"]
    config = json.loads((path / "transformer" / "config.json").read_text())["quantization_config"]
    per_layer = {w[: -len(".weight")]: d for d, names in summary["modules_dtype_dict"].items() for w in names}
    assert got["quantized_layers"] == summary["quantized"]
    for name, layer in got["layers"].items():
        ref_dtype = get_dtype(per_layer.get(name, config["weights_dtype"]))
        assert layer["guessed"]
        assert tuple(layer["shape"]) == dense[f"{name}.weight"][0], name
        assert layer["bits"] == ref_dtype.bits, name
        assert layer["zero_point"] == ref_dtype.unsigned, name
        if config["use_svd"]:
            assert layer["svd_rank"] == config["svd_rank"]


# ----------------------------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux2_klein", "zimage", "flux1", "qwen3"])
def test_verify_clean_fixtures(name, fixtures_root, capsys):
    for variant in ("uint4_svd", "dynamic", "int8"):
        path = fixture(fixtures_root, name, variant)
        code, out, err = run_cli(capsys, "verify", "--json", str(path))
        report = json.loads(out)
        assert code == 0 and report["ok"], out
        summary = json.loads((path / "reference_summary.json").read_text())
        for comp in QUANTIZED[name]:
            got = report["components"][comp or path.name]
            headers = st_headers(path / comp)
            assert got["layers"] == summary[comp or "model"]["quantized"]
            assert got["tensors"] == len(headers)


@pytest.fixture()
def corrupt_copy(fixtures_root, tmp_path) -> Path:
    return copy_fixture(fixture(fixtures_root, "flux2_klein", "uint4_svd"), tmp_path / "pipe")


def _verify_fails(capsys, path: Path, *needles: str) -> str:
    code, out, err = run_cli(capsys, "verify", str(path))
    assert code == 1, out + err
    assert "FAILED" in out and "Traceback" not in out + err
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"
    return out


def test_verify_truncated_file(corrupt_copy, capsys):
    file = corrupt_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    with open(file, "r+b") as fh:
        fh.truncate(file.stat().st_size - 100)
    out = _verify_fails(capsys, corrupt_copy, str(file), "truncated")
    assert "text_encoder: OK" in out  # the other components are still checked
    assert "transformer: FAILED (1 problem(s))" in out  # reported once, not again by every later step


def test_verify_nan_in_scale(corrupt_copy, capsys):
    file = corrupt_copy / "text_encoder" / "model.safetensors"
    hlen, header = header_of(file)
    key = "model.layers.1.mlp.down_proj.scale"
    assert header[key]["dtype"] == "F32"
    start = header[key]["data_offsets"][0]
    with open(file, "r+b") as fh:
        fh.seek(8 + hlen + start + 4 * 3)
        fh.write(struct.pack("<f", float("nan")))
    out = _verify_fails(capsys, corrupt_copy, str(file), f"stored tensor '{key}'", "1 NaN", "index [3, 0]")
    assert "transformer: OK" in out
    # dequantize refuses, and leaves nothing behind
    code, _, err = run_cli(capsys, "dequantize", str(corrupt_copy), str(corrupt_copy.parent / "plain"))
    assert code == 1 and "model.layers.1.mlp.down_proj" in err and "non-finite" in err
    assert sorted(p.name for p in corrupt_copy.parent.iterdir()) == ["pipe"]


def test_verify_inf_in_svd_factor(corrupt_copy, capsys):
    file = corrupt_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    hlen, header = header_of(file)
    key = "transformer_blocks.0.ff.linear_in.svd_down"
    with open(file, "r+b") as fh:
        fh.seek(8 + hlen + header[key]["data_offsets"][0])
        fh.write(struct.pack("<f", float("inf")))
    _verify_fails(capsys, corrupt_copy, f"stored tensor '{key}'", "0 NaN, 1 Inf", "index [0, 0]")


def test_verify_wrong_shape_and_missing_tensor(corrupt_copy, capsys):
    file = corrupt_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(file))
    bad = "transformer_blocks.0.attn.to_q.scale"
    good_shape = list(tensors[bad].shape)
    tensors[bad] = tensors[bad].reshape(-1)[: tensors[bad].numel() // 2].clone()
    gone = "transformer_blocks.0.attn.to_k.zero_point"
    del tensors[gone]
    save_file(tensors, str(file), metadata={"format": "pt"})
    out = _verify_fails(capsys, corrupt_copy, f"'{bad}' is float32 [{good_shape[0] // 2}]",
                        f"expected float32 or bfloat16 or float16 {good_shape}", f"missing tensor '{gone}'", str(file))
    assert "text_encoder: OK" in out
    assert "stored dense" not in out  # a damaged layer is not also reported as a skipped one


def test_verify_header_byte_count(corrupt_copy, capsys):
    """A header whose shape says fewer bytes than its data range holds (same header length, edited in place)."""
    file = corrupt_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    hlen, header = header_of(file)
    key = next(k for k, v in sorted(header.items()) if k != "__metadata__" and len(v["shape"]) == 1)
    assert header[key]["dtype"] == "F32"
    n = header[key]["shape"][0]
    raw = json.dumps(header, separators=(",", ":"))
    edited = raw.replace(f'"{key}":{{"dtype":"F32","shape":[{n}]', f'"{key}":{{"dtype":"F32","shape":[{n // 2}]')
    assert edited != raw
    edited = edited.encode().ljust(hlen, b" ")
    with open(file, "r+b") as fh:
        fh.seek(8)
        fh.write(edited)
    _verify_fails(capsys, corrupt_copy, f"tensor '{key}' is F32 [{n // 2}] ({n * 2} bytes)",
                  f"header gives it {n * 4} bytes")


def test_verify_sharded_index(fixtures_root, tmp_path, capsys):
    path = copy_fixture(fixture(fixtures_root, "flux2_klein", "dynamic"), tmp_path / "pipe")
    split_into_shards(path / "transformer")
    code, out, _ = run_cli(capsys, "verify", str(path))
    assert code == 0, out
    index_file = path / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = next(k for k, v in index["weight_map"].items() if v.startswith("diffusion_pytorch_model-00001"))
    index["weight_map"][key] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    _verify_fails(capsys, path, f"maps '{key}' to diffusion_pytorch_model-00002-of-00002.safetensors, but it is in "
                                "diffusion_pytorch_model-00001-of-00002.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# dequantize
# ----------------------------------------------------------------------------------------------------------------

PLAIN_LOADER = r'''
import importlib, json, sys
sys.modules["diffusers_sdnq"] = None  # any attempt to import the package fails in this process
from pathlib import Path
import torch

jobs = json.loads(sys.argv[1])
for root, out in jobs:
    root = Path(root)
    if (root / "model_index.json").is_file():
        index = json.loads((root / "model_index.json").read_text())
        comps = {k: v for k, v in index.items()
                 if isinstance(v, list) and v[0] in ("diffusers", "transformers") and (root / k / "config.json").is_file()}
    else:
        cfg = json.loads((root / "config.json").read_text())
        comps = {"": ["diffusers", cfg["_class_name"]] if "_class_name" in cfg else ["transformers", cfg["architectures"][0]]}
    state, info = {}, {}
    for name, (lib, cls_name) in comps.items():
        cls = getattr(importlib.import_module(lib), cls_name)
        model, loading = cls.from_pretrained(str(root / name if name else root), output_loading_info=True)
        info[name] = {k: sorted(str(x) for x in v) for k, v in loading.items()}
        for key, value in model.state_dict().items():
            state[f"{name}/{key}"] = value.detach().clone()
    torch.save({"state": state, "info": info}, out)
loaded = [m for m in sys.modules if (m == "diffusers_sdnq" or m.startswith("diffusers_sdnq.")) and sys.modules[m]]
assert not loaded, loaded
print("plain load ok")
'''


def load_plain(jobs: list[tuple[Path, Path]]) -> list[dict]:
    """Load each folder with plain diffusers/transformers in a child where diffusers_sdnq cannot be imported."""
    env = {**os.environ, "DIFFUSERS_SDNQ_AUTOLOAD": "0"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOADER, json.dumps([[str(a), str(b)] for a, b in jobs])],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out) for _, out in jobs]


def ours_dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every component as our loader holds it, SDNQ layers replaced by their dequantized weight."""
    from diffusers import DiffusionPipeline
    from transformers import AutoModelForCausalLM

    from diffusers_sdnq.layers import sdnq_layers

    if (path / "model_index.json").is_file():
        pipe = DiffusionPipeline.from_pretrained(str(path))
        comps = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    else:
        comps = {"": AutoModelForCausalLM.from_pretrained(str(path))}
    out = {}
    for cname, module in comps.items():
        layers = sdnq_layers(module)
        for key, value in module.state_dict().items():
            layer, _, leaf = key.rpartition(".")
            if layer in layers:
                if leaf == "weight":
                    out[f"{cname}/{key}"] = layers[layer].dequantize_weight(torch.float32)
                elif leaf == "bias":
                    out[f"{cname}/{key}"] = value
            else:
                out[f"{cname}/{key}"] = value
    return out


def _assert_plain_folder(src: Path, out: Path) -> None:
    """No quantization config anywhere; every non-weight file except config.json copied byte for byte."""
    assert not list(out.rglob("quantization_config.json"))
    for cfg in out.rglob("config.json"):
        assert "quantization_config" not in json.loads(cfg.read_text()), cfg
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if f.is_dir() or f.name in ("config.json", "quantization_config.json") or ".safetensors" in f.name:
            continue
        assert (out / rel).read_bytes() == f.read_bytes(), rel


def test_dequantize_loads_without_package_bit_exact(fixtures_root, cli_tmp, capsys):
    cases = [("flux2_klein", "uint4_svd", "fp32"), ("flux2_klein", "dynamic", "bf16"), ("flux1", "uint4_svd", "fp32"),
             ("qwen3", "int8", "fp32")]
    jobs, expected = [], []
    for name, variant, dtype in cases:
        src = fixture(fixtures_root, name, variant)
        out = cli_tmp / f"plain-{name}-{variant}-{dtype}"
        code, stdout, err = run_cli(capsys, "dequantize", str(src), str(out), "--dtype", dtype, "--no-progress")
        assert code == 0, err
        _assert_plain_folder(src, out)
        jobs.append((out, cli_tmp / f"{name}-{variant}-{dtype}.pt"))
        expected.append((src, dtype))
    for (out, _), (src, dtype), result in zip(jobs, expected, load_plain(jobs)):
        for comp, info in result["info"].items():
            assert not info.get("missing_keys") and not info.get("unexpected_keys"), (out, comp, info)
            assert not info.get("mismatched_keys"), (out, comp, info)
        ours = ours_dequantized(src)
        plain = result["state"]
        assert set(plain) == set(ours), (sorted(set(plain) ^ set(ours))[:5], out)
        quantized_components = {c for c in QUANTIZED[src.parent.name]}
        for key, value in plain.items():
            want = ours[key]
            comp = key.split("/")[0]
            if dtype == "bf16" and comp in quantized_components and want.is_floating_point():
                want = want.to(torch.bfloat16)  # the CLI rounds once to bf16; the plain loader reads it back
            assert value.to(want.dtype).equal(want), (out, key)
        if dtype == "bf16":
            for comp in QUANTIZED[src.parent.name]:
                dtypes = {m[1] for m in st_headers(out / comp).values() if m[1].is_floating_point}
                assert dtypes == {torch.bfloat16}, (comp, dtypes)


def test_dequantize_sharded_and_single_file(fixtures_root, cli_tmp, capsys):
    src = copy_fixture(fixture(fixtures_root, "flux2_klein", "uint4_svd"), cli_tmp / "sharded-src")
    split_into_shards(src / "transformer")
    out = cli_tmp / "sharded-plain"
    code, _, err = run_cli(capsys, "dequantize", str(src), str(out), "--dtype", "fp32")
    assert code == 0, err
    shards = sorted(p.name for p in (out / "transformer").glob("*.safetensors"))
    assert shards == ["diffusion_pytorch_model-00001-of-00002.safetensors",
                      "diffusion_pytorch_model-00002-of-00002.safetensors"]
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    headers = {}
    for shard in shards:
        with safe_open(str(out / "transformer" / shard), "pt") as fh:
            headers.update({k: shard for k in fh.keys()})  # noqa: SIM118
    assert index["weight_map"] == headers
    assert index["metadata"]["total_size"] == sum((out / "transformer" / s).stat().st_size for s in shards)
    assert not any(k.endswith(COMPANION_SUFFIXES) for k in headers)
    # the single file (its config.json beside it) gives the same tensors as the folder
    single = cli_tmp / "single.safetensors"
    file_in = fixture(fixtures_root, "flux2_klein", "uint4_svd") / "transformer" / "diffusion_pytorch_model.safetensors"
    code, _, err = run_cli(capsys, "dequantize", str(file_in), str(single), "--dtype", "fp32")
    assert code == 0, err
    a = load_file(str(single))
    b = {}
    for shard in shards:
        b.update(load_file(str(out / "transformer" / shard)))
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)
    result = load_plain([(out, cli_tmp / "sharded.pt")])[0]
    ours = ours_dequantized(fixture(fixtures_root, "flux2_klein", "uint4_svd"))
    for key, value in result["state"].items():
        if key.startswith("transformer/"):
            assert value.equal(ours[key]), key


def test_dequantize_is_atomic(fixtures_root, tmp_path, capsys, monkeypatch):
    src = fixture(fixtures_root, "qwen3", "int8")
    out = tmp_path / "plain"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, _, err = run_cli(capsys, "dequantize", str(src), str(out))
    assert code == 1 and "--overwrite" in err and (out / "keep.txt").read_text() == "old"
    code, _, err = run_cli(capsys, "dequantize", str(src), str(src / "inside"))
    assert code == 1 and "must not be the input" in err

    from diffusers_sdnq.cli import safetensors_io

    calls = {"n": 0}
    real_write = safetensors_io.StreamingSafetensorsWriter.write

    def failing_write(self, key, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return real_write(self, key, tensor)

    monkeypatch.setattr(safetensors_io.StreamingSafetensorsWriter, "write", failing_write)
    code, _, err = run_cli(capsys, "dequantize", str(src), str(out), "--overwrite")
    assert code == 1 and "disk full" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"] and (out / "keep.txt").read_text() == "old"
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "dequantize", str(src), str(out), "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_dequantize_bare_file_needs_config(fixtures_root, tmp_path, capsys):
    bare = tmp_path / "bare.safetensors"
    shutil.copy(fixture(fixtures_root, "qwen3", "int8") / "model.safetensors", bare)
    code, _, err = run_cli(capsys, "dequantize", str(bare), str(tmp_path / "out.safetensors"))
    assert code == 1 and "no quantization_config" in err and not (tmp_path / "out.safetensors").exists()
    code, _, err = run_cli(capsys, "dequantize", str(fixture(fixtures_root, "qwen3", "dense")), str(tmp_path / "out"))
    assert code == 1 and "nothing to dequantize" in err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------------------------


def test_quantize_pipeline_uint4(fixtures_root, cli_tmp, capsys):
    from diffusers import Flux2Transformer2DModel

    from diffusers_sdnq.layers import sdnq_layers

    dense = fixture(fixtures_root, "flux2_klein", "dense")
    out = cli_tmp / "quantized-uint4"
    code, stdout, err = run_cli(capsys, "quantize", str(dense), str(out), "--weights-dtype", "uint4", "--no-progress")
    assert code == 0, err
    assert (out / "transformer" / "quantization_config.json").is_file()
    for comp in ("vae", "text_encoder", "tokenizer", "scheduler"):  # not selected: copied byte for byte
        for f in (dense / comp).rglob("*"):
            if f.is_file():
                assert (out / comp / f.relative_to(dense / comp)).read_bytes() == f.read_bytes(), f
    code, report, _ = run_cli(capsys, "verify", "--json", str(out))
    assert code == 0 and json.loads(report)["ok"]
    code, report, _ = run_cli(capsys, "inspect", "--json", str(out))
    got = json.loads(report)["components"]["transformer"]
    assert got["dtypes"] == {"uint4": got["quantized_layers"]} and got["quantized_layers"] > 0
    assert not json.loads(report)["components"]["text_encoder"]["quantized"]
    # round-to-nearest bound against the dense weights: |w - deq| <= scale / 2 per group
    model = Flux2Transformer2DModel.from_pretrained(str(out / "transformer"))
    dense_weights = load_file(str(dense / "transformer" / "diffusion_pytorch_model.safetensors"))
    layers = sdnq_layers(model)
    assert len(layers) == got["quantized_layers"]
    for name, layer in layers.items():
        lay = layer.sdnq_layout
        err_ = (layer.dequantize_weight(torch.float32) - dense_weights[f"{name}.weight"]).abs()
        bound = layer.scale.float() / 2 * (1 + 1e-5) + 1e-7
        assert (err_.reshape(lay.quantized_shape) <= bound).all(), name


def test_quantize_svd_and_dynamic_verify(fixtures_root, tmp_path, capsys):
    """The writer's SVD and dynamic modes through the CLI: the outputs verify and hold the asked-for layouts."""
    dense = fixture(fixtures_root, "flux2_klein", "dense")
    for extra, expect in ((["--svd-rank", "8"], "use_svd"), (["--dynamic"], "use_dynamic_quantization")):
        out = tmp_path / expect
        code, _, err = run_cli(capsys, "quantize", str(dense), str(out), "--weights-dtype", "uint4", *extra)
        assert code == 0, err
        assert main(["verify", str(out)]) == 0
        config = json.loads((out / "transformer" / "config.json").read_text())["quantization_config"]
        assert config[expect] is True


def test_quantize_bad_options_fail_cleanly(fixtures_root, tmp_path, capsys):
    """Bad options fail with a clear message before anything is written, never a traceback."""
    dense = fixture(fixtures_root, "flux2_klein", "dense")
    code, _, err = run_cli(capsys, "quantize", str(dense), str(tmp_path / "bad"), "--weights-dtype", "int99")
    assert code == 1 and "int99" in err and "Traceback" not in err and not (tmp_path / "bad").exists()
    code, _, err = run_cli(capsys, "quantize", str(dense), str(tmp_path / "bad"), "--weights-dtype", "uint4",
                           "--components", "transformer,nosuch")
    assert code == 1 and "nosuch" in err
    code, _, err = run_cli(capsys, "quantize", str(fixture(fixtures_root, "flux2_klein", "int8")),
                           str(tmp_path / "bad"), "--weights-dtype", "uint4")
    assert code == 1 and "already quantized" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_quantize_transformers_component(fixtures_root, tmp_path, capsys):
    """A transformers text encoder quantizes too (transformers' on-the-fly path); the result verifies and the
    encoder holds SDNQ layers. Run as a real process, so stderr is exactly what a user sees."""
    dense = fixture(fixtures_root, "flux2_klein", "dense")
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, "-m", "diffusers_sdnq", "quantize", str(dense), str(out), "--weights-dtype",
                           "int8", "--components", "transformer,text_encoder", "--min-numel", "4096",
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    code, report, _ = run_cli(capsys, "verify", "--json", str(out))
    assert code == 0
    assert json.loads(report)["components"]["text_encoder"]["layers"] > 0
    assert json.loads(report)["components"]["transformer"]["layers"] > 0


def test_quantize_too_small_layers_is_reported(fixtures_root, tmp_path, capsys):
    """With the default minimum size every tiny text-encoder layer is skipped: a clear error, nothing written."""
    dense = fixture(fixtures_root, "flux2_klein", "dense")
    code, _, err = run_cli(capsys, "quantize", str(dense), str(tmp_path / "q"), "--weights-dtype", "int8",
                           "--components", "text_encoder", "--no-progress")
    assert code == 1 and "no layer was quantized" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# fp8 "fnuz" checkpoints written by the reference (issue 15 item 10)
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fnuz_checkpoints() -> Path:
    """The tiny Qwen3 quantized by the reference to both fp8 "fnuz" types, with the reference's own dequantized
    weights beside them (tests/hostile_reference.py)."""
    from hostile_reference import reference_outputs

    return reference_outputs() / "fnuz"


@pytest.mark.parametrize("dtype,st_name", [("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ")])
def test_fnuz_checkpoints_of_the_reference_load_inspect_verify_dequantize(fnuz_checkpoints, tmp_path, capsys,
                                                                         dtype, st_name):
    """The header reader refused F8_E4M3FNUZ / F8_E5M2FNUZ as "an invalid header entry". Oracle: the reference's
    dequantized weights of the same files, bit for bit, through our loader and through `dequantize`."""
    from transformers import AutoModelForCausalLM

    from diffusers_sdnq.layers import sdnq_layers

    folder = fnuz_checkpoints / dtype
    expected = load_file(str(fnuz_checkpoints / f"{dtype}.expected.safetensors"))
    assert expected, "the reference quantized no layer"
    _, header = header_of(folder / "model.safetensors")
    assert st_name in {v["dtype"] for k, v in header.items() if k != "__metadata__"}, "no fnuz tensor was written"
    layers = sdnq_layers(AutoModelForCausalLM.from_pretrained(str(folder)))
    assert sorted(layers) == sorted(expected)
    for name, layer in layers.items():
        assert torch.equal(layer.dequantize_weight(torch.float32), expected[name]), name
    code, report, err = run_cli(capsys, "inspect", "--json", str(folder))
    assert code == 0, err
    assert json.loads(report)["components"][folder.name]["dtypes"] == {dtype: len(expected)}
    code, out, err = run_cli(capsys, "verify", "--no-progress", str(folder))
    assert code == 0 and "all checks passed" in out, out + err
    code, _, err = run_cli(capsys, "dequantize", "--dtype", "fp32", "--no-progress", str(folder), str(tmp_path / "d"))
    assert code == 0, err
    dense = load_file(str(tmp_path / "d" / "model.safetensors"))
    for name, weight in expected.items():
        assert torch.equal(dense[f"{name}.weight"], weight), name
