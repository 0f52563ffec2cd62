"""Loading records for training and evaluation: a grain pipeline that tokenizes with the chat template and the
recipe's single-pass QA prompt, fits a stage's input limit (drop, or LongBench-style middle truncation of the context),
and shards by JAX process.

An element is ``{"input_ids": int32[T], "id", "task_type", "answer", "answer_type", "options", "truncated",
"context_tokens"}``, ``T <= max_input_tokens``. The prompt is tokenized in three pieces — chat text before the context,
the context, chat text after it — which gives the same ids as tokenizing the whole prompt (see :mod:`qlx.data.prompts`).
Long contexts stored as files are never read whole when truncated: only enough of the head and the tail is read.
"""

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qlx.data.prompts import chat_pieces
from qlx.data.records import Record, RecordError, parse_record, read_context, utf8_error
from qlx.data.tokenizer import CHAT_MODES, Tokenizer

OVERFLOW = ("truncate", "drop")
_CHARS_PER_TOKEN_BOUND = 16


@dataclasses.dataclass(frozen=True)
class StageLimits:
    """A stage's input limit (the recipe: 20K/32K, 60K, 120K); ``overflow`` says what happens to longer prompts."""

    max_input_tokens: int
    overflow: str = "truncate"
    mode: str = "thinking"

    def __post_init__(self):
        if self.max_input_tokens < 16:
            raise ValueError(f"max_input_tokens must be >= 16, got {self.max_input_tokens}")
        if self.overflow not in OVERFLOW:
            raise ValueError(f"overflow {self.overflow!r} is not one of {OVERFLOW}")
        if self.mode not in CHAT_MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {CHAT_MODES}")


class JsonlRecords:
    """Random access to the records of JSONL files (line offsets indexed once). Item ``i`` is ``(record, folder,
    where)``: the line validated by :func:`~qlx.data.records.parse_record` when read (a malformed line raises a
    RecordError naming ``file:line`` and the field), the folder its context reference is relative to, ``file:line``."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [Path(p) for p in paths]
        self._index: list[tuple[int, int, int]] = []
        for i, path in enumerate(self.paths):
            with open(path, "rb") as f:
                offset = 0
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        self._index.append((i, offset, lineno))
                    offset += len(line)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> tuple[Record, Path, str]:
        file_index, offset, lineno = self._index[i]
        path = self.paths[file_index]
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.readline()
        where = f"{path}:{lineno}"
        return parse_record(raw, where=where, base_dir=path.parent), path.parent, where


class ArrayRecords:
    """Random access to the records of ArrayRecord files; items as :class:`JsonlRecords`' (``where`` is
    ``file[index]``)."""

    def __init__(self, paths: Sequence[str | Path]):
        import grain

        self.paths = [Path(p) for p in paths]
        self._sources = [grain.sources.ArrayRecordDataSource([str(p)]) for p in self.paths]
        self._starts = np.cumsum([0] + [len(source) for source in self._sources])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> tuple[Record, Path, str]:
        file_index = int(np.searchsorted(self._starts, i, side="right")) - 1
        path, local = self.paths[file_index], i - int(self._starts[file_index])
        where = f"{path}[{local}]"
        return parse_record(self._sources[file_index][local], where=where, base_dir=path.parent), path.parent, where


def records_source(paths: Sequence[str | Path]):
    """A random-access source over ``.jsonl`` or ``.array_record`` files (one kind per call); items are
    ``(record, folder, where)``."""
    suffixes = {Path(p).suffix for p in paths}
    if suffixes == {".jsonl"}:
        return JsonlRecords(paths)
    if suffixes == {".array_record"}:
        return ArrayRecords(paths)
    raise ValueError(f"record files must all be .jsonl or all .array_record, got {sorted(suffixes)}")


def _head_tail_ids(record: Record, base_dir: Path, tokenizer: Tokenizer, head: int, tail: int) -> list[int]:
    if record.context is not None:
        ids = tokenizer.encode(record.context)
        return ids[:head] + (ids[-tail:] if tail else [])
    path = base_dir / record.context_ref["path"]
    with open(path, encoding="utf-8", newline="") as f:
        head_ids = tokenizer.encode(f.read(head * _CHARS_PER_TOKEN_BOUND))[:head]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - tail * _CHARS_PER_TOKEN_BOUND * 4))
        tail_text = f.read().decode("utf-8", errors="ignore")
    tail_ids = tokenizer.encode(tail_text)[-tail:] if tail else []
    return head_ids + tail_ids


def encode_record(record: Record, tokenizer: Tokenizer, limits: StageLimits, base_dir: str | Path = ".") -> dict | None:
    """The model input of one record, or ``None`` when it is too long and ``limits.overflow == "drop"``."""
    before, after = chat_pieces(record.question, record.options, mode=limits.mode)
    before_ids, after_ids = tokenizer.encode(before), tokenizer.encode(after)
    budget = limits.max_input_tokens - len(before_ids) - len(after_ids)
    if budget < 2:
        raise ValueError(
            f"record {record.id}: the prompt without context already exceeds {limits.max_input_tokens} tokens"
        )
    truncated = record.length_tokens > budget
    if truncated and limits.overflow == "drop":
        return None
    if truncated:
        context_ids = _head_tail_ids(record, Path(base_dir), tokenizer, budget // 2, budget - budget // 2)
    else:
        context_ids = tokenizer.encode(read_context(record, base_dir))
        if len(context_ids) > budget:
            if limits.overflow == "drop":
                return None
            truncated = True
            context_ids = context_ids[: budget // 2] + context_ids[len(context_ids) - (budget - budget // 2) :]
    ids = np.asarray(before_ids + context_ids + after_ids, dtype=np.int32)
    return {
        "input_ids": ids,
        "id": record.id,
        "task_type": record.task_type,
        "answer": record.answer,
        "answer_type": record.answer_type,
        "options": record.options,
        "truncated": truncated,
        "context_tokens": len(context_ids),
    }


def make_dataset(
    paths: Sequence[str | Path],
    tokenizer: Tokenizer,
    limits: StageLimits,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
):
    """A ``grain.MapDataset`` of encoded records: this process's shard (``jax.process_index()`` of
    ``jax.process_count()`` unless given), shuffled with ``seed``, repeated ``num_epochs`` times (``None``: forever).
    Dropped records read as ``None`` by index and are skipped when iterating.

    Every record is validated when it is read (:func:`~qlx.data.records.parse_record`): a malformed one raises a
    RecordError naming ``file:line`` and the field, never skipped; :func:`~qlx.data.records.scan_jsonl` checks whole
    files up front. Context references are relative to each record's own file."""
    import grain

    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard_index} of {shard_count}: need 0 <= index < count")

    def encode(item: tuple[Record, Path, str]) -> dict | None:
        record, folder, where = item
        try:
            return encode_record(record, tokenizer, limits, folder)
        except UnicodeDecodeError:
            file = folder / record.context_ref["path"]
            raise RecordError(where, "context_ref", f"{file}: {utf8_error(file)}") from None
        except ValueError as e:  # the prompt without its context does not fit limits.max_input_tokens
            raise RecordError(where, None, str(e)) from None

    ds = grain.MapDataset.source(records_source(paths))[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.map(encode).filter(lambda element: element is not None)
