"""A user corpus: a folder of ``.txt`` / ``.md`` / ``.csv`` files and ``.jsonl`` files of ``{id, title, text}``, or one
``.jsonl`` file. Every line or file that cannot be used is reported as a :class:`CorpusProblem` (``file:line: why``)
and counted — never silently dropped."""

import dataclasses
import json
from pathlib import Path

from qlx.data.documents import Document

TEXT_SUFFIXES = (".txt", ".md", ".csv")


@dataclasses.dataclass(frozen=True)
class CorpusProblem:
    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line is not None else f"{self.path}: {self.message}"


@dataclasses.dataclass
class Corpus:
    documents: list[Document]
    problems: list[CorpusProblem]


def _title_of(text: str, fallback: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip() or fallback
    return fallback


def _jsonl_documents(path: Path, shown: str, problems: list[CorpusProblem]) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(CorpusProblem(shown, lineno, f"invalid JSON ({e.msg})"))
                continue
            if not isinstance(data, dict):
                problems.append(CorpusProblem(shown, lineno, f"expected a JSON object, got {type(data).__name__}"))
                continue
            bad = [k for k in ("id", "title", "text") if not isinstance(data.get(k), str)]
            if bad:
                problems.append(CorpusProblem(shown, lineno, f"keys {bad} missing or not strings"))
                continue
            if not data["text"].strip():
                problems.append(CorpusProblem(shown, lineno, f"document {data['id']!r} has empty text"))
                continue
            docs.append(Document(data["id"], data["title"], data["text"].strip()))
    return docs


def load_corpus(path: str | Path) -> Corpus:
    """Documents of a corpus folder or JSONL file, in sorted file order; problems listed, not raised."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: corpus path not found")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    docs: list[Document] = []
    problems: list[CorpusProblem] = []
    for file in files:
        shown = str(file)
        rel = file.name if root.is_file() else str(file.relative_to(root))
        if file.suffix == ".jsonl":
            docs += _jsonl_documents(file, shown, problems)
        elif file.suffix in TEXT_SUFFIXES:
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if not text:
                problems.append(CorpusProblem(shown, None, "empty file"))
                continue
            docs.append(Document(rel, _title_of(text, file.stem), text))
        else:
            problems.append(CorpusProblem(shown, None, f"unsupported file type {file.suffix!r}; skipped"))
    seen: set[str] = set()
    unique = []
    for doc in docs:
        if doc.doc_id in seen:
            problems.append(CorpusProblem(str(root), None, f"duplicate document id {doc.doc_id!r}; later copy skipped"))
            continue
        seen.add(doc.doc_id)
        unique.append(doc)
    return Corpus(unique, problems)
