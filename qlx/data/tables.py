"""Tables: parse markdown and CSV tables out of documents, and gather them into one SQL store (sqlite3).

Tables whose headers match (after normalisation) across documents are unioned into one SQL table — the
"unified cross-document corpus table" — with the columns ``doc_id``, ``doc_title``, the columns the document implies
(``Table.context``, e.g. an annual report's ``org`` and ``year``), the printed columns, and ``_spans`` (JSON: column ->
``[start, end]`` of the cell in its document) and ``_cells`` (JSON: column -> the cell as printed). A
:class:`TableView` names the roles of the columns for query templates.
"""

import csv
import dataclasses
import io
import json
import re
import sqlite3
from collections.abc import Iterable

from qlx.data.documents import Document, Table

_SEPARATOR_ROW = re.compile(r"\|?\s*+:?-{3,}+:?\s*+(?:\|\s*+:?-{3,}+:?\s*+)*+\|?")  # fullmatch on a stripped line
_NUMBER = re.compile(r"^\(?[-+]?[$€£]?\d[\d,]*(\.\d+)?\)?%?$")


def parse_number(cell: str) -> float | int | None:
    """``"12,345"`` -> 12345, ``"(1,200)"`` -> -1200, ``"3.5%"`` -> 3.5; ``None`` when the cell is not a number."""
    text = cell.strip().replace(" ", "")
    if not text or not _NUMBER.match(text):
        return None
    negative = text.startswith("(") and text.endswith(")")
    digits = re.sub(r"[()$€£%,+]", "", text)
    value = float(digits) if "." in digits else int(digits)
    return -value if negative else value


def normalise_column(name: str) -> str:
    """``"Operating expenses"`` -> ``"operating_expenses"``; a valid SQL identifier."""
    ident = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_") or "column"
    return ident if not ident[0].isdigit() else f"c_{ident}"


def _row_cells(line: str, line_start: int) -> tuple[list[str], list[tuple[int, int]]]:
    body_start = line_start + (line.index("|") + 1 if line.lstrip().startswith("|") else 0)
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") else body
    cells, spans, pos = [], [], body_start
    for raw in body.split("|"):
        stripped = raw.strip()
        offset = raw.index(stripped) if stripped else 0
        cells.append(stripped)
        spans.append((pos + offset, pos + offset + len(stripped)))
        pos += len(raw) + 1
    return cells, spans


def parse_markdown_tables(text: str) -> list[Table]:
    """Every pipe table (header line, ``|---|`` separator line, rows) in ``text``, with each cell's span."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    tables, i = [], 0
    while i + 1 < len(lines):
        if "|" in lines[i] and _SEPARATOR_ROW.fullmatch(lines[i + 1].strip()):
            header, _ = _row_cells(lines[i].rstrip("\r\n"), starts[i])
            rows, spans = [], []
            j = i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                cells, cell_spans = _row_cells(lines[j].rstrip("\r\n"), starts[j])
                if len(cells) == len(header):
                    rows.append(cells)
                    spans.append(cell_spans)
                j += 1
            if rows:
                tables.append(Table(header, rows, spans))
            i = j
        else:
            i += 1
    return tables


def parse_csv_table(text: str, offset: int = 0) -> Table | None:
    """A CSV block (first line the header) with each cell's span (``offset`` added); ``None`` if not a table."""
    lines = text.splitlines(keepends=True)
    rows, spans, pos = [], [], offset
    for line in lines:
        parsed = next(csv.reader(io.StringIO(line)), [])
        cursor, cell_spans = 0, []
        for cell in parsed:
            found = line.find(cell, cursor) if cell else cursor
            cell_spans.append((pos + found, pos + found + len(cell)))
            cursor = found + len(cell)
        if parsed:
            rows.append([c.strip() for c in parsed])
            spans.append(cell_spans)
        pos += len(line)
    if len(rows) < 2 or len(rows[0]) < 2 or any(len(r) != len(rows[0]) for r in rows):
        return None
    return Table(rows[0], rows[1:], spans[1:])


def parse_document_tables(doc: Document) -> list[Table]:
    """Markdown tables, fenced ```` ```csv ```` blocks, and the whole text of a ``.csv`` document."""
    tables = parse_markdown_tables(doc.text)
    for match in re.finditer(r"```csv\n(.*?)```", doc.text, flags=re.S):
        table = parse_csv_table(match.group(1), match.start(1))
        if table is not None:
            tables.append(table)
    if doc.doc_id.lower().endswith(".csv"):
        table = parse_csv_table(doc.text)
        if table is not None:
            tables.append(table)
    return tables


