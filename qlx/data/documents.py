"""Documents and the atomic facts and tables found in them, with character spans into the document text."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Fact:
    """``subject --relation--> object``, stated in ``doc_id`` at ``text[start:end]``, where ``object`` appears verbatim.

    ``qualifiers`` narrow a fact that is not functional on its own (a table cell: ``{"year": 2019, "segment": ...}``).
    """

    subject: str
    relation: str
    object: str
    doc_id: str
    start: int
    end: int
    qualifiers: tuple[tuple[str, str | int], ...] = ()


@dataclasses.dataclass
class Table:
    """A table of a document: header cells, rows of cell strings, and each cell's ``(start, end)`` in the document.

    ``context`` holds columns implied by the document rather than printed (an annual report's organisation and year).
    """

    header: list[str]
    rows: list[list[str]]
    cell_spans: list[list[tuple[int, int]]]
    context: dict[str, str | int] = dataclasses.field(default_factory=dict)
    unit: str = ""


@dataclasses.dataclass
class Document:
    doc_id: str
    title: str
    text: str
    kind: str = "text"
    facts: list[Fact] = dataclasses.field(default_factory=list)
    tables: list[Table] = dataclasses.field(default_factory=list)
    mentions: list[str] = dataclasses.field(default_factory=list)
    """entity names the document is about (for choosing confusable distractors)."""


class TextBuilder:
    """Appends text pieces, recording facts and table cells with their character spans."""

    def __init__(self, doc_id: str):
        self.doc_id = doc_id
        self.parts: list[str] = []
        self.pos = 0
        self.facts: list[Fact] = []

    def add(self, text: str, facts=()) -> tuple[int, int]:
        """Append ``text``; ``facts`` are ``(subject, relation, object[, qualifiers])`` whose object is in ``text``."""
        start = self.pos
        self.parts.append(text)
        self.pos += len(text)
        for fact in facts:
            subject, relation, obj = fact[:3]
            obj = str(obj)
            if obj not in text:
                raise ValueError(f"{self.doc_id}: object {obj!r} of {relation} is not in the sentence {text!r}")
            qualifiers = tuple(sorted(fact[3].items())) if len(fact) > 3 else ()
            self.facts.append(Fact(subject, relation, obj, self.doc_id, start, self.pos, qualifiers))
        return start, self.pos

    def add_table(self, header: list[str], rows: list[list[str]], context: dict, unit: str = "") -> Table:
        """Append a markdown table; returns it with the span of every cell."""
        self.add("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        spans = []
        for row in rows:
            row_spans, pos = [], self.pos + 2
            for cell in row:
                row_spans.append((pos, pos + len(cell)))
                pos += len(cell) + 3
            self.add("| " + " | ".join(row) + " |\n")
            spans.append(row_spans)
        return Table(list(header), [list(r) for r in rows], spans, dict(context), unit)

    def text(self) -> str:
        return "".join(self.parts)
