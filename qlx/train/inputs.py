"""Training inputs: records read from JSONL, their prompt ids (``qlx.data.pipeline.encode_record``: the recipe's
single-pass QA prompt in the chat template, context middle-truncated to the stage's limit) and, for SFT, the
reference answer ids.

Tokenisation is lazy and cached per record, so a large set of long contexts is only tokenised as batches draw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qlx.data.pipeline import StageLimits, encode_record
from qlx.data.records import Record, scan_jsonl
from qlx.data.tokenizer import Tokenizer


def load_records(paths: Sequence[str | Path], *, max_problems: int = 20) -> tuple[list[Record], list[Path]]:
    """All records of the JSONL files, and the folder of each one's file (where its context references point).

    Every line is validated (:func:`qlx.data.records.scan_jsonl`: field types, referenced files, UTF-8). A missing
    file raises FileNotFoundError; malformed lines raise one ValueError that counts them all and lists the first
    ``max_problems`` as ``file:line: field: problem``.
    """
    scan = scan_jsonl(paths, max_problems=max_problems)
    if scan.count:
        raise ValueError(scan.summary())
    return scan.records, scan.folders


def target_text(record: Record) -> str:
    """The reference response of SFT, in the form its task type's verifier scores highest: the option letter after
    "The correct answer is" (mc), the reference itself (dialogue: reproduced verbatim), else the reference after
    "Therefore, the answer is"."""
    if record.options:
        return f"The correct answer is ({record.answer})."
    if record.task_type == "dialogue":
        return record.answer
    return f"Therefore, the answer is {record.answer}."


class PromptBuilder:
    """Prompt ids of records (``encode_record`` with truncation) and SFT target ids.

    Args:
      tokenizer: the run's tokenizer.
      max_input_tokens: longest prompt (template included); longer contexts are middle-truncated.
      chat_mode: the generation prompt's thinking mode (``qlx.data.tokenizer.render_chat``).
    """

    def __init__(self, tokenizer: Tokenizer, *, max_input_tokens: int, chat_mode: str = "thinking"):
        self.tokenizer = tokenizer
        self.limits = StageLimits(max_input_tokens=max_input_tokens, overflow="truncate", mode=chat_mode)

    def prompt_ids(self, record: Record, folder: Path) -> list[int]:
        return encode_record(record, self.tokenizer, self.limits, folder)["input_ids"].tolist()

    def target_ids(self, record: Record) -> list[int]:
        """Reference response ids for SFT, ending with the end-of-turn token."""
        return self.tokenizer.encode(target_text(record)) + [self.tokenizer.eos_id]


class Dataset:
    """Records with lazily built, cached prompt (and target) ids and a task index per record.

    Args:
      records, folders: as returned by :func:`load_records`.
      builder: the PromptBuilder.
      task_types: task types in sampler order; every record's task type must be among them.
    """

    def __init__(self, records: list[Record], folders: list[Path], builder: PromptBuilder, task_types: Sequence[str]):
        self.records, self.folders, self.builder = records, folders, builder
        self.task_types = tuple(task_types)
        index = {t: i for i, t in enumerate(self.task_types)}
        missing = sorted({r.task_type for r in records} - set(index))
        if missing:
            raise ValueError(f"data.task_types {list(self.task_types)} lacks task types found in the data: {missing}")
        self.task_ids = [index[r.task_type] for r in records]
        self._prompts: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def prompt(self, i: int) -> list[int]:
        if i not in self._prompts:
            self._prompts[i] = self.builder.prompt_ids(self.records[i], self.folders[i])
        return self._prompts[i]

    def target(self, i: int) -> list[int]:
        return self.builder.target_ids(self.records[i])

    def subset(self, indices: Sequence[int]) -> Dataset:
        sub = Dataset(
            [self.records[i] for i in indices], [self.folders[i] for i in indices], self.builder, self.task_types
        )
        sub._prompts = {j: self._prompts[i] for j, i in enumerate(indices) if i in self._prompts}
        return sub
