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


MAX_HEADER_BYTES = 100_000_000
"""The largest header accepted (the ``safetensors`` library's own limit)."""


def _pairs_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise SafetensorsError(f"key {duplicate!r} appears twice")
    return dict(pairs)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, entry) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry; SafetensorsError naming the file and tensor otherwise."""
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{where}: entry must be an object with dtype, shape and data_offsets")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise SafetensorsError(f"{where}: entry lacks {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{where}: unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise SafetensorsError(f"{where}: data_offsets must be two integers [begin, end], got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] need 0 <= begin <= end")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise SafetensorsError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but {dtype} {shape} needs {expected}"
        )
    return dtype, tuple(shape), begin, end


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, by name, validated before any tensor byte is read.

    The checks are the ``safetensors`` library's: a header length within the file (and at most
    :data:`MAX_HEADER_BYTES`); a header that is one JSON object without repeated keys; ``__metadata__`` (optional)
    an object of strings; every other entry an object with a known ``dtype``, a ``shape`` of non-negative integers
    and ``data_offsets`` ``[begin, end]`` with ``0 <= begin <= end`` and ``end - begin == itemsize × prod(shape)``;
    and the entries, sorted by ``begin``, tile the data section exactly (no overlap, no gap, nothing past its end).
    Anything else raises :class:`SafetensorsError` naming the file and, where one is at fault, the tensor.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise SafetensorsError(
                f"{path}: header length {header_len} exceeds the file size {size} or the {MAX_HEADER_BYTES}-byte limit"
            )
        try:
            header = json.loads(f.read(header_len), object_pairs_hook=_pairs_without_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON: {e}") from None
        except SafetensorsError as e:
            raise SafetensorsError(f"{path}: header: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object of tensors, got {type(header).__name__}")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise SafetensorsError(f"{path}: __metadata__ must be an object of strings")
    base = 8 + header_len
    data_size = size - base
    entries = {name: _entry(path, name, entry) for name, entry in header.items() if name != "__metadata__"}
    covered, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != covered:
            what = f"overlaps tensor {previous}" if begin < covered else f"leaves a gap of {begin - covered} bytes"
            raise SafetensorsError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] {what}")
        covered, previous = end, name
    if covered != data_size:
        culprit = f"tensor {previous} ends at {covered}" if previous else "no tensors"
        raise SafetensorsError(f"{path}: {culprit}, but the data section holds {data_size} bytes")
    return {
        name: TensorInfo(name, path, dtype, shape, base + begin, base + end)
        for name, (dtype, shape, begin, end) in entries.items()
    }


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
