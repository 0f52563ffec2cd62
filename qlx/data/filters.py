"""Filters over synthesised records (recipe §1.4): derivable from the evidence, knowledge grounding, contextual
robustness, deduplication, and pass@k difficulty bins with equal draws per bin.

Model-based filters take ``answer_fn(messages_list, k) -> list[list[str]]`` (k responses per prompt; chat messages in
OpenAI form) and ``is_correct(record, response) -> bool`` — e.g. the RL reward verifier of the record's task type.
Each filter returns ``(kept, dropped)``; nothing disappears without being returned.
"""

import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qlx.data.derive import DerivationError, check_spans, derive
from qlx.data.docstore import SEPARATOR
from qlx.data.llm import ChatClient
from qlx.data.prompts import MC_FORMAT, QA_FORMAT, user_prompt
from qlx.data.records import Record, context_spans, read_context

AnswerFn = Callable[[list[list[dict]], int], list[list[str]]]
IsCorrect = Callable[[Record, str], bool]


def derivable(records: Sequence[Record], base_dir: str | Path = ".") -> tuple[list[Record], list[tuple[Record, str]]]:
    """Records whose answer re-derives from their evidence facts (engines a and b, dialogue); LLM-verified records
    (engine c) pass, having no programmatic check. Dropped records come with the reason."""
    kept, dropped = [], []
    for record in records:
        facts = record.evidence["facts"]
        try:
            check_spans(facts, context_spans(record, base_dir, [(f["char_start"], f["char_end"]) for f in facts]))
            answer = derive(record.evidence["program"], facts, record.options)
            if answer is not None and answer != record.answer:
                raise DerivationError(f"evidence gives {answer!r}, the record says {record.answer!r}")
            kept.append(record)
        except DerivationError as e:
            dropped.append((record, str(e)))
    return kept, dropped


def closed_book_messages(record: Record) -> list[dict]:
    """The question without its context (for the knowledge-grounding check)."""
    body = record.question
    if record.options:
        body += "\n\n" + "\n".join(f"{letter}. {o}" for letter, o in zip("ABCD", record.options, strict=True))
    return [{"role": "user", "content": f"{body}\n\n{MC_FORMAT if record.options else QA_FORMAT}"}]


def knowledge_grounding(
    records: Sequence[Record], answer_fn: AnswerFn, is_correct: IsCorrect, *, k: int = 1
) -> tuple[list[Record], list[Record]]:
    """Drop records the model answers correctly without the documents (in any of ``k`` tries)."""
    responses = answer_fn([closed_book_messages(r) for r in records], k)
    kept, dropped = [], []
    for record, answers in zip(records, responses, strict=True):
        (dropped if any(is_correct(record, a) for a in answers) else kept).append(record)
    return kept, dropped


def add_distractors(context: str, distractors: Sequence[str], rng: random.Random) -> str:
    """``context`` with each distractor document inserted at a random document boundary."""
    pieces = [p for p in context.split(SEPARATOR) if p]
    for text in distractors:
        pieces.insert(rng.randint(0, len(pieces)), text.strip())
    return SEPARATOR.join(pieces) + SEPARATOR


def robustness(
    records: Sequence[Record],
    answer_fn: AnswerFn,
    is_correct: IsCorrect,
    distractors: Sequence[str],
    *,
    per_record: int = 3,
    k: int = 4,
    seed: int = 0,
    base_dir: str | Path = ".",
) -> tuple[list[Record], list[Record]]:
    """Keep records still answered (pass@k > 0) after ``per_record`` extra irrelevant documents join the context."""
    prompts = []
    for record in records:
        rng = random.Random(f"{seed}:{record.id}")
        context = add_distractors(read_context(record, base_dir), rng.sample(list(distractors), per_record), rng)
        prompts.append([{"role": "user", "content": user_prompt(record.question, context, record.options)}])
    kept, dropped = [], []
    for record, answers in zip(records, answer_fn(prompts, k), strict=True):
        (kept if any(is_correct(record, a) for a in answers) else dropped).append(record)
    return kept, dropped


def dedup(records: Sequence[Record]) -> tuple[list[Record], list[Record]]:
    """Keep the first record of each question (case, punctuation and spacing ignored)."""
    seen, kept, dropped = set(), [], []
    for record in records:
        key = re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", record.question.lower())).strip()
        (dropped if key in seen else kept).append(record)
        seen.add(key)
    return kept, dropped


def pass_rates(
    records: Sequence[Record], answer_fn: AnswerFn, is_correct: IsCorrect, *, k: int = 8, base_dir="."
) -> np.ndarray:
    """Fraction of ``k`` responses that are correct, per record (with the full context)."""
    prompts = [
        [{"role": "user", "content": user_prompt(r.question, read_context(r, base_dir), r.options)}] for r in records
    ]
    responses = answer_fn(prompts, k)
    return np.array(
        [np.mean([is_correct(r, a) for a in answers]) for r, answers in zip(records, responses, strict=True)]
    )


def difficulty_bins(
    records: Sequence[Record], rates: Sequence[float], *, n_bins: int = 4, per_bin: int | None = None, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Stratify by pass rate into ``n_bins`` equal-width bins of [0, 1] and draw ``per_bin`` records from every
    non-empty bin (default: the size of the smallest non-empty bin). Returns (drawn, not drawn)."""
    if len(records) != len(rates):
        raise ValueError(f"{len(records)} records but {len(rates)} pass rates")
    bins: dict[int, list[int]] = {}
    for i, rate in enumerate(rates):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"pass rate of record {records[i].id} is {rate}, outside [0, 1]")
        bins.setdefault(min(int(rate * n_bins), n_bins - 1), []).append(i)
    smallest = min((len(v) for v in bins.values()), default=0)
    per_bin = smallest if per_bin is None else per_bin
    if per_bin > smallest:
        sizes = {b: len(v) for b, v in sorted(bins.items())}
        raise ValueError(f"per_bin={per_bin} but the smallest non-empty bin holds {smallest} (bin sizes {sizes})")
    rng = random.Random(seed)
    chosen = {i for b in sorted(bins) for i in rng.sample(bins[b], per_bin)}
    drawn = [r for i, r in enumerate(records) if i in chosen]
    return drawn, [r for i, r in enumerate(records) if i not in chosen]


def llm_answer_fn(client: ChatClient, *, temperature: float = 0.7, max_tokens: int = 2048) -> AnswerFn:
    """An ``answer_fn`` backed by an OpenAI-compatible endpoint (one request per sample)."""

    def answer(prompts: list[list[dict]], k: int) -> list[list[str]]:
        return [
            [client.chat(messages, temperature=temperature, max_tokens=max_tokens, seed=j) for j in range(k)]
            for messages in prompts
        ]

    return answer
