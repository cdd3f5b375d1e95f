"""Fuzzing: random bytes and random shapes into the unpacker, layout inference, header reader and decoder never
fail with anything but our documented errors (``SDNQFormatError`` and subclasses, all ``ValueError``).

Default size suits CI; set ``SDNQ_FUZZ_EXAMPLES=10000`` (or more) for a nightly-sized run.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusers_sdnq.format import (
    LAYOUTS,
    LayerOptions,
    SDNQFormatError,
    all_dtype_names,
    check_stored,
    decode_codes,
    dequantize,
    get_dtype,
    infer_stored,
    plan_layer,
    unpack,
)
from diffusers_sdnq.layers.replace import read_safetensors_header

EXAMPLES = int(os.environ.get("SDNQ_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
STORAGE = [torch.uint8, torch.int8, torch.int16, torch.float32, torch.float16, torch.bfloat16, torch.int64]
DTYPE_NAMES = sorted(all_dtype_names())


def _random_tensor(data: st.DataObject, max_numel: int = 512) -> torch.Tensor:
    ndim = data.draw(st.integers(0, 3))
    shape = tuple(data.draw(st.integers(0, 12)) for _ in range(ndim))
    numel = 1
    for s in shape:
        numel *= s
    if numel > max_numel:
        shape = (max_numel,)
        numel = max_numel
    dtype = data.draw(st.sampled_from(STORAGE))
    raw = data.draw(st.binary(min_size=numel * torch.empty((), dtype=dtype).element_size(),
                              max_size=numel * torch.empty((), dtype=dtype).element_size()))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if numel else \
        torch.empty(shape, dtype=dtype)


@FUZZ
@given(data=st.data(), bits=st.sampled_from(sorted(LAYOUTS)), numel=st.integers(-3, 300))
def test_unpack_random_input(data: st.DataObject, bits: int, numel: int) -> None:
    packed = _random_tensor(data)
    try:
        out = unpack(packed, bits, numel, name="fuzz.weight")
    except SDNQFormatError:
        return
    assert out.numel() == numel
    if numel:
        assert int(out.min()) >= 0 and int(out.max()) < 2**bits


@FUZZ
@given(data=st.data(), name=st.sampled_from(DTYPE_NAMES))
def test_decode_codes_random_input(data: st.DataObject, name: str) -> None:
    stored = _random_tensor(data)
    shape = tuple(data.draw(st.lists(st.integers(0, 16), max_size=3)))
    try:
        decode_codes(stored, get_dtype(name), shape, name="fuzz.weight")
    except SDNQFormatError:
        pass


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["linear", "conv", "conv_transpose", "embedding"]))
def test_infer_and_check_random_tensors(data: st.DataObject, kind: str) -> None:
    ndim = 2 if kind in ("linear", "embedding") else data.draw(st.integers(3, 5))
    shape = tuple(data.draw(st.integers(1, 40)) for _ in range(ndim))
    keys = data.draw(st.lists(st.sampled_from(["weight", "scale", "zero_point", "svd_up", "svd_down", "junk"]),
                              unique=True))
    tensors = {k: _random_tensor(data) for k in keys}
    try:
        facts = infer_stored(kind, shape, tensors)
    except SDNQFormatError:
        facts = None
    if facts is not None:
        facts.describe()
    opts = LayerOptions(weights_dtype=data.draw(st.sampled_from(DTYPE_NAMES)),
                        group_size=data.draw(st.sampled_from([-1, 0, 8, 16, 32])),
                        use_svd=data.draw(st.booleans()), svd_rank=4)
    try:
        layout = plan_layer(kind, shape, opts)
        layout = check_stored(layout, tensors, prefix="fuzz.")
        dequantize(layout, tensors)
    except SDNQFormatError:
        pass


@FUZZ
@given(data=st.binary(max_size=400), claim=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_header_reader_random_files(tmp_path_factory, data: bytes, claim: int | None) -> None:
    folder: Path = tmp_path_factory.mktemp("fuzz", numbered=True)
    path = folder / "x.safetensors"
    blob = (struct.pack("<Q", claim) + data) if claim is not None else data
    path.write_bytes(blob)
    try:
        read_safetensors_header(path)
    except SDNQFormatError as exc:
        assert str(path) in str(exc)


# ------------------------------------------------------------------------------------------------ name patterns

_PATTERN_TOKENS = ["a", "b", "1", ".", "*", "*", "_", "[ab]", "[^a]", "[a-b.]", "(", ")", "|", "?", "+", "{1,2}",
                   "{2}", "^", "$", "\\.", "\\d", "\\w"]


@FUZZ
@given(tokens=st.lists(st.sampled_from(_PATTERN_TOKENS), min_size=1, max_size=8),
       names=st.lists(st.text(alphabet="ab1._x", max_size=12), min_size=1, max_size=6))
def test_pattern_matcher_agrees_with_python_re(tokens: list[str], names: list[str]) -> None:
    """Our linear-time matcher against Python's re on the regex the format's rules build (short names keep re's
    backtracking cheap): the same verdict for every name, and a pattern re refuses is refused."""
    import re

    from diffusers_sdnq.format.patterns import PatternError, compile_wildcard, reference_regex

    pattern = "".join(tokens) + ("" if "*" in tokens else "*")
    try:
        regex = re.compile(reference_regex(pattern))
    except re.error:
        try:
            compile_wildcard(pattern)
        except PatternError:
            return
        raise AssertionError(f"{pattern!r} is invalid for re but was accepted") from None
    try:
        matcher = compile_wildcard(pattern)
    except PatternError as exc:
        assert "possessive" in str(exc), (pattern, exc)  # the one valid construct refused (not linear-time)
        return
    for name in names:
        assert matcher.match(name) == (regex.match(name) is not None), (pattern, name)


# ------------------------------------------------------------------------------------------------ safetensors headers

_DTYPES = ["U8", "F32", "BF16", "I8", "F8_E4M3", "F8_E4M3FNUZ", "BOOL", "u8", "F4", "X", 3]


@FUZZ
@given(data=st.data())
def test_header_reader_accepts_only_what_safetensors_accepts(tmp_path_factory, data: st.DataObject) -> None:
    """Random headers near the valid ones (offsets shuffled, shifted, duplicated names, odd dtypes, metadata,
    surrogates, trailing bytes): whatever our reader accepts, safetensors accepts too, with the same tensors;
    what it refuses raises our error naming the file."""
    import json as _json

    from safetensors import safe_open

    count = data.draw(st.integers(0, 5))
    entries, offset = [], 0
    for i in range(count):
        shape = data.draw(st.lists(st.integers(0, 3), max_size=2))
        dtype = data.draw(st.sampled_from(_DTYPES))
        size = 1
        for s in shape:
            size *= s
        size *= {"F32": 4, "BF16": 2}.get(dtype, 1) if isinstance(dtype, str) else 1
        start = offset + data.draw(st.sampled_from([0, 0, 0, 1, -1]))
        end = start + size + data.draw(st.sampled_from([0, 0, 0, 1]))
        offset = end
        name = data.draw(st.sampled_from([f"t{i}", f"t{i}", "t0", "\ud800", ""]))
        entries.append((name, {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}))
    text = "{" + ", ".join(_json.dumps(k) + ": " + _json.dumps(v) for k, v in entries)
    meta = data.draw(st.sampled_from([None, {"format": "pt"}, {"a": 1}, [], "x"]))
    if meta is not None:
        text += (", " if entries else "") + '"__metadata__": ' + _json.dumps(meta)
    text += "}" + data.draw(st.sampled_from(["", " ", "\n", "\0"]))
    raw = text.encode("utf-8", "surrogatepass")
    folder: Path = tmp_path_factory.mktemp("st", numbered=True)
    path = folder / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(max(offset, 0) + data.draw(st.sampled_from([0, 0, 2]))))
    try:
        ours = read_safetensors_header(path)
    except SDNQFormatError as exc:
        assert str(path) in str(exc)
        return
    with safe_open(str(path), "pt") as fh:
        theirs = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    assert {k: shape for k, (shape, _) in ours.items()} == theirs


# ------------------------------------------------------------------------------------------------ configs

_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
                                 st.text(max_size=6), st.sampled_from(["int8", "uint4", "mlp[*", "*attn*", "fp8"])),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                       max_leaves=8)
_FIELDS = ["weights_dtype", "group_size", "svd_rank", "use_svd", "hadamard_group_size", "use_hadamard",
           "modules_to_not_convert", "modules_dtype_dict", "modules_quant_config", "modules_to_not_use_matmul",
           "scale_dtype", "dynamic_loss_threshold", "sdnq_version", "minimum_allowed_numel", "quant_conv", "future"]


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=5))
def test_config_parsing_random_values(fields: dict) -> None:
    """Any JSON value in any field gives a config or SDNQConfigError (a ValueError) naming the source, never a
    TypeError, AttributeError or RecursionError; a config that parses resolves a layer's options."""
    import warnings

    from diffusers_sdnq.format.config import QuantConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = QuantConfig.from_dict({"weights_dtype": "int8", **fields}, source="fuzz.json")
        except SDNQFormatError as exc:
            assert "fuzz.json" in str(exc) or "weights_dtype" in str(exc) or "dtype" in str(exc), exc
            return
        config.is_skipped("blocks.0.attn.to_q.weight")
        try:
            config.options_for("blocks.0.attn.to_q.weight", "linear")
        except SDNQFormatError:
            pass  # e.g. a modules_quant_config override that is valid alone but not with the layer's other options
