"""Warm-start (SFT) turns of the memory agent, built from a record's evidence: the ideal memory is the evidence
seen so far, and the final answer is the reference answer.

For a document of ids d (chunk size C, K = ceil(len(d) / C) update turns) and its evidence facts as token spans
[a_i, b_i) of d (the tokens overlapping the fact's character span, from the tokenizer's offsets), in document order:

    E_t   = ‖_i d[a_i : min(b_i, (t + 1)·C)]   over the facts with a_i < (t + 1)·C       (evidence seen in chunks ≤ t)
    m_0   = no_memory ids;  m_{t+1} = E_t[:max_memory_tokens], or no_memory ids when E_t is empty
    update turn t < K:  prompt = update pieces ‖ q ‖ m_t ‖ d[t·C : (t + 1)·C],  target = E_t[:max_memory_tokens] ‖ stop
    final turn:         prompt = final pieces ‖ q ‖ instructions ‖ m_K,          target = answer ids ‖ stop

Every target token of an update turn is a token of the previous memory or of the chunk on screen (the agent copies,
it never needs what it has not read), and m_{t+1} is exactly what ``qlx.memory.run`` carries after a response equal
to the target under ``carry: response`` (the whole response, its stop token removed, capped at ``max_memory_tokens``).
Prompts are assembled in token space as ``run`` assembles them (``qlx.memory.templates.assemble_ids``).
"""

from __future__ import annotations

import dataclasses

from qlx.data.records import Record, read_context
from qlx.memory.config import MemoryAgentConfig
from qlx.memory.templates import assemble_ids, tokenize_template


@dataclasses.dataclass(frozen=True)
class Turn:
    """One warm-start example: the prompt ids of a turn and its target response ids (stop token included)."""

    prompt: list[int]
    target: list[int]
    final: bool


def fact_token_spans(record: Record, tokenizer, base_dir=".") -> tuple[list[int], list[tuple[int, int]]]:
    """(document ids, [a_i, b_i) per evidence fact in document order): the tokens whose character offsets overlap
    the fact's span ``[char_start, char_end)`` without its surrounding whitespace (needs a tokenizer with
    ``encode_with_offsets``)."""
    if not hasattr(tokenizer, "encode_with_offsets"):
        raise TypeError(f"{type(tokenizer).__name__} has no encode_with_offsets (character offsets of its tokens)")
    text = read_context(record, base_dir)
    ids, offsets = tokenizer.encode_with_offsets(text)
    facts = record.evidence.get("facts") or []
    if not facts:
        raise ValueError(f"record {record.id!r} has no evidence facts (evidence['facts']) to build a memory from")
    spans = []
    for start, end in sorted((int(f["char_start"]), int(f["char_end"])) for f in facts):
        piece = text[start:end]  # spans end with the sentence's trailing space: not part of the fact
        start, end = start + len(piece) - len(piece.lstrip()), start + len(piece.rstrip())
        inside = [k for k, (s, e) in enumerate(offsets) if s < end and e > start]
        if not inside:
            raise ValueError(f"record {record.id!r}: no token overlaps the evidence span [{start}, {end})")
        spans.append((inside[0], inside[-1] + 1))
    return ids, spans


def evidence_seen(ids: list[int], spans: list[tuple[int, int]], end: int) -> list[int]:
    """E: the ids of every fact span clipped to the first ``end`` document tokens, concatenated (module docstring)."""
    out: list[int] = []
    for a, b in spans:
        if a < end:
            out += ids[a : min(b, end)]
    return out


def warm_start_turns(
    record: Record,
    tokenizer,
    config: MemoryAgentConfig,
    question: tuple[str, str],
    answer: str,
    *,
    stop_id: int,
    base_dir=".",
) -> list[Turn]:
    """The K update turns and the final turn of ``record`` with their ideal targets (module docstring).

    question: (q_core, q_inst) as the agent is given it. answer: the final turn's target text. stop_id: the token
    that ends each target (one of the agent's stop tokens). Needs ``config.carry == "response"`` (targets are
    whole memories) and ``max_chunks`` None (the whole document is read).
    """
    if config.carry != "response":
        raise ValueError(f"warm-start targets are whole memories: they need carry 'response' (got {config.carry!r})")
    if config.max_chunks is not None:
        raise ValueError("warm-start turns read the whole document: max_chunks must be None")
    template = tokenize_template(tokenizer, config.memory_template, config.chat_mode)
    ids, spans = fact_token_spans(record, tokenizer, base_dir)
    q, inst = tokenizer.encode(question[0]), tokenizer.encode(question[1]) if question[1] else []
    c, memory = config.chunk_tokens, list(template.no_memory)
    turns = []
    for t in range(-(-len(ids) // c)):
        seen = evidence_seen(ids, spans, (t + 1) * c)[: config.max_memory_tokens]
        prompt = assemble_ids(template.update, {"question": q, "memory": memory, "chunk": ids[t * c : (t + 1) * c]})
        turns.append(Turn(prompt=prompt, target=[*seen, stop_id], final=False))
        memory = seen or list(template.no_memory)
    prompt = assemble_ids(template.final, {"question": q, "memory": memory, "instructions": inst})
    turns.append(Turn(prompt=prompt, target=[*tokenizer.encode(answer), stop_id], final=True))
    return turns
