"""What an engine proposes: a question, its answer, the facts it follows from, and the documents holding them."""

import dataclasses
import re

from qlx.data.assemble import InlinePiece
from qlx.data.documents import Fact


@dataclasses.dataclass
class Candidate:
    """A question before context assembly. ``facts`` have spans relative to their own documents; ``evidence`` lists
    the documents (store ids or inline pieces) in the order they must appear; ``program`` derives the answer from
    ``facts`` (see :mod:`qlx.data.derive`)."""

    task_type: str
    question: str
    answer: str
    answer_type: str
    hops: int
    facts: list[Fact]
    program: dict
    evidence: list[str | InlinePiece]
    paradigm: str
    options: list[str] | None = None

    def key(self) -> str:
        """Deduplication key: the question with case, punctuation and spacing normalised."""
        return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", self.question.lower())).strip()


def format_number(value: float, decimals: int | None = None) -> str:
    """Integers without a decimal point; ``decimals`` fixes the digits after the point (``f"{value:.{decimals}f}"``)."""
    if decimals is not None:
        return f"{value:.{decimals}f}"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def ordered_docs(facts: list[Fact]) -> list[str]:
    """The distinct documents of ``facts`` in first-use order."""
    return list(dict.fromkeys(f.doc_id for f in facts))
