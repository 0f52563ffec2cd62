"""Evidence positions of synthesised records for the memory agent: each fact's chunk against the whole context's
tokens (an independent decode-based reference), with and without centre truncation."""

import json

import numpy as np
import pytest

from qlx.data.records import Record
from qlx.data.synth import SynthConfig, default_tokenizer, synthesize
from qlx.memory import MemoryAgentConfig, centre_truncate
from qlx.memory.evidence import evidence_chunks, evidence_position, evidence_spans

CHUNK = 128


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    tok = default_tokenizer(0)
    synthesize(SynthConfig(n=6, min_tokens=1024, max_tokens=2048, seed=1), out, tokenizer=tok, progress=False)
    path = next(out.glob("records*.jsonl"))
    rows = [Record(**json.loads(line)) for line in path.read_text().splitlines()]
    return tok, [r for r in rows if evidence_spans(r) and r.context is not None]


def _token_of_char(tok, ids, char):
    """Reference: the index of the token whose decoded text covers character ``char`` of the context."""
    lo, hi = 0, len(ids)
    while lo < hi:  # smallest t with len(decode(ids[:t + 1])) > char
        mid = (lo + hi) // 2
        if len(tok.decode(ids[: mid + 1])) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _near(a, b, t):
    return a == b or (t % CHUNK in (0, CHUNK - 1) and abs(a - b) == 1)  # one token off at a chunk boundary


def test_evidence_chunks_match_the_whole_context_tokens(records):
    tok, rows = records
    assert rows
    config = MemoryAgentConfig(chunk_tokens=CHUNK)
    for record in rows:
        ids = tok.encode(record.context)
        chunks = evidence_chunks(record, tok, config)
        assert len(chunks) == len(evidence_spans(record))
        for start, c in zip(evidence_spans(record), chunks, strict=True):
            t = _token_of_char(tok, ids, start)
            assert _near(c, t // CHUNK, t), (record.id, start, c, t)


def test_centre_truncation_drops_the_middle_and_shifts_the_tail(records):
    tok, rows = records
    config = MemoryAgentConfig(chunk_tokens=CHUNK, max_chunks=2)
    keep = 2 * CHUNK
    seen = set()
    for record in rows:
        ids = np.asarray(tok.encode(record.context))
        kept = centre_truncate(ids, keep)
        for start, c in zip(evidence_spans(record), evidence_chunks(record, tok, config), strict=True):
            t = _token_of_char(tok, ids.tolist(), start)
            if t < keep // 2:
                seen.add("head")
                assert _near(c, t // CHUNK, t)
            elif t >= len(ids) - (keep - keep // 2):
                seen.add("tail")
                shifted = t - (len(ids) - keep)
                assert _near(c, shifted // CHUNK, shifted) and kept[shifted] == ids[t]
            elif abs(t - keep // 2) > 1 and abs(t - (len(ids) - keep // 2)) > 1:
                seen.add("middle")
                assert c is None
    assert "middle" in seen


class _Characters:
    """A tokenizer of one token per character (positions by hand)."""

    @staticmethod
    def encode(text):
        return [ord(ch) for ch in text]


def _record(context, starts):
    facts = [{"char_start": s} for s in starts]
    evidence = {"docs": [], "facts": facts, "program": {}}
    return Record(id="r", task_type="multihop", question="q", answer="a", answer_type="entity", evidence=evidence,
                  hops=len(starts), length_tokens=len(context), source={}, context=context)  # fmt: skip


@pytest.mark.parametrize(
    ("starts", "max_chunks", "expected"),
    [
        ((5,), None, "first third"),  # chunk 0 of 10
        ((5, 29), None, "first third"),  # chunks 0, 2 of 10: 3 * 2 // 10 = 0
        ((5, 34), None, "first third"),  # chunk 3: 9 // 10 = 0
        ((5, 40), None, "middle third"),  # chunk 4: 12 // 10 = 1
        ((5, 69), None, "middle third"),  # chunk 6: 18 // 10 = 1
        ((70,), None, "last third"),  # chunk 7: 21 // 10 = 2
        ((99,), None, "last third"),  # chunk 9, the last
        ((), None, "no evidence span"),
        ((5, 50), 4, "no evidence span"),  # centre truncation to 40 tokens drops character 50
        ((5, 95), 4, "last third"),  # kept in the tail: chunk 3 of the 4 read
    ],
)
def test_evidence_position_is_the_third_of_the_chunks_holding_the_last_fact(starts, max_chunks, expected):
    """100 characters in chunks of 10: K = 10 (4 with max_chunks=4); the position is ⌊3 · last chunk / K⌋."""
    config = MemoryAgentConfig(chunk_tokens=10, max_chunks=max_chunks)
    assert evidence_position(_record("x" * 100, starts), _Characters(), config) == expected
