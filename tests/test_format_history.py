"""Checkpoints written by every sdnq release decode bit-exactly with our codec (docs/format-history.md).

The golden fixtures in ``tests/fixtures/format_history/`` were made by ``tests/fixtures/make_fixtures.py``: each
release, installed on its own, quantized tiny seeded layers, saved them with its own ``save_sdnq_model``, and
dequantized them itself; that weight is the expected value (never produced by our code). No old release is needed
to run these tests. Set ``SDNQ_FORMAT_HISTORY_SURVEY`` to a folder made by ``make_fixtures.py survey`` to run the
same checks over the full survey (every dtype name of every release, several hundred cases per release).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_sdnq.format import layer_kind_of
from diffusers_sdnq.format.config import QuantConfig, parse_version
from diffusers_sdnq.format.errors import SDNQFormatVersionWarning
from diffusers_sdnq.format.history import FIELD_SINCE, RELEASES, Readings, readings, resolve_layout, version_str

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "format_history"
SURVEY = os.environ.get("SDNQ_FORMAT_HISTORY_SURVEY")
PARAM = "layer.weight"


@dataclass(frozen=True)
class Case:
    version: str
    id: str
    meta: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["quantization_config"]

    def tensors(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(stored tensors without bias, the writing release's own dequantized weight)."""
        data = _tensors(self.version)
        if SURVEY:
            stored = {k[len("stored."):]: v for k, v in load_file(Path(SURVEY) / self.version / f"{self.id}.safetensors"
                                                                   ).items() if k.startswith("stored.")}
            expected = load_file(Path(SURVEY) / self.version / f"{self.id}.safetensors")["expected"]
        else:
            prefix = f"{self.id}/"
            stored = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix) and k != prefix + "expected"}
            expected = data[prefix + "expected"]
        stored.pop("bias", None)
        return stored, expected

    def kind_and_shape(self) -> tuple[str, tuple[int, ...]]:
        cls = getattr(torch.nn, self.meta["class_name"])
        with torch.device("meta"):
            shape = tuple(cls(*self.meta["args"]).weight.shape)
        return layer_kind_of(self.meta["class_name"]), shape


@cache
def _tensors(version: str) -> dict[str, torch.Tensor]:
    return {} if SURVEY else load_file(FIXTURES / f"{version}.safetensors")


@cache
def _index() -> dict[str, dict[str, Any]]:
    """{version: its json}, from the shipped fixtures or the survey folder."""
    out = {}
    if SURVEY:
        for path in sorted(Path(SURVEY).glob("*/results.json")):
            meta = json.loads(path.read_text())
            meta["cases"] = {cid: dict(rec["case"], quantization_config=rec["quantization_config"])
                             for cid, rec in meta["cases"].items() if rec.get("status") == "ok"}
            out[path.parent.name] = meta
    else:
        for path in sorted(FIXTURES.glob("*.json")):
            info = json.loads(path.read_text())
            base = info["config_base"]  # values shared by the release's configs, stored once
            for meta in info["cases"].values():
                config = {k: v for k, v in base.items() if k not in meta.get("config_missing", ())}
                meta["quantization_config"] = config | meta.get("config_changes", {})
            out[path.stem] = info
    return out


def _cases() -> list[Case]:
    return [Case(v, cid, meta) for v, info in _index().items() for cid, meta in sorted(info["cases"].items())]


CASES = _cases()


