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
by one token at a chunk boundary. Results can then be reported by evidence position (e.g. accuracy by the chunk of
the last fact, or by ``chunk / K``).
"""

from __future__ import annotations

from qlx.data.records import Record, read_context
from qlx.memory.config import MemoryAgentConfig


def evidence_spans(record: Record) -> list[int]:
    """The first character of each evidence fact (else of each placed evidence document), in record order."""
    facts = record.evidence.get("facts") or []
    if facts:
        return [int(f["char_start"]) for f in facts]
    return [int(d["char_start"]) for d in record.evidence.get("docs") or []]


def evidence_chunks(record: Record, tokenizer, config: MemoryAgentConfig, base_dir=".") -> tuple[int | None, ...]:
    """The chunk index (update turn) of each evidence fact of ``record`` (module docstring); None where centre
    truncation dropped it. A record without evidence spans gives ()."""
    starts = evidence_spans(record)
    if not starts:
        return ()
    text = read_context(record, base_dir)
    length = len(tokenizer.encode(text))
    c = config.chunk_tokens
    keep = None if config.max_chunks is None else config.max_chunks * c
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
        out.append(t // c)
    return tuple(out)
