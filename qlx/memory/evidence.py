"""Where a record's evidence sits for the memory agent: the update turn (chunk index) that shows each evidence fact.

``qlx synth`` records keep every evidence fact's character span in the context (``evidence["facts"][i]
["char_start"]``, placed documents in ``evidence["docs"]``). For the agent reading that context with a tokenizer
and a :class:`qlx.memory.MemoryAgentConfig`:

    t_i = len(encode(context[:char_start_i]))          the fact's first token (the run's tokenizer)
    L   = len(encode(context)),  keep = max_chunks · C  (None: no truncation)
    centre truncation (as ``qlx.memory.centre_truncate``): head = ⌊keep/2⌋ tokens, tail = the last keep − head
    t'_i = t_i if t_i < head;  t_i − (L − keep) if t_i ≥ L − (keep − head);  dropped (None) otherwise
    chunk_i = t'_i // C

Tokenising the prefix on its own can differ from the whole context's tokens by a merge at the cut, so t_i may be off
by one token at a chunk boundary. Results are reported by evidence position (``evidence_position``): the third of
the document's K = ⌈min(L, keep) / C⌉ chunks that holds the last evidence fact, ⌊3 · max_i chunk_i / K⌋ -- the
agent must carry every fact until then, and a reader of the first window only sees the first third's.
"""

from __future__ import annotations

import math

from qlx.data.records import Record, read_context
from qlx.memory.config import MemoryAgentConfig

POSITIONS = ("first third", "middle third", "last third")
NO_POSITION = "no evidence span"  # a record without evidence spans, or one whose fact centre truncation dropped


def evidence_spans(record: Record) -> list[int]:
    """The first character of each evidence fact (else of each placed evidence document), in record order."""
    facts = record.evidence.get("facts") or []
    if facts:
        return [int(f["char_start"]) for f in facts]
    return [int(d["char_start"]) for d in record.evidence.get("docs") or []]


def evidence_chunks(record: Record, tokenizer, config: MemoryAgentConfig, base_dir=".") -> tuple[int | None, ...]:
    """The chunk index (update turn) of each evidence fact of ``record`` (module docstring); None where centre
    truncation dropped it. A record without evidence spans gives ()."""
    return _chunks_and_count(record, tokenizer, config, base_dir)[0]


def evidence_position(record: Record, tokenizer, config: MemoryAgentConfig, base_dir=".") -> str:
    """Where ``record``'s evidence ends for the agent (module docstring): one of ``POSITIONS`` by the chunk of its
    last fact over the document's chunk count, or ``NO_POSITION``."""
    chunks, count = _chunks_and_count(record, tokenizer, config, base_dir)
    if not chunks or None in chunks:
        return NO_POSITION
    return POSITIONS[3 * max(chunks) // count]


def _chunks_and_count(record, tokenizer, config, base_dir) -> tuple[tuple[int | None, ...], int]:
    """(each evidence fact's chunk, the chunks the agent reads) for ``record``."""
    starts = evidence_spans(record)
    if not starts:
        return (), 0
    text = read_context(record, base_dir)
    length = len(tokenizer.encode(text))
    c = config.chunk_tokens
    keep = None if config.max_chunks is None else config.max_chunks * c
    count = max(1, math.ceil((length if keep is None else min(length, keep)) / c))
    out: list[int | None] = []
    for start in starts:
        t = len(tokenizer.encode(text[:start])) if start else 0
        if keep is not None and length > keep:
            head = keep // 2
            if t >= length - (keep - head):
                t -= length - keep
            elif t >= head:
                out.append(None)
                continue
        out.append(min(t // c, count - 1))
    return tuple(out), count
