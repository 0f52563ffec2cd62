"""Benchmark items and the readers of the released file formats (JSON array, JSONL, TSV, parquet).

Every reader yields ``(where, record_or_error)`` with ``where`` = "file:line" (parquet: "file:row N"), so a loader
reports each malformed record with its place and counts it; nothing is dropped silently.
"""

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Item:
    """One benchmark question. benchmark: its module name; id: unique within the benchmark; record: the released
    record as read (plus derived keys a loader documents); split: labels the report groups by (e.g. {"difficulty":
    "easy", "length": "short"}); where: "file:line" of the record."""

    benchmark: str
    id: str
    record: dict
    split: dict
    where: str = ""


@dataclasses.dataclass
class Loaded:
    """A loader's result: the items, one "file:line: problem" string per malformed record, the files read, and
    notes (facts about the data that are not errors)."""

    items: list
    problems: list
    files: list
    notes: list = dataclasses.field(default_factory=list)

    def add(self, other: "Loaded") -> None:
        self.items += other.items
        self.problems += other.problems
        self.files += other.files
        self.notes += other.notes


class RecordError(ValueError):
    """A record that does not have the released format; the message names the key."""


def require(record, fields):
    """Check that ``record`` is an object with each of ``fields`` ({key: type or tuple of types}); raises
    :class:`RecordError` naming the first missing or mistyped key."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    for key, types in fields.items():
        if key not in record:
            raise RecordError(f"missing key {key!r}")
        if not isinstance(record[key], types) or (isinstance(record[key], bool) and bool not in _tuple(types)):
            names = "/".join(t.__name__ for t in _tuple(types))
            raise RecordError(f"key {key!r} must be {names}, got {type(record[key]).__name__}")


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


def read_jsonl(path) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except ValueError as e:
                yield f"{path}:{n}", RecordError(f"not JSON ({e})")


def read_json_array(path) -> Iterator[tuple[str, object]]:
    """The elements of a top-level JSON array, each with the line it starts on."""
    text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    i = _skip(text, 0)
    if i >= len(text) or text[i] != "[":
        yield f"{path}:{text.count(chr(10), 0, i) + 1}", RecordError("the file must hold a JSON array of records")
        return
    i = _skip(text, i + 1)
    while i < len(text) and text[i] != "]":
        line = text.count("\n", 0, i) + 1
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError as e:
            yield f"{path}:{line}", RecordError(f"not JSON ({e}); the rest of the file is unreadable")
            return
        yield f"{path}:{line}", value
        i = _skip(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip(text, i + 1)


def _skip(text, i):
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def read_json_records(path) -> Iterator[tuple[str, object]]:
    """A ``.jsonl`` file line by line, or a ``.json`` file holding an array (or one JSON object per line)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    head = path.read_text(encoding="utf-8")[:4096].lstrip()
    return read_json_array(path) if head.startswith("[") else read_jsonl(path)


def read_tsv(path) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                yield f"{path}:{reader.line_num}", RecordError(f"row has {len(row)} fields, header has different")
            else:
                yield f"{path}:{reader.line_num}", row


def read_parquet(path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RecordError(
            f"{path}: reading parquet needs pyarrow (pip install 'qlx[eval]'), or convert the file to JSONL"
        ) from None
    for n, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}:row {n}", row


def load_records(paths, benchmark, make_item) -> Loaded:
    """Items from ``paths`` through ``make_item(record, path) -> Item`` (raising :class:`RecordError` on a bad
    record); duplicate ids are problems too."""
    loaded = Loaded([], [], [str(p) for p in paths])
    seen = {}
    for path in paths:
        path = Path(path)
        reader = {".tsv": read_tsv, ".parquet": read_parquet}.get(path.suffix, read_json_records)
        for where, record in reader(path):
            try:
                if isinstance(record, Exception):
                    raise record
                item = make_item(record, path)
            except RecordError as e:
                loaded.problems.append(f"{where}: {e}")
                continue
            if item.id in seen:
                loaded.problems.append(f"{where}: duplicate id {item.id!r} (first at {seen[item.id]})")
                continue
            seen[item.id] = where
            loaded.items.append(dataclasses.replace(item, benchmark=benchmark, where=where))
    return loaded


def find_files(root, patterns, what):
    """Files under ``root`` (a file or folder) matching any glob of ``patterns``, sorted; a clear error if none."""
    root = Path(root)
    if root.is_file():
        return [root]
    found = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    if not found:
        raise FileNotFoundError(f"{root}: no {what} file (looked for {', '.join(patterns)})")
    return found
