"""Minimal safetensors reader (memory-mapped, any dtype incl. bfloat16) and streaming writer.

The format: an 8-byte little-endian header length N, N bytes of JSON ({name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}), then the raw little-endian, row-major tensor bytes. No pickle anywhere.

Reading maps the file and returns numpy views, so a tensor (or a slice of it) is read from disk only when used and
bfloat16 works (the ``safetensors`` package's numpy backend has no bfloat16). Writing streams tensor by tensor from
producer callbacks, so a shard is never held in memory whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file is malformed or a tensor in it does not match what is expected."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: its file, safetensors dtype name, shape, and absolute byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, by name, with their dtype, shape and byte range checked."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise SafetensorsError(f"{path}: header length {header_len} exceeds the file size {size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON: {e}") from None
    base = 8 + header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype")
        if dtype not in DTYPES:
            raise SafetensorsError(
                f"{path}: tensor {name} has unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}"
            )
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected or base + end > size:
            raise SafetensorsError(
                f"{path}: tensor {name} ({dtype} {list(shape)}) has byte range [{begin}, {end}) but needs {expected} "
                f"bytes inside a data section of {size - base} bytes"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, base + begin, base + end)
    return infos


class Reader:
    """Memory-mapped access to tensors described by :class:`TensorInfo` entries (files are mapped once)."""

    def __init__(self):
        self._maps: dict[Path, np.memmap] = {}

    def get(self, info: TensorInfo) -> np.ndarray:
        """A read-only numpy view of the tensor (bytes are read from disk as they are touched)."""
        if info.file not in self._maps:
            self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        data = self._maps[info.file][info.start : info.end]
        return data.view(DTYPES[info.dtype]).reshape(info.shape)


@dataclasses.dataclass(frozen=True)
class TensorToWrite:
    """A tensor to write: name, numpy dtype, shape, and a callback producing the array when its turn comes."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def write_file(path: str | Path, tensors: Sequence[TensorToWrite], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to one safetensors file, producing and writing them one at a time."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_NAMES[np.dtype(t.dtype)],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            array = np.ascontiguousarray(t.produce())
            if array.shape != t.shape or array.dtype != np.dtype(t.dtype):
                raise SafetensorsError(
                    f"tensor {t.name}: produced {array.dtype} {list(array.shape)}, "
                    f"header says {t.dtype} {list(t.shape)}"
                )
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
