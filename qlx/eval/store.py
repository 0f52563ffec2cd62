"""The crash-safe generation store: one JSONL line per (benchmark, item, sample, seed), appended, flushed and fsynced
as each generation arrives, so a killed run loses at most the generations in flight and a rerun skips what is done.

A torn last line (the process died inside a write) is cut off on open, with a warning; no complete line is ever
rewritten. Derived files (scores, reports) are written whole, atomically (temp file + rename).
"""

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def row_key(benchmark, item_id, sample, seed):
    return f"{benchmark}|{item_id}|{sample}|{seed}"


def read_rows(path):
    """The complete JSON lines of ``path`` (none if missing); a malformed complete line raises naming file:line."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # a torn tail; GenerationStore cuts it off
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
    return rows


class GenerationStore:
    """``generations.jsonl``: ``done`` maps each row key to its row; :meth:`append` adds one (thread-safe)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self.done = {row["key"]: row for row in read_rows(self.path)}
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")

    def _repair(self):
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            log.warning(
                "%s: cutting a torn last line (%d bytes) left by an interrupted write", self.path, len(data) - keep
            )
            f.truncate(keep)

    def append(self, row):
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.done[row["key"]] = row

    def close(self):
        self._file.close()


def write_atomic(path, text):
    """Write ``text`` to ``path`` via a temporary file and a rename (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
