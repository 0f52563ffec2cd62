"""Atomic facts of a user-corpus document, extracted by an LLM and validated against the text.

The model returns ``{"facts": [{"subject", "relation", "object", "quote"}]}`` per chunk. A fact is kept only if its
quote occurs verbatim in the chunk and the object occurs in the quote; the quote's location is the fact's span. Every
rejected fact or unusable reply is reported (``doc_id: why``), never silently dropped.
"""

import re

from qlx.data.documents import Document, Fact
from qlx.data.llm import ChatClient, parse_json_reply

SYSTEM = (
    "You extract atomic facts from a document. Reply with JSON only: "
    '{"facts": [{"subject": ..., "relation": ..., "object": ..., "quote": ...}]}. '
    "Each fact is one (subject, relation, object) triple; relation is a short snake_case verb phrase such as "
    "born_in or founded_by; quote is the exact sentence from the document that states the fact, copied verbatim, "
    "and it must contain the object verbatim."
)


def _chunks(text: str, max_chars: int) -> list[tuple[int, str]]:
    """Consecutive pieces of at most ``max_chars`` characters, cut at paragraph breaks where possible."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        pieces.append((start, text[start:end]))
        start = end
    return pieces


def extract_facts(
    client: ChatClient, doc: Document, *, chunk_chars: int = 6000, attempts: int = 2
) -> tuple[list[Fact], list[str]]:
    """(kept facts with spans in ``doc.text``, problems)."""
    facts: list[Fact] = []
    problems: list[str] = []
    for offset, chunk in _chunks(doc.text, chunk_chars):
        items = None
        for _ in range(attempts):
            reply = client.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": chunk}])
            try:
                parsed = parse_json_reply(reply)
                items = parsed["facts"] if isinstance(parsed, dict) else parsed
                if not isinstance(items, list):
                    raise ValueError("'facts' is not a list")
                break
            except (ValueError, KeyError, TypeError) as e:
                problems.append(f"{doc.doc_id}@{offset}: unusable reply ({e})")
        for i, item in enumerate(items or []):
            where = f"{doc.doc_id}@{offset}: fact {i}"
            if not isinstance(item, dict) or not all(
                isinstance(item.get(k), str) and item[k].strip() for k in ("subject", "relation", "object", "quote")
            ):
                problems.append(f"{where}: needs non-empty strings subject, relation, object, quote")
                continue
            quote, obj = item["quote"].strip(), item["object"].strip()
            at = chunk.find(quote)
            if at < 0:
                problems.append(f"{where}: quote not found in the document: {quote[:80]!r}")
                continue
            if obj not in quote:
                problems.append(f"{where}: object {obj!r} is not in its quote")
                continue
            relation = re.sub(r"[^a-z0-9]+", "_", item["relation"].strip().lower()).strip("_")
            start = offset + at
            facts.append(Fact(item["subject"].strip(), relation, obj, doc.doc_id, start, start + len(quote)))
    return facts, problems
