"""The synthesised QA record, its task types, and reading/writing records as JSONL or ArrayRecord.

A record's ``context`` is inline text, or ``None`` with ``context_ref = {"path", "chars"}`` naming a UTF-8 file
(relative to the records file's folder) for contexts too long to keep inline.

``evidence`` is ``{"docs": [...], "facts": [...], "program": {...}}``:

- ``docs``: ``{doc_id, char_start, char_end, token_start, token_end}``: where each evidence document sits in the
  context;
- ``facts``: ``{subject, relation, object, doc_id, char_start, char_end, qualifiers}`` — atomic facts, spans in the
  context, ``object`` appearing verbatim (tables: as printed) inside ``context[char_start:char_end]``;
- ``program``: how the answer follows from the facts (see :mod:`qlx.data.derive`).

Validation (:func:`parse_record`, the one validator of ``read_jsonl``, ``make_dataset`` and ``qlx train``'s
preflight): a line must be UTF-8 and one JSON object whose fields all have their types (:data:`FIELD_TYPES`) and
allowed values, and a ``context_ref`` must name an existing, readable file; a :class:`RecordError` names
``file:line`` and the field. :func:`scan_jsonl` reads whole files and counts every malformed line instead of stopping
at the first, and checks that each referenced file is UTF-8 throughout.
"""

