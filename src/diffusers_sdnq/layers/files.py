"""Reading files of a model folder, which may come from anyone: only regular files, bounded sizes, headers checked
the way safetensors checks them, and JSON whose problems become errors naming the file.

* A FIFO, device or socket named ``*.safetensors`` or ``config.json`` would block ``open()`` forever (or read
  forever): every file is ``stat``-ed first and opened with ``O_NONBLOCK``, then ``fstat``-ed again (it may have
  been swapped in between), and refused unless it is a regular file.
* A safetensors header is accepted only when safetensors itself would accept it (JSON object of entries with a
  known dtype, a shape of non-negative integers and two offsets; offsets covering the data section exactly, in
  order, without gap or overlap; ``__metadata__`` a string map; valid UTF-8 without lone surrogates), with
  bounds on its size and its number of entries, in time linear in its size.
* Deeply nested JSON gives an error naming the file instead of a ``RecursionError``.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from typing import Any

import torch

from ..format.errors import SDNQConfigError, SDNQFormatError

MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on the JSON header (``MAX_HEADER_SIZE``); real headers are well under 10 MB."""
MAX_HEADER_ENTRIES = 1_000_000
"""Most tensors accepted in one file. The largest real SDNQ checkpoints hold a few hundred thousand tensors in all
(a 235B mixture-of-experts model: ~36,000 linears × up to 5 tensors each, spread over many shards); a header of
more is a denial-of-service attempt (1.5 million empty tensors fit in 95 MB)."""
MAX_JSON_BYTES = 64 * 2**20
"""Largest ``config.json`` / index / ``quantization_config.json`` read (the biggest real indexes are ~10 MB)."""

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
"""safetensors dtype name → torch dtype, for every dtype an SDNQ checkpoint can hold."""
for _name, _torch_name in (("F8_E8M0", "float8_e8m0fnu"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                           ("F8_E5M2FNUZ", "float8_e5m2fnuz")):
    if hasattr(torch, _torch_name):
        ST_DTYPES[_name] = getattr(torch, _torch_name)
_ITEMSIZE = {name: dtype.itemsize for name, dtype in ST_DTYPES.items()}
_FOREIGN_DTYPES = ("F4", "F6_E2M3", "F6_E3M2", "C64")
"""Valid safetensors dtypes no SDNQ tensor uses (and torch cannot hold as is)."""

TensorMeta = tuple[tuple[int, ...], torch.dtype]
TensorRecord = tuple[tuple[int, ...], torch.dtype, int, int]
"""(shape, dtype, start, end): a header entry with its byte range in the data section."""


class NotRegularFileError(SDNQFormatError, OSError):
    """A path names a FIFO, device, socket or folder where a file was expected: it is never opened."""


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` names, for error messages ("a FIFO (named pipe)", "a folder", ...)."""
    for test, label in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return label
    return "not a regular file"


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for a regular file (or a symlink to one); never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str | os.PathLike):
    """Open ``path`` for reading in binary mode, refusing anything but a regular file without ever blocking.

    Raises :class:`NotRegularFileError` (an ``OSError`` and a ``ValueError``) naming the file and what it is."""
    path = os.fspath(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(f"{path} is {file_kind(mode)}, not a regular file; it is not read")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped for something else between stat and open
            raise NotRegularFileError(f"{path} is {file_kind(mode)}, not a regular file; it is not read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json_file(path: str | os.PathLike, what: str = "JSON file", *, error: type[ValueError] = SDNQConfigError
                   ) -> Any:
    """Parse a JSON file of a model folder: a regular file of at most :data:`MAX_JSON_BYTES`, UTF-8, not nested
    beyond what the parser can take. Every problem raises ``error`` naming the file."""
    path = os.fspath(path)
    try:
        with open_regular(path) as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
    except NotRegularFileError as exc:
        raise error(str(exc)) from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise error(f"{path}: the {what} is larger than {MAX_JSON_BYTES // 2**20} MiB; it is not read")
    return parse_json(raw, path, what, error=error)


def parse_json(raw: bytes | str, path: str, what: str = "JSON file", *, error: type[ValueError] = SDNQConfigError
               ) -> Any:
    """``json.loads`` with its failures (bad UTF-8, bad syntax, nesting too deep for the parser) as ``error``."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise error(f"{path}: cannot read the {what}: it is nested too deeply to parse (a damaged or crafted file)"
                    ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: cannot read the {what} ({exc}); re-download it") from None


# --------------------------------------------------------------------------------------------------------------------
# safetensors headers
# --------------------------------------------------------------------------------------------------------------------


def _parse_header(text: bytes, path: str, find_duplicates: bool = False) -> dict[str, Any]:
    """The header's JSON object. ``find_duplicates``: parse again, slower, to name a repeated tensor name (JSON
    allows one, keeping the last; a safetensors header must not have any)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            name = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise SDNQFormatError(f"{path}: corrupt safetensors header (tensor '{name}' appears twice); "
                                  "re-download the file")
        return out

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates) if find_duplicates else json.loads(text)
    except RecursionError:
        raise SDNQFormatError(f"{path}: corrupt safetensors header (JSON nested too deeply); re-download the file"
                              ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SDNQFormatError(f"{path}: corrupt safetensors header ({exc}); re-download the file") from None
    if not isinstance(header, dict):
        raise SDNQFormatError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, expected an "
                              "object); re-download the file")
    return header


def _nonnegative_ints(value: Any, length: int | None = None) -> bool:
    return isinstance(value, list) and (length is None or len(value) == length) and all(
        type(v) is int and 0 <= v < 2**64 for v in value)


def read_safetensors_records(path: str | os.PathLike) -> dict[str, TensorRecord]:
    """Every tensor's (shape, dtype, start, end) from a safetensors header, checked as safetensors checks it.

    Raises :class:`SDNQFormatError` naming the file (and the tensor) when the file is not a regular file, too
    short, its header too large, not valid JSON, or its entries break the format's rules."""
    path = os.fspath(path)
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(8)
        if len(raw) < 8:
            raise SDNQFormatError(f"{path}: file is {size} bytes, too short to be a safetensors file")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > size - 8:
            raise SDNQFormatError(f"{path}: safetensors header claims {hlen} bytes but the file has {size}; "
                                  "the file is truncated or not a safetensors file (re-download it)")
        if hlen > MAX_HEADER_BYTES:
            raise SDNQFormatError(f"{path}: safetensors header claims {hlen} bytes, more than the format allows "
                                  f"({MAX_HEADER_BYTES}); the file is damaged or not a safetensors file")
        text = fh.read(hlen)
    if len(text) != hlen:
        raise SDNQFormatError(f"{path}: the file shrank while its header was read; re-download it")
    markers = text.count(b'"data_offsets"')  # one per entry (more only if names contain it): a cheap count
    if markers > MAX_HEADER_ENTRIES:
        raise SDNQFormatError(f"{path}: safetensors header lists about {markers} tensors, more than diffusers-sdnq "
                              f"reads ({MAX_HEADER_ENTRIES}); the file is damaged or crafted")
    header = _parse_header(text, path)
    if len(header) > MAX_HEADER_ENTRIES + 1:  # names may escape their quotes: the count above is a hint only
        raise SDNQFormatError(f"{path}: safetensors header lists {len(header)} tensors, more than diffusers-sdnq "
                              f"reads ({MAX_HEADER_ENTRIES}); the file is damaged or crafted")
    if markers > len(header) - ("__metadata__" in header) or text.count(b'"__metadata__"') > 1:  # a name repeats?
        _parse_header(text, path, find_duplicates=True)
    if b"\\u" in text:  # only an escape can smuggle in a lone surrogate
        _check_unicode(header, path)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise SDNQFormatError(f"{path}: corrupt safetensors header ('__metadata__' must map strings to strings); "
                              "re-download the file")
    data_len = size - 8 - hlen
    out: dict[str, TensorRecord] = {}
    spans: list[tuple[int, int, str]] = []
    for key in list(header):
        info = header.pop(key)  # each entry is freed once read: peak memory stays near the parsed header's
        dtype_name = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(dtype_name, str) and _nonnegative_ints(shape) and _nonnegative_ints(offsets, 2)):
            shown = repr(info)
            raise SDNQFormatError(f"{path}: tensor '{key}' has an invalid header entry "
                                  f"{shown[:200] + '...' if len(shown) > 200 else shown}")
        if dtype_name not in ST_DTYPES:
            known = dtype_name in _FOREIGN_DTYPES
            raise SDNQFormatError(f"{path}: tensor '{key}' has dtype {dtype_name!r}, "
                                  + ("which no SDNQ checkpoint uses" if known else "which safetensors does not know")
                                  + f"; expected one of {', '.join(ST_DTYPES)}")
        start, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        if numel * _ITEMSIZE[dtype_name] >= 2**64:
            raise SDNQFormatError(f"{path}: tensor '{key}' has an impossible shape {shape}; the file is corrupt")
        if end > data_len or start > end:
            raise SDNQFormatError(f"{path}: tensor '{key}' ends at byte {end} of the data section but the file "
                                  f"holds only {data_len}; the file is truncated (re-download it)")
        if numel * _ITEMSIZE[dtype_name] != end - start:
            raise SDNQFormatError(f"{path}: tensor '{key}' is {dtype_name} {list(shape)} "
                                  f"({numel * _ITEMSIZE[dtype_name]} bytes) but its header gives it {end - start} "
                                  "bytes; the file is corrupt (re-download it)")
        out[key] = (tuple(shape), ST_DTYPES[dtype_name], start, end)
        spans.append((start, end, key))
    _check_coverage(spans, data_len, path)
    return out


def _check_unicode(header: dict[str, Any], path: str) -> None:
    """Names and metadata must be valid Unicode: JSON's ``\\ud800`` escape gives Python a lone surrogate, which
    safetensors (Rust strings) refuses."""
    meta = header.get("__metadata__")
    texts = [*header, *(meta.keys() if isinstance(meta, dict) else ()), *(
        v for v in (meta.values() if isinstance(meta, dict) else ()) if isinstance(v, str))]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise SDNQFormatError(f"{path}: corrupt safetensors header (the name {text!r} holds a lone UTF-16 "
                                  "surrogate, which safetensors refuses); re-download the file") from None


def _check_coverage(spans: list[tuple[int, int, str]], data_len: int, path: str) -> None:
    """The tensors' byte ranges tile the data section: in order, no gap, no overlap, nothing left over."""
    spans.sort()
    expected = 0
    for start, end, key in spans:
        if start != expected:
            what = "overlaps the tensor before it" if start < expected else f"leaves bytes {expected}-{start} unused"
            raise SDNQFormatError(f"{path}: tensor '{key}' starts at byte {start} of the data section and {what}; "
                                  "safetensors refuses such a file (re-download it)")
        expected = end
    if expected != data_len:
        raise SDNQFormatError(f"{path}: the tensors end at byte {expected} of the data section but the file holds "
                              f"{data_len}; the file is damaged (re-download it)")


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorMeta]:
    """Shapes and dtypes of every tensor in a safetensors file, from its header alone (no tensor is read).

    Raises :class:`SDNQFormatError` naming the file when the header is truncated, corrupt or refused by the
    safetensors format, or when a tensor's byte range does not fit the file (a truncated download)."""
    return {key: (shape, dtype) for key, (shape, dtype, _, _) in read_safetensors_records(path).items()}
