"""Evidence positions of synthesised records for the memory agent: each fact's chunk against the whole context's
tokens (an independent decode-based reference), with and without centre truncation."""

import json

import numpy as np
import pytest

from qlx.data.records import Record
from qlx.data.synth import SynthConfig, default_tokenizer, synthesize
from qlx.memory import MemoryAgentConfig, centre_truncate
from qlx.memory.evidence import evidence_chunks, evidence_spans

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