@dataclasses.dataclass(frozen=True)
class TableView:
    """Roles of a unified table's columns: whose figures (``entity``), when (``period``, optional), which part
    (``dimension``, optional), and the numeric ``measures`` (column -> printed label)."""

    name: str
    entity: str
    period: str | None
    dimension: str | None
    measures: dict[str, str]
    unit: str = ""


class SqlStore:
    """One sqlite3 database holding every unified table, and the :class:`TableView` of each."""

    def __init__(self):
        self.conn = sqlite3.connect(":memory:")
        self.views: list[TableView] = []
        self.skipped: list[str] = []
        """tables left out, with the reason."""

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        return self.conn.execute(sql, tuple(params)).fetchall()

    @classmethod
    def from_documents(cls, docs: Iterable[Document]) -> "SqlStore":
        """Union the tables of ``docs`` (their ``tables``, or parsed from the text when empty) by header."""
        groups: dict[tuple, list[tuple[Document, Table]]] = {}
        for doc in docs:
            for table in doc.tables or parse_document_tables(doc):
                key = (tuple(sorted(table.context)), tuple(normalise_column(h) for h in table.header))
                groups.setdefault(key, []).append((doc, table))
        store = cls()
        reserved = {"doc_id", "doc_title", "_spans", "_cells"}
        for (context_cols, columns), members in groups.items():
            if len(set(columns)) != len(columns) or set(columns) & (reserved | set(context_cols)):
                ids = ", ".join(sorted({d.doc_id for d, _ in members}))
                store.skipped.append(f"table with columns {list(columns)} in {ids}: repeated or reserved column names")
                continue
            store._add_group(context_cols, columns, members)
        return store

    def _add_group(self, context_cols, columns, members) -> None:
        parsed = [[[parse_number(c) for c in row] for row in t.rows] for _, t in members]
        numeric = [all(r[i] is not None for rows in parsed for r in rows) for i in range(len(columns))]
        integral = [
            is_num and all(isinstance(r[i], int) for rows in parsed for r in rows) for i, is_num in enumerate(numeric)
        ]
        name = "t_" + "_".join(columns)[:60]
        types = [
            "INTEGER" if is_int else "REAL" if is_num else "TEXT"
            for is_num, is_int in zip(numeric, integral, strict=True)
        ]
        context_types = [
            "INTEGER" if all(isinstance(t.context[c], int) for _, t in members) else "TEXT" for c in context_cols
        ]
        defs = ["doc_id TEXT", "doc_title TEXT", "_spans TEXT", "_cells TEXT"]
        defs += [f"{c} {ty}" for c, ty in zip(context_cols, context_types, strict=True)]
        defs += [f"{c} {ty}" for c, ty in zip(columns, types, strict=True)]
        self.conn.execute(f"CREATE TABLE {name} ({', '.join(defs)})")
        marks = ", ".join("?" * (4 + len(context_cols) + len(columns)))
        values = []
        for (doc, table), rows in zip(members, parsed, strict=True):
            for row, numbers, spans in zip(table.rows, rows, table.cell_spans, strict=True):
                cells = [n if is_num else c for c, n, is_num in zip(row, numbers, numeric, strict=True)]
                span_json = json.dumps(dict(zip(columns, spans, strict=True)))
                cell_json = json.dumps(dict(zip(columns, row, strict=True)))
                context = [table.context[c] for c in context_cols]
                values.append([doc.doc_id, doc.title, span_json, cell_json, *context, *cells])
        self.conn.executemany(f"INSERT INTO {name} VALUES ({marks})", values)
        header = members[0][1].header
        measures = {c: h for c, h, is_num in zip(columns, header, numeric, strict=True) if is_num}
        period = next((c for c in context_cols if c == "year"), None)
        if period is None and "year" in measures:
            period = "year"
            measures.pop("year")
        text_cols = [c for c, is_num in zip(columns, numeric, strict=True) if not is_num]
        entity = next((c for c in context_cols if c != period), "doc_title")
        if measures:
            dimension = text_cols[0] if text_cols else None
            self.views.append(TableView(name, entity, period, dimension, measures, members[0][1].unit))
