"""Record validation: one validator (parse_record) behind read_jsonl, make_dataset and scan_jsonl; every malformed
line is named by file:line and field, and counted, never dropped."""

import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlx.data.pipeline import StageLimits, make_dataset
from qlx.data.records import RecordError, parse_record, read_jsonl, scan_jsonl, utf8_error
from qlx.data.tokenizer import train_bpe_tokenizer


def good(**overrides) -> dict:
    record = {
        "id": "r1",
        "task_type": "reading",
        "question": "Who founded Lorvik?",
        "answer": "Ada",
        "answer_type": "entity",
        "evidence": {"docs": [], "facts": [], "program": {}},
        "hops": 1,
        "length_tokens": 4,
        "source": {},
        "options": None,
        "context": "Ada founded Lorvik in 1901.",
        "context_ref": None,
    }
    return {**record, **overrides}


def line(record) -> bytes:
    return json.dumps(record).encode() + b"\n"


_WITHOUT_QUESTION = {k: v for k, v in good().items() if k != "question"}
BAD = {
    "null_line": (b"null\n", None, "a record must be a JSON object, got null"),
    "list_line": (b"[1, 2]\n", None, "a record must be a JSON object, got a list"),
    "invalid_json": (b'{"id": \n', None, "invalid JSON"),
    "invalid_utf8": (line(good(question="cafX")).replace(b"cafX", b"caf\xe9"), None, "invalid UTF-8 at byte"),
    "null_question": (line(good(question=None)), "question", "expected a string, got null"),
    "number_answer": (line(good(answer=42)), "answer", "expected a string, got an integer 42"),
    "context_not_string": (line(good(context=["a", "b"])), "context", "expected a string or null, got a list"),
    "bad_task_type": (line(good(task_type="poetry")), "task_type", "'poetry' is not one of mc, multihop"),
    "bool_hops": (line(good(hops=True)), "hops", "expected an integer, got true/false"),
    "negative_length": (line(good(length_tokens=-3)), "length_tokens", "must be >= 0"),
    "evidence_incomplete": (line(good(evidence={"docs": []})), "evidence", "lacks facts, program"),
    "bad_options": (line(good(options=["a", "b"], answer="A")), "options", "list of 4 strings"),
    "option_answer": (line(good(options=["a", "b", "c", "d"], answer="AB")), "answer", "letter A-D"),
    "both_contexts": (line(good(context_ref={"path": "ctx.txt", "chars": 3})), "context", "exactly one of"),
    "missing_ref_file": (line(good(context=None, context_ref={"path": "nowhere.txt", "chars": 3})), "context_ref",
                         "nowhere.txt: cannot be read"),
    "bad_ref": (line(good(context=None, context_ref={"path": 7})), "context_ref", 'must be {"path": string'),
    "missing_key": (line(_WITHOUT_QUESTION), None, "missing keys ['question']"),
    "unknown_key": (line(good(extra=1)), None, "unknown keys ['extra']"),
}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    texts = [good()["context"] + " " + good()["question"], "Please read the following text and answer."] * 20
    return train_bpe_tokenizer(texts, vocab_size=300)


@pytest.mark.parametrize("case", BAD)
def test_malformed_line_is_named_by_file_line_and_field_everywhere(tmp_path, tok, case):
    raw, field, message = BAD[case]
    path = tmp_path / "records.jsonl"
    path.write_bytes(line(good(id="ok")) + b"\n" + raw)  # the bad record is on line 3
    where = f"{path}:3"
    with pytest.raises(RecordError, match=re.escape(message)) as raised:
        list(read_jsonl(path))
    assert (raised.value.where, raised.value.field) == (where, field)
    assert str(raised.value).startswith(f"{where}: {field}: " if field else f"{where}: ")
    with pytest.raises(RecordError, match=re.escape(message)) as raised:
        list(make_dataset([path], tok, StageLimits(max_input_tokens=256), shuffle=False, shard_index=0, shard_count=1))
    assert (raised.value.where, raised.value.field) == (where, field)
    scan = scan_jsonl([path])
    assert (scan.count, scan.lines, [r.id for r in scan.records]) == (1, 2, ["ok"])
    assert scan.problems == [str(raised.value)]


def test_scan_counts_every_malformed_line_and_keeps_the_first_few(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [line(good(id="a")), BAD["null_line"][0], line(good(id="b")), BAD["null_question"][0],
             BAD["bad_task_type"][0], BAD["invalid_utf8"][0], line(good(id="c"))]  # fmt: skip
    path.write_bytes(b"".join(lines))
    scan = scan_jsonl([path], max_problems=2)
    assert (scan.count, scan.lines, [r.id for r in scan.records]) == (4, 7, ["a", "b", "c"])
    assert [p.split(": ")[0] for p in scan.problems] == [f"{path}:2", f"{path}:4"]
    assert scan.summary().startswith("4 of 7 records are malformed; the first 2:\n  " + f"{path}:2: ")
    assert scan_jsonl([path]).count == 4 and len(scan_jsonl([path]).problems) == 4


def test_referenced_context_files_are_checked_for_utf8_and_read_relative_to_their_own_file(tmp_path, tok):
    for name, data in (("one", b"Ada founded Lorvik."), ("two", "Zoë founded Brek.".encode())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ctx.txt").write_bytes(data)
        record = good(id=name, context=None, context_ref={"path": "ctx.txt", "chars": len(data.decode())})
        (tmp_path / name / "records.jsonl").write_bytes(line(record))
    paths = [tmp_path / "one" / "records.jsonl", tmp_path / "two" / "records.jsonl"]
    limits = StageLimits(max_input_tokens=256)
    elements = list(make_dataset(paths, tok, limits, shuffle=False, shard_index=0, shard_count=1))
    assert [e["id"] for e in elements] == ["one", "two"]  # each context_ref resolved next to its own records file
    assert scan_jsonl(paths).count == 0
    (tmp_path / "two" / "ctx.txt").write_bytes("Zoë founded Brek.".encode()[:4] + b"\xff rest")
    scan = scan_jsonl(paths)
    assert scan.problems == [f"{paths[1]}:1: context_ref: {tmp_path / 'two' / 'ctx.txt'}: invalid UTF-8 at byte 4 "
                             "(invalid start byte)"]  # fmt: skip
    with pytest.raises(RecordError, match=rf"{paths[1]}:1: context_ref: .*ctx.txt: invalid UTF-8 at byte 4"):
        list(make_dataset(paths, tok, limits, shuffle=False, shard_index=0, shard_count=1))


def test_parse_record_builds_the_record_a_good_line_describes():
    record = parse_record(line(good(options=["w", "x", "y", "z"], answer="C", task_type="mc")), where="f:1")
    assert (record.task_type, record.answer, record.options, record.question) == (
        "mc", "C", ["w", "x", "y", "z"], "Who founded Lorvik?")  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64), chunk=st.integers(1, 9))
def test_utf8_error_offset_matches_a_whole_decode(tmp_path_factory, data, chunk):
    """Streaming in chunks of any size finds the same first bad byte as decoding the whole file at once."""
    rng = random.Random(len(data))
    data = "é€😀a".encode()[: rng.randint(0, 10)] + data  # multi-byte characters across chunk boundaries
    path = tmp_path_factory.mktemp("utf8") / "ctx.txt"
    path.write_bytes(data)
    try:
        data.decode("utf-8")
        want = None
    except UnicodeDecodeError as e:
        want = f"invalid UTF-8 at byte {e.start} ({e.reason})"
    assert utf8_error(path, chunk_bytes=chunk) == want
