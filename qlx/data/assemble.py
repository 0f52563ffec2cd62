"""Context assembly: evidence documents plus distractors, to a target length in tokens, streamed to a byte sink.

Lengths come from the store's cached token counts: distractors are taken in random order (confusable ones — documents
about near-duplicate entities — first) while they fit, smaller ones top up the remainder, and a word-boundary prefix of
one more document fills the last gap, so the context lands within a few tokens of the target. Evidence keeps the order
it is given in, at random positions among the distractors. Only the documents' bytes pass through memory, one at a time.
"""

import dataclasses
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import numpy as np

from qlx.data.docstore import SEPARATOR, DocStore

MIN_FILL_TOKENS = 4


class ContextTooSmall(ValueError):
    """The evidence alone is longer than the target length."""


@dataclasses.dataclass(frozen=True)
class InlinePiece:
    """An evidence document that is not in the store (a dialogue needle, say); ``text`` without separator."""

    doc_id: str
    text: str


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an evidence document sits in the context: characters ``[char_start, char_end)`` (separator excluded)
    and tokens ``[token_start, token_end)`` (separator included)."""

    doc_id: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int


@dataclasses.dataclass(frozen=True)
class Assembly:
    placements: list[Placement]
    length_tokens: int
    length_chars: int
    n_pieces: int


def _fill_prefix(store: DocStore, i: int, max_tokens: int) -> tuple[str, int] | None:
    """The longest word-boundary prefix of document ``i`` whose piece has at most ``max_tokens`` tokens."""
    text = store.text(i)
    cuts = [j for j, ch in enumerate(text) if ch == " "]
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        piece = text[: cuts[mid]].rstrip() + SEPARATOR
        count = int(store.tokenizer.count_batch([piece])[0])
        if count <= max_tokens and piece.strip():
            best, lo = (piece, count), mid + 1
        else:
            hi = mid - 1
    return best


def assemble_context(
    store: DocStore,
    evidence: Sequence[str | InlinePiece],
    target_tokens: int,
    rng: np.random.Generator,
    sink: BinaryIO,
    *,
    confusers: Iterable[str] = (),
    exclude: Iterable[int] = (),
) -> Assembly:
    """Write a context of about ``target_tokens`` tokens to ``sink``; returns where the evidence went.

    ``evidence``: store document ids or :class:`InlinePiece`; ``confusers``: store ids preferred as distractors;
    ``exclude``: store indices never used as distractors.
    """
    inline = [e for e in evidence if isinstance(e, InlinePiece)]
    inline_counts = dict(
        zip([p.doc_id for p in inline], store.tokenizer.count_batch([p.text + SEPARATOR for p in inline]), strict=True)
    )
    evidence_idx = [store.index(e) for e in evidence if not isinstance(e, InlinePiece)]
    evidence_tokens = int(store.token_counts[evidence_idx].sum()) + sum(int(c) for c in inline_counts.values())
    budget = target_tokens - evidence_tokens
    if budget < 0:
        raise ContextTooSmall(f"evidence has {evidence_tokens} tokens, more than the target {target_tokens}")
    free = np.ones(len(store), dtype=bool)
    free[evidence_idx] = False
    free[list(exclude)] = False
    confuser_idx = np.array(sorted({i for i in map(store.index, confusers) if free[i]}), dtype=np.int64)
    free[confuser_idx] = False
    order = np.concatenate([rng.permutation(confuser_idx), rng.permutation(np.flatnonzero(free))]).astype(np.int64)
    counts = store.token_counts[order]
    total = np.cumsum(counts)
    k = int(np.searchsorted(total, budget, side="right"))
    chosen = list(order[:k])
    remaining = budget - (int(total[k - 1]) if k else 0)
    tail, tail_counts = order[k:], counts[k:].copy()
    while remaining >= MIN_FILL_TOKENS:
        fits = np.flatnonzero(tail_counts <= remaining)
        if not len(fits):
            break
        j = int(fits[0])
        chosen.append(tail[j])
        remaining -= int(tail_counts[j])
        tail_counts[j] = np.iinfo(np.int64).max
    filler = None
    unused = np.flatnonzero(tail_counts != np.iinfo(np.int64).max)
    if remaining >= MIN_FILL_TOKENS and len(unused):
        filler = _fill_prefix(store, int(tail[unused[0]]), remaining)
    elif remaining > max(MIN_FILL_TOKENS, 0.01 * target_tokens):
        raise ValueError(f"the document pool ({store.total_tokens} tokens) is too small for {target_tokens} tokens")
    distractors: list = [int(i) for i in rng.permutation(np.asarray(chosen, dtype=np.int64))]
    if filler is not None:
        distractors.insert(int(rng.integers(len(distractors) + 1)), filler)
    n_pieces = len(distractors) + len(evidence)
    slots = set(np.sort(rng.choice(n_pieces, size=len(evidence), replace=False)).tolist())
    evidence_iter, distractor_iter = iter(evidence), iter(distractors)
    placements, chars, tokens = [], 0, 0
    for slot in range(n_pieces):
        if slot in slots:
            item = next(evidence_iter)
            if isinstance(item, InlinePiece):
                piece = item.text + SEPARATOR
                data, n_chars, n_tokens = piece.encode("utf-8"), len(piece), inline_counts[item.doc_id]
            else:
                i = store.index(item)
                data, n_chars, n_tokens = store.piece(i), int(store.char_lengths[i]), int(store.token_counts[i])
            doc_id = item.doc_id if isinstance(item, InlinePiece) else item
            placements.append(
                Placement(doc_id, chars, chars + n_chars - len(SEPARATOR), tokens, tokens + int(n_tokens))
            )
        else:
            item = next(distractor_iter)
            if isinstance(item, tuple):
                data, n_chars, n_tokens = item[0].encode("utf-8"), len(item[0]), item[1]
            else:
                data, n_chars, n_tokens = (
                    store.piece(item),
                    int(store.char_lengths[item]),
                    int(store.token_counts[item]),
                )
        sink.write(data)
        chars += n_chars
        tokens += int(n_tokens)
    return Assembly(placements, tokens, chars, n_pieces)
