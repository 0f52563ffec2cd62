"""The synthesised QA record, its task types, and reading/writing records as JSONL or ArrayRecord.

A record's ``context`` is inline text, or ``None`` with ``context_ref = {"path", "chars"}`` naming a UTF-8 file
(relative to the records file's folder) for contexts too long to keep inline.

``evidence`` is ``{"docs": [...], "facts": [...], "program": {...}}``:

- ``docs``: ``{doc_id, char_start, char_end, token_start, token_end}``: where each evidence document sits in the
  context;
- ``facts``: ``{subject, relation, object, doc_id, char_start, char_end, qualifiers}`` — atomic facts, spans in the
  context, ``object`` appearing verbatim (tables: as printed) inside ``context[char_start:char_end]``;
- ``program``: how the answer follows from the facts (see :mod:`qlx.data.derive`).
"""

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

TASK_TYPES = ("mc", "multihop", "reading", "dialogue", "numerical")
"""The recipe's five task types (§2.3), shared with the RL reward registry and the task-balanced sampler."""
ANSWER_TYPES = ("entity", "number", "year", "list", "option", "text")


@dataclasses.dataclass
class Record:
    id: str
    task_type: str
    question: str
    answer: str
    answer_type: str
    evidence: dict
    hops: int
    length_tokens: int
    source: dict
    options: list[str] | None = None
    context: str | None = None
    context_ref: dict | None = None

    def __post_init__(self):
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"record {self.id}: task_type {self.task_type!r} is not one of {TASK_TYPES}")
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"record {self.id}: answer_type {self.answer_type!r} is not one of {ANSWER_TYPES}")
        if (self.context is None) == (self.context_ref is None):
            raise ValueError(f"record {self.id}: exactly one of context and context_ref must be set")
        if self.options is not None and (len(self.options) != 4 or self.answer not in "ABCD" or not self.answer):
            raise ValueError(f"record {self.id}: options need 4 entries and an answer letter A-D, got {self.answer!r}")
        for key in ("docs", "facts", "program"):
            if key not in self.evidence:
                raise ValueError(f"record {self.id}: evidence lacks {key!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "record") -> "Record":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(data)
        if missing:
            raise ValueError(f"{where}: missing keys {sorted(missing)}")
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        return cls(**data)


def read_context(record: Record, base_dir: str | Path) -> str:
    """The record's full context text (reads the referenced file; use :func:`iter_context` for huge contexts)."""
    if record.context is not None:
        return record.context
    return "".join(iter_context(record, base_dir))


def iter_context(record: Record, base_dir: str | Path, *, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """The context in pieces of at most ``chunk_chars`` characters, never all in memory at once."""
    if record.context is not None:
        yield record.context
        return
    path = Path(base_dir) / record.context_ref["path"]
    with open(path, encoding="utf-8", newline="") as f:
        while piece := f.read(chunk_chars):
            yield piece


def context_spans(record: Record, base_dir: str | Path, spans: list[tuple[int, int]]) -> list[str]:
    """The context text at each character span ``(start, end)``, read in one streaming pass."""
    if record.context is not None:
        return [record.context[a:b] for a, b in spans]
    out = [""] * len(spans)
    pos = 0
    for piece in iter_context(record, base_dir):
        end = pos + len(piece)
        for i, (a, b) in enumerate(spans):
            if a < end and b > pos:
                out[i] += piece[max(a, pos) - pos : min(b, end) - pos]
        pos = end
    return out


def write_jsonl(records: Iterable[Record], path: str | Path) -> int:
    """Write records one JSON object per line; returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(record.to_json() + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[Record]:
    """Records of a JSONL file; a bad line raises an error naming ``file:line``."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            yield Record.from_dict(data, where=where)


def write_array_record(records: Iterable[Record], path: str | Path) -> int:
    """Write records as an ArrayRecord file (one JSON-encoded record per entry, random access for grain)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    n = 0
    try:
        for record in records:
            writer.write(record.to_json().encode("utf-8"))
            n += 1
    finally:
        writer.close()
    return n


def read_array_record(path: str | Path) -> Iterator[Record]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        for i in range(reader.num_records()):
            yield Record.from_dict(json.loads(reader.read([i])[0]), where=f"{path}[{i}]")
    finally:
        reader.close()
