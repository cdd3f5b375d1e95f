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