import codecs
import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
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
        problem = _value_problem({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if problem is not None:
            raise ValueError(f"record {self.id}: {problem[0]}: {problem[1]}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)


class RecordError(ValueError):
    """A malformed record; the message reads ``file:line: field: problem``."""

    def __init__(self, where: str, field: str | None, problem: str):
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")


FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "task_type": (str,),
    "question": (str,),
    "answer": (str,),
    "answer_type": (str,),
    "evidence": (dict,),
    "hops": (int,),
    "length_tokens": (int,),
    "source": (dict,),
    "options": (list, type(None)),
    "context": (str, type(None)),
    "context_ref": (dict, type(None)),
}
"""The JSON type(s) each record field must have (``bool`` never counts as ``int``; ``null`` only where listed)."""
_JSON_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    dict: "an object",
    list: "a list",
    type(None): "null",
}


def _type_name(value) -> str:
    return "null" if value is None else "true/false" if isinstance(value, bool) else _JSON_NAMES.get(type(value), "?")


def _type_problem(data: dict) -> tuple[str, str] | None:
    """(field, problem) of the first field whose JSON type is not in :data:`FIELD_TYPES`, else None."""
    for name, types in FIELD_TYPES.items():
        value = data.get(name)
        if name in data and (isinstance(value, bool) or not isinstance(value, types)):
            want = " or ".join(_JSON_NAMES[t] for t in types)
            return name, f"expected {want}, got {_type_name(value)} {json.dumps(value)[:60]}"
    return None


def _value_problem(data: dict) -> tuple[str, str] | None:
    """(field, problem) of the first field of a well-typed record with a value outside its rules, else None."""
    for name, allowed in (("task_type", TASK_TYPES), ("answer_type", ANSWER_TYPES)):
        if data[name] not in allowed:
            return name, f"{data[name]!r} is not one of {', '.join(allowed)}"
    for name in ("hops", "length_tokens"):
        if data[name] < 0:
            return name, f"must be >= 0, got {data[name]}"
    if not data["id"]:
        return "id", "must not be empty"
    options = data.get("options")
    if options is not None and not (len(options) == 4 and all(isinstance(o, str) for o in options)):
        return "options", "must be null or a list of 4 strings"
    if options is not None and data["answer"] not in ("A", "B", "C", "D"):
        return "answer", f"a record with options needs an answer letter A-D, got {data['answer']!r}"
    if (data.get("context") is None) == (data.get("context_ref") is None):
        return "context", "exactly one of context and context_ref must be set (the other null)"
    missing = [key for key in ("docs", "facts", "program") if key not in data["evidence"]]
    if missing:
        return "evidence", f"lacks {', '.join(missing)}"
    return None


def _check_context_ref(ref: dict, where: str, base_dir: Path) -> Path:
    path, chars = ref.get("path"), ref.get("chars")
    if not isinstance(path, str) or not path or isinstance(chars, bool) or not isinstance(chars, int) or chars < 0:
        raise RecordError(where, "context_ref", f'must be {{"path": string, "chars": integer >= 0}}, got {ref}')
    file = base_dir / path
    try:
        with open(file, "rb") as f:
            f.read(1)
    except OSError as e:
        raise RecordError(where, "context_ref", f"{file}: cannot be read ({e.strerror or e})") from None
    return file


def parse_record(raw: bytes | str, *, where: str, base_dir: str | Path | None = None) -> Record:
    """Validate one record line (bytes are decoded as UTF-8) and build the :class:`Record`.

    Raises :class:`RecordError` naming ``where`` (``file:line``) and the field: invalid UTF-8 (with the byte
    offset), invalid JSON, anything but an object (a ``null`` line), missing or unknown keys, a field of the wrong
    type (:data:`FIELD_TYPES`; ``"question": null`` is refused, not read as "None"), a task or answer type outside
    :data:`TASK_TYPES` / :data:`ANSWER_TYPES`, and, when ``base_dir`` is given, a ``context_ref`` whose file (relative
    to ``base_dir``) is missing or unreadable.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(where, None, f"invalid UTF-8 at byte {e.start} of the line ({e.reason})") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RecordError(where, None, f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise RecordError(where, None, "invalid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise RecordError(where, None, f"a record must be a JSON object, got {_type_name(data)}")
    names = {f.name for f in dataclasses.fields(Record)}
    required = {f.name for f in dataclasses.fields(Record) if f.default is dataclasses.MISSING}
    missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
    if missing:
        raise RecordError(where, None, f"missing keys {missing}")
    if unknown:
        raise RecordError(where, None, f"unknown keys {unknown}")
    problem = _type_problem(data) or _value_problem(data)
    if problem is not None:
        raise RecordError(where, *problem)
    if base_dir is not None and data.get("context_ref") is not None:
        _check_context_ref(data["context_ref"], where, Path(base_dir))
    return Record(**data)


def utf8_error(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str | None:
    """Where ``path`` stops being UTF-8 (``"invalid UTF-8 at byte N (reason)"``), or None; streamed in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return f"invalid UTF-8 at byte {offset - pending + e.start} ({e.reason})"
            if not chunk:
                return None
            offset += len(chunk)


@dataclasses.dataclass
class RecordScan:
    """What :func:`scan_jsonl` read: the good records, each one's folder, and every malformed line.

    problems: the first ``max_problems`` messages (``file:line: field: problem``); count: all malformed lines.
    lines: non-empty lines read.
    """

    records: list[Record]
    folders: list[Path]
    problems: list[str]
    count: int
    lines: int

    def summary(self, limit: int | None = None) -> str:
        """``"N of M records are malformed; the first K:"`` and one problem per line."""
        shown = self.problems[:limit]
        head = f"{self.count} of {self.lines} records are malformed"
        return (
            head
            + (f"; the first {len(shown)}:" if len(shown) < self.count else ":")
            + "".join(f"\n  {p}" for p in shown)
        )


def scan_jsonl(paths: Sequence[str | Path], *, max_problems: int = 20) -> RecordScan:
    """Read every record of the JSONL files with :func:`parse_record`, and check each referenced context file is
    UTF-8 throughout (each file once); malformed lines are counted and the first ``max_problems`` kept, none
    skipped silently. A missing records file raises FileNotFoundError."""
    records, folders, problems = [], [], []
    count = lines = 0
    checked: dict[Path, str | None] = {}

    def problem(message: str) -> None:
        nonlocal count
        count += 1
        if len(problems) < max_problems:
            problems.append(message)

    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                lines += 1
                where = f"{path}:{lineno}"
                try:
                    record = parse_record(line, where=where, base_dir=path.parent)
                except RecordError as e:
                    problem(str(e))
                    continue
                if record.context_ref is not None:
                    file = path.parent / record.context_ref["path"]
                    if file not in checked:
                        checked[file] = utf8_error(file)
                    if checked[file] is not None:
                        problem(str(RecordError(where, "context_ref", f"{file}: {checked[file]}")))
                        continue
                records.append(record)
                folders.append(path.parent)
    return RecordScan(records, folders, problems, count, lines)


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
    """Records of a JSONL file, validated by :func:`parse_record`; the first bad line raises a RecordError naming
    ``file:line`` and the field (use :func:`scan_jsonl` to count them all)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield parse_record(line, where=f"{path}:{lineno}", base_dir=Path(path).parent)


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
            yield parse_record(reader.read([i])[0], where=f"{path}[{i}]", base_dir=Path(path).parent)
    finally:
        reader.close()
