"""Training inputs: records read from JSONL, turned into chat-template prompt ids (middle-truncated to the stage's
limit) and, for SFT, answer ids.

The prompt is the recipe's single-pass QA template (docs/recipe.md section 1.5) as the user turn of the Qwen chat
template, followed by the generation prompt. Tokenisation is lazy and cached per record, so a 14K-record set of
120K-token contexts is only tokenised as batches draw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qlx.data.records import Record, read_context, read_jsonl
from qlx.data.tokenizer import Tokenizer, render_chat

PROMPT_HEAD = "Please read the following text and answer the question below.\n\n<text>\n"
PROMPT_TAIL = '\n</text>\n\n{question}{options}\n\nFormat your response as follows: "{answer_format}".'
ANSWER_FORMAT = "Therefore, the answer is (insert answer here)"
MC_ANSWER_FORMAT = "The correct answer is (insert answer letter here)"


def load_records(paths: Sequence[str | Path]) -> tuple[list[Record], list[Path]]:
    """All records of the JSONL files, and the folder of each one's file (where its context references point).

    A missing file or a malformed line raises an error naming it (``file:line``).
    """
    records, folders = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        for record in read_jsonl(path):
            records.append(record)
            folders.append(path.parent)
    return records, folders


def question_text(record: Record) -> tuple[str, str]:
    """(question, options block) as they appear in the prompt."""
    if not record.options:
        return record.question, ""
    letters = "ABCD"
    block = "\n" + "\n".join(f"({letters[i]}) {option}" for i, option in enumerate(record.options))
    return record.question, block


def target_text(record: Record) -> str:
    """The reference response of SFT: the answer in the format the prompt asks for (and the verifiers parse)."""
    if record.options:
        return f"The correct answer is ({record.answer})."
    return f"Therefore, the answer is {record.answer}."


def middle_truncate(ids: list[int], budget: int) -> list[int]:
    """Keep the first ceil(budget/2) and last floor(budget/2) ids when ``ids`` is longer than ``budget``."""
    if len(ids) <= budget:
        return ids
    head = (budget + 1) // 2
    return ids[:head] + ids[len(ids) - (budget - head) :] if budget > head else ids[:head]


class PromptBuilder:
    """Prompt ids of records: chat template around the recipe's QA prompt, context middle-truncated to fit.

    Args:
      tokenizer: the run's tokenizer.
      max_input_tokens: longest prompt (template included).
      chat_mode: the generation prompt's thinking mode (``qlx.data.tokenizer.render_chat``).
    """

    def __init__(self, tokenizer: Tokenizer, *, max_input_tokens: int, chat_mode: str = "thinking"):
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.chat_mode = chat_mode
        marker = "\x00CONTEXT\x00"
        text = render_chat([{"role": "user", "content": marker}], add_generation_prompt=True, mode=chat_mode)
        self._before, self._after = text.split(marker)

    def prompt_ids(self, record: Record, folder: Path) -> list[int]:
        question, options = question_text(record)
        answer_format = MC_ANSWER_FORMAT if record.options else ANSWER_FORMAT
        head = self.tokenizer.encode(self._before + PROMPT_HEAD)
        tail = self.tokenizer.encode(
            PROMPT_TAIL.format(question=question, options=options, answer_format=answer_format) + self._after
        )
        budget = self.max_input_tokens - len(head) - len(tail)
        if budget < 1:
            raise ValueError(
                f"record {record.id}: the question and template alone take {len(head) + len(tail)} tokens, more than "
                f"data.max_input_tokens={self.max_input_tokens}"
            )
        context = self.tokenizer.encode(read_context(record, folder))
        return head + middle_truncate(context, budget) + tail

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
