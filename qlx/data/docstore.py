"""Documents on disk with their token counts: the pool contexts are assembled from, by counts, without re-tokenizing.

Each document is stored as ``text + SEPARATOR`` in one UTF-8 file and tokenized once (batched), so a context's length
in tokens is the sum of its pieces' counts. For byte-level BPEs with the Qwen/GPT pre-tokenizer this sum is exact: the
separator ends a pre-token and every document starts with a non-space character.
"""

import itertools
import mmap
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from qlx.data.tokenizer import Tokenizer

SEPARATOR = "\n\n"
BATCH = 1024


class DocStore:
    """Append documents with :meth:`add`, then :meth:`close` to read them (``piece``, ``text``, counts)."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer):
        self.path = Path(path)
        self.tokenizer = tokenizer
        self._writer = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.doc_ids: list[str] = []
        self.tags: list[tuple[str, ...]] = []
        self._index: dict[str, int] = {}
        self._offsets, self._bytes, self._chars, self._tokens = [], [], [], []
        self._pos = 0
        self._mmap = None
        self.added_tokens = 0
        """tokens added so far (also before :meth:`close`)."""

    def add(self, items: Iterable[tuple[str, str, Sequence[str]]]) -> None:
        """Append ``(doc_id, text, tags)`` items (tags: entity names or topic keys the document is about), tokenized
        in batches of ``BATCH`` documents."""
        items = iter(items)
        while batch := list(itertools.islice(items, BATCH)):
            self._add_batch(batch)

    def _add_batch(self, items: list[tuple[str, str, Sequence[str]]]) -> None:
        for doc_id, text, _ in items:
            if not text or text != text.strip():
                raise ValueError(f"document {doc_id!r}: text must be non-empty without surrounding whitespace")
        pieces = [text + SEPARATOR for _, text, _ in items]
        counts = self.tokenizer.count_batch(pieces)
        for (doc_id, _, tags), piece, count in zip(items, pieces, counts, strict=True):
            if doc_id in self._index:
                raise ValueError(f"duplicate document id {doc_id!r}")
            data = piece.encode("utf-8")
            self._writer.write(data)
            self._index[doc_id] = len(self.doc_ids)
            self.doc_ids.append(doc_id)
            self.tags.append(tuple(tags))
            self._offsets.append(self._pos)
            self._bytes.append(len(data))
            self._chars.append(len(piece))
            self._tokens.append(int(count))
            self._pos += len(data)
            self.added_tokens += int(count)

    def close(self) -> "DocStore":
        self._writer.close()
        self.offsets = np.asarray(self._offsets, dtype=np.int64)
        self.byte_lengths = np.asarray(self._bytes, dtype=np.int64)
        self.char_lengths = np.asarray(self._chars, dtype=np.int64)
        self.token_counts = np.asarray(self._tokens, dtype=np.int64)
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self._pos else b""
        return self

    def __len__(self) -> int:
        return len(self.doc_ids)

    def index(self, doc_id: str) -> int:
        try:
            return self._index[doc_id]
        except KeyError:
            raise KeyError(f"document {doc_id!r} is not in the store") from None

    def tokens(self, doc_id: str) -> int:
        """Token count of the stored piece (document + separator)."""
        return int(self.token_counts[self.index(doc_id)])

    def piece(self, i: int) -> bytes:
        """UTF-8 bytes of document ``i`` followed by the separator."""
        start = int(self.offsets[i])
        return self._mmap[start : start + int(self.byte_lengths[i])]

    def text(self, i: int) -> str:
        return self.piece(i).decode("utf-8")[: -len(SEPARATOR)]

    @property
    def total_tokens(self) -> int:
        return int(self.token_counts.sum())
