"""Low-level safetensors access for the CLI: header entries with byte ranges, and a streaming writer.

The writer exists so ``dequantize`` never holds more than one dense layer in memory: a safetensors header only
needs each tensor's dtype and shape, which the layouts give before any weight is decoded, so the header is
written first and the tensors are appended one at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..format.errors import SDNQFormatError
from ..layers.files import ST_DTYPES, read_safetensors_records

_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor's header record: dtype, shape and its byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes the dtype and shape call for (compare with ``end - start`` to catch an edited header)."""
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def st_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` → ``BF16``)."""
    try:
        return _ST_NAMES[dtype]
    except KeyError:
        raise SDNQFormatError(f"safetensors cannot store dtype {dtype}") from None


def read_header_entries(path: str | os.PathLike) -> dict[str, HeaderEntry]:
    """Every tensor's header record, checked as safetensors checks it (a clear error naming the file otherwise)."""
    return {key: HeaderEntry(dtype, shape, start, end)
            for key, (shape, dtype, start, end) in read_safetensors_records(path).items()}


class StreamingSafetensorsWriter:
    """Write a safetensors file whose tensor list is known up front, one tensor at a time, in that order.

    Use as a context manager; leaving the block with an exception deletes the file, and leaving it before every
    tensor was written is an error, so a half-written file never survives.
    """

    def __init__(self, path: str | os.PathLike, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._order = [key for key, _, _ in entries]
        if len(set(self._order)) != len(self._order):
            raise SDNQFormatError(f"{self.path}: a tensor name appears twice in the list to write")
        self._specs = {key: (dtype, tuple(shape)) for key, dtype, shape in entries}
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for key, dtype, shape in entries:
            size = math.prod(shape) * _itemsize(dtype)
            header[key] = {"dtype": st_dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        self.total_bytes = offset
        self._fh = open(self.path, "wb")  # noqa: SIM115 - closed in close()/__exit__
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the one the header announced next, with that dtype and shape."""
        if self._next >= len(self._order) or self._order[self._next] != key:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise SDNQFormatError(f"{self.path}: writing '{key}' but the header expects {expected!r} next")
        dtype, shape = self._specs[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise SDNQFormatError(f"{self.path}: '{key}' is {tensor.dtype} {list(tensor.shape)}, the header "
                                  f"announced {dtype} {list(shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.close()
        if self._next != len(self._order):
            self.path.unlink(missing_ok=True)
            raise SDNQFormatError(f"{self.path}: only {self._next} of {len(self._order)} tensors were written")

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._fh.close()
            self.path.unlink(missing_ok=True)
            return
        self.close()