def _decode(case: Case, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    kind, shape = case.kind_and_shape()
    stored, expected = case.tensors()
    notes: list[str] = []
    layout = resolve_layout(config, PARAM, kind, shape, stored, prefix="layer.", notes=notes)
    from diffusers_sdnq.format import dequantize

    return dequantize(layout, stored, expected.dtype), expected, notes


def _same(ours: torch.Tensor, expected: torch.Tensor, case: Case) -> bool:
    """Bit-exact, except where the writing release's last step was a BLAS product of this CPU's choosing.

    A Hadamard layer's weight is un-rotated by a float32 matrix product, whose summation order is the BLAS kernel's
    (the fixtures were recorded on an AMD Zen 4 machine; an Intel AMX one sums differently, for the reference as for
    us: the live conformance suite checks that ours equals the reference's on the same machine bit for bit). There,
    each element may differ by twice the product's rounding bound, ``2·n·u·‖block‖₂`` for blocks of ``n`` (H is
    orthonormal with entries ±1/√n, so Σ|b_k·H_kj| ≤ ‖b‖₂), plus one rounding to the output dtype: a misread
    scale, code or matrix is orders of magnitude larger."""
    if torch.equal(ours, expected):
        return True
    if not case.config.get("use_hadamard") or ours.shape != expected.shape or not ours.dtype.is_floating_point:
        return False
    size = int(case.config.get("hadamard_group_size") or 0)
    e = expected.float()
    if size <= 0 or e.numel() % (e.shape[0] * size) or e.shape[0] == 0:
        return False
    blocks = e.contiguous().reshape(e.shape[0], -1, size)
    norms = blocks.norm(dim=-1, keepdim=True).expand_as(blocks).reshape(e.shape)
    bound = 2 * size * 2.0**-24 * norms + torch.finfo(expected.dtype).eps * e.abs()
    return bool(((ours.float() - e).abs() <= bound).all())


def _describe(ours: torch.Tensor, expected: torch.Tensor) -> str:
    diff = (ours.float() - expected.float()).abs()
    return f"{int((diff > 0).sum())} of {diff.numel()} elements differ (max {diff.max():.3g})"


# ------------------------------------------------------------------------------------------------ the fixtures
def test_every_release_has_golden_fixtures() -> None:
    """One fixture file per release, each made by that release (its recorded version and its configs say so)."""
    index = _index()
    if SURVEY:
        pytest.skip("checks the shipped fixtures")
    assert sorted(index, key=parse_version) == [version_str(v) for v in RELEASES]
    total = 0
    for version, info in index.items():
        assert info["sdnq_version"] == version and info["generated_by"] == "tests/fixtures/make_fixtures.py"
        assert info["cases"], f"{version}: no cases"
        for cid, meta in info["cases"].items():
            assert meta["quantization_config"]["sdnq_version"] == version, (version, cid)
        total += (FIXTURES / f"{version}.safetensors").stat().st_size + (FIXTURES / f"{version}.json").stat().st_size
    assert total < 2_500_000, f"fixtures grew to {total} bytes"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.version}/{c.id}")
def test_release_checkpoint_decodes_bit_exact(case: Case) -> None:
    """Our loader, told the writing release by sdnq_version, reproduces that release's own dequantized weight."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unknown-field warnings are not the point here
        config = QuantConfig.from_dict(case.config)
    assert config.version == parse_version(case.version)
    ours, expected, notes = _decode(case, config)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    assert _same(ours, expected, case), f"{case.version}/{case.id}: {_describe(ours, expected)}; notes {notes}"
    if notes:  # only sdnq 0.1.x's lost quantized_matmul_dtype may need the tensors to decide
        assert all("quantized-matmul" in n for n in notes), notes
        assert parse_version(case.version) < (0, 1, 9) and case.config.get("quantized_matmul_dtype") is None


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.version}/{c.id}")
def test_release_detected_without_sdnq_version(case: Case) -> None:
    """With sdnq_version removed, the fields narrow the writer down to releases that include the true one, and the
    weight is still bit-exact unless a warning note said this layer's reading was ambiguous."""
    data = {k: v for k, v in case.config.items() if k != "sdnq_version"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        config = QuantConfig.from_dict(data)
    assert not config.version_known
    assert parse_version(case.version) in config.writer_versions, (case.version, config.writer_versions)
    ours, expected, notes = _decode(case, config)
    if not _same(ours, expected, case):
        assert any("no sdnq_version" in n for n in notes), \
            f"{case.version}/{case.id}: silently misread as sdnq {version_str(config.version)}: " \
            f"{_describe(ours, expected)}"


def test_writer_candidates_follow_the_fields_each_release_writes() -> None:
    """Releases that write the same set of config fields are exactly the ones a version-less config cannot tell
    apart; measured on the fixtures' own configs, independently of our field table."""
    key_sets, samples = {}, {}
    for version, info in _index().items():
        sets = {frozenset(meta["quantization_config"]) for meta in info["cases"].values()}
        assert len(sets) == 1, f"{version} wrote different field sets: {sets}"
        key_sets[version] = sets.pop()
        samples[version] = next(iter(info["cases"].values()))["quantization_config"]
    for version, keys in key_sets.items():
        assert "sdnq_version" in keys, f"{version} did not write sdnq_version"
        same = sorted((v for v, k in key_sets.items() if k == keys), key=parse_version)
        data = {k: v for k, v in samples[version].items() if k != "sdnq_version"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            candidates = [version_str(v) for v in QuantConfig.from_dict(data).writer_versions]
        assert candidates == same, (version, candidates, same)


def test_field_table_matches_what_releases_write() -> None:
    """Each field of FIELD_SINCE first appears in the configs of the release the table names."""
    firsts: dict[str, str] = {}
    for version in sorted(_index(), key=parse_version):
        for meta in _index()[version]["cases"].values():
            for key in meta["quantization_config"]:
                firsts.setdefault(key, version)
    for name, since in FIELD_SINCE.items():
        assert firsts.get(name) == version_str(since), (name, firsts.get(name), since)


def test_absent_fields_take_the_writing_release_defaults() -> None:
    """A field missing from a config means the default of the release that wrote it, as recorded per release."""
    if SURVEY:
        defaults = {v: json.loads((Path(SURVEY) / v / "results.json").read_text())["config_defaults"]
                    for v in _index()}
    else:
        defaults = {v: info["config_defaults"] for v, info in _index().items()}
    for version, values in defaults.items():
        config = QuantConfig.from_dict({"sdnq_version": version, "weights_dtype": "int8"})
        for name in ("dequantize_fp32", "hadamard_group_size", "dynamic_loss_threshold", "group_size", "svd_rank",
                     "add_skip_keys", "use_svd", "quant_conv", "use_quantized_matmul"):
            if name in values:
                assert getattr(config, name) == values[name], (version, name, getattr(config, name), values[name])


def test_reading_rules_change_only_at_measured_releases() -> None:
    """The releases where the reading rules change are the ones docs/format-history.md lists (the default of
    dynamic_loss_threshold, which changed in 0.1.7, only matters when quantizing)."""
    def rules(version: tuple[int, ...]) -> Readings:
        return replace(readings(version), dynamic_loss_threshold_default=None)

    changes = [version_str(b) for a, b in zip(RELEASES, RELEASES[1:]) if rules(a) != rules(b)]
    assert changes == ["0.1.3", "0.1.4", "0.1.6", "0.1.9", "0.2.0", "0.2.1", "0.2.2", "0.2.5"]
    doc = (Path(__file__).resolve().parents[1] / "docs" / "format-history.md").read_text(encoding="utf-8")
    for version in changes:
        assert f"**{version}**" in doc, f"docs/format-history.md does not describe the change in {version}"


# ------------------------------------------------------------------------------------------------ evidence
def _case(version: str, cid: str) -> Case:
    """The fixture of ``cid`` that ``version`` wrote: fixtures are shipped only where a case changed, so this is the
    one of the newest release up to ``version`` that has it (identical tensors and config but for sdnq_version)."""
    shipped = [v for v in _index() if parse_version(v) <= parse_version(version) and cid in _index()[v]["cases"]]
    assert shipped, f"no fixture of {cid} up to sdnq {version}"
    found = max(shipped, key=parse_version)
    return Case(found, cid, _index()[found]["cases"][cid])


def test_lost_matmul_dtype_is_settled_by_the_stored_shapes() -> None:
    """sdnq 0.1.x saved no quantized_matmul_dtype; an int8 layer made for an fp8 matmul was stored untransposed,
    while its config implies transposed storage. The shapes decide, with a note naming the layer."""
    case = _case("0.1.5", "matmul-int8-mm_fp8")
    assert case.config["quantized_matmul_dtype"] is None and case.config["use_quantized_matmul"] is True
    ours, expected, notes = _decode(case, QuantConfig.from_dict(case.config))
    assert torch.equal(ours, expected)
    assert len(notes) == 1 and "'layer'" in notes[0] and "quantized-matmul" in notes[0]


def test_ambiguous_hadamard_release_warns() -> None:
    """Without sdnq_version a 0.1.9-0.2.1 config cannot say which Hadamard matrix was used; the loader warns."""
    case = _case("0.1.9", "hadamard-g16-int8")
    data = {k: v for k, v in case.config.items() if k != "sdnq_version"}
    config = QuantConfig.from_dict(data)
    assert [version_str(v) for v in config.writer_versions] == ["0.1.9", "0.2.0", "0.2.1"]
    kind, shape = case.kind_and_shape()
    stored, _ = case.tensors()
    with pytest.warns(SDNQFormatVersionWarning, match=r"no sdnq_version.*sdnq 0\.1\.9"):
        resolve_layout(config, PARAM, kind, shape, stored, prefix="layer.")


class _TinyLayerModel:
    """Built lazily: a diffusers model with one child ``layer``, like the one the fixtures were made with."""

    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            from diffusers import ConfigMixin, ModelMixin
            from diffusers.configuration_utils import register_to_config

            class TinyLayerModel(ModelMixin, ConfigMixin):
                @register_to_config
                def __init__(self, class_name: str = "Linear", args: list | None = None, bias: bool = True):
                    super().__init__()
                    layer_cls = getattr(torch.nn, class_name)
                    self.layer = layer_cls(*args) if class_name == "Embedding" else layer_cls(*args, bias=bias)

            cls.cls = TinyLayerModel
        return cls.cls


@pytest.mark.parametrize("version,cid", [
    ("0.1.0", "conv2d-uint2"),           # convolutions promoted to uint4
    ("0.1.3", "matmul-int4"),            # packed weight stored transposed for the matmul
    ("0.1.5", "codes-float4_e2m1fn"),    # 0.1.3-0.1.5 reading of custom floats
    ("0.1.5", "matmul-int8-mm_fp8"),     # config lost the matmul dtype: the shapes decide (warning)
    ("0.1.6", "dtype-float3_e1m1fn"),    # one-exponent-bit floats without a zero
    ("0.1.8", "convT2d-uint4-g8-square"),  # ConvTranspose grouped along its input channels
    ("0.2.0", "convT2d-uint4-g8-square"),  # ... and along its output channels, strided
    ("0.1.9", "hadamard-g16-int8"),      # Sylvester Hadamard matrix
    ("0.2.1", "hadamard-g4-int8"),       # Hadamard applied as a linear layer
    ("0.2.4", "group-tensor-uint4"),     # group_size -2 read as per-row
    ("0.2.2", "codes-float6_e3m2fn"),    # IEEE subnormals
    ("0.2.8", "dq-uint4-scale_int6-zp_uint4"),  # double-quantized scale and zero point
])
def test_from_pretrained_loads_old_release_folders(tmp_path: Path, version: str, cid: str) -> None:
    """The same fixtures through diffusers' from_pretrained and our quantizer: a real folder per release."""
    import diffusers_sdnq  # noqa: F401  (registers the backend)

    case = _case(version, cid)
    prefix = f"{cid}/"
    stored = {f"layer.{k[len(prefix):]}": v for k, v in _tensors(case.version).items()
              if k.startswith(prefix) and k != prefix + "expected"} if not SURVEY else {
        f"layer.{k}": v for k, v in case.tensors()[0].items()}
    _, expected = case.tensors()
    model_cls = _TinyLayerModel.get()
    folder = tmp_path / "model"
    folder.mkdir()
    config = {"_class_name": "TinyLayerModel", "_diffusers_version": "0.36.0", "class_name": case.meta["class_name"],
              "args": case.meta["args"], "bias": "layer.bias" in stored, "quantization_config": case.config}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(stored, str(folder / "diffusion_pytorch_model.safetensors"))
    dtype = getattr(torch, case.meta["model_dtype"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = model_cls.from_pretrained(folder, torch_dtype=dtype)
    ours = model.layer.dequantize_weight(expected.dtype)
    assert _same(ours, expected, case), f"{case.version}/{cid}: {_describe(ours, expected)}"
    version_warnings = [w for w in seen if issubclass(w.category, SDNQFormatVersionWarning)]
    assert bool(version_warnings) == (cid == "matmul-int8-mm_fp8"), [str(w.message) for w in version_warnings]
