"""The grain pipeline: chat-template tokenization equal to whole-prompt tokenization, stage limits (drop or middle
truncation, also of contexts stored as files), sharding by process, ArrayRecord input, and the demo task set."""

from collections import Counter

import pytest

from qlx.data.demo_data import make_demo_dataset
from qlx.data.pipeline import StageLimits, encode_record, make_dataset
from qlx.data.prompts import extract_final_answer, user_prompt
from qlx.data.records import TASK_TYPES, read_context, read_jsonl
from qlx.data.synth import SynthConfig, default_tokenizer, synthesize


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(0)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("records")
    config = SynthConfig(n=10, min_tokens=1024, max_tokens=6000, seed=8, inline_max_tokens=2500, array_record=True)
    synthesize(config, out, tokenizer=tok, progress=False)
    return out, list(read_jsonl(out / "records.jsonl"))


def test_prompt_ids_equal_the_whole_chat_template(run, tok):
    out, records = run
    limits = StageLimits(max_input_tokens=10_000)
    for record in records:
        element = encode_record(record, tok, limits, out)
        content = user_prompt(record.question, read_context(record, out), record.options)
        want = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        assert element["input_ids"].tolist() == want and not element["truncated"]
        assert element["context_tokens"] == record.length_tokens
    assert content.startswith("Please read the following text and answer the question below.\n\n<text>\n")
    assert tok.decode(want).endswith("<|im_start|>assistant\n<think>\n")


def test_middle_truncation_keeps_head_and_tail_also_for_file_contexts(run, tok):
    out, records = run
    limits = StageLimits(max_input_tokens=900)
    for record in records:
        element = encode_record(record, tok, limits, out)
        ids = element["input_ids"].tolist()
        assert len(ids) <= 900 and element["truncated"]
        context = tok.encode(read_context(record, out))
        empty = tok.apply_chat_template(
            [{"role": "user", "content": user_prompt(record.question, "", record.options)}], add_generation_prompt=True
        )
        full = tok.apply_chat_template(
            [{"role": "user", "content": user_prompt(record.question, read_context(record, out), record.options)}],
            add_generation_prompt=True,
        )
        (cut,) = [b for b in range(len(empty) + 1) if full == empty[:b] + context + empty[b:]]
        before, after = empty[:cut], empty[cut:]
        kept = len(ids) - len(before) - len(after)
        head = kept // 2
        assert ids == before + context[:head] + context[len(context) - (kept - head) :] + after
    assert any(r.context_ref is not None for r in records)
    dropped = [encode_record(r, tok, StageLimits(max_input_tokens=900, overflow="drop"), out) for r in records]
    assert dropped == [None] * len(records)
    with pytest.raises(ValueError, match="overflow"):
        StageLimits(max_input_tokens=900, overflow="cut")


def test_grain_shards_by_process_and_reads_array_record(run, tok):
    out, records = run
    limits = StageLimits(max_input_tokens=4000, overflow="drop")
    fits = {r.id for r in records if encode_record(r, tok, limits, out) is not None}
    assert 0 < len(fits) < len(records)
    shards = [
        [e["id"] for e in make_dataset([out / "records.jsonl"], tok, limits, seed=1, shard_index=i, shard_count=2)]
        for i in range(2)
    ]
    assert set(shards[0]).isdisjoint(shards[1]) and set(shards[0]) | set(shards[1]) == fits
    again = [e["id"] for e in make_dataset([out / "records.jsonl"], tok, limits, seed=1, shard_index=0, shard_count=2)]
    assert again == shards[0]
    ar = make_dataset([out / "records.array_record"], tok, limits, shuffle=False, shard_index=0, shard_count=1)
    assert {e["id"] for e in ar} == fits
    default = make_dataset([out / "records.jsonl"], tok, limits, num_epochs=2)
    assert Counter(e["id"] for e in default) == Counter({i: 2 for i in fits}), "one JAX process: everything, twice"


def test_answer_extraction():
    assert extract_final_answer("<think>the answer is 3</think>So. Therefore, the answer is (Lorvik).") == "Lorvik"
    assert extract_final_answer('The correct answer is "B".') == "B"
    assert extract_final_answer("no final answer") is None


def test_demo_dataset_is_small_balanced_and_disjoint(tok):
    train, evaluation, demo_tok = make_demo_dataset(1, 20, 10, max_context_tokens=256, tokenizer=tok)
    assert demo_tok is tok and len(train) == 20 and len(evaluation) == 10
    assert {r.question for r in train}.isdisjoint(r.question for r in evaluation)
    assert Counter(r.task_type for r in train) == Counter({t: 4 for t in TASK_TYPES})
    for record in train + evaluation:
        assert 128 * 0.98 <= record.length_tokens <= 256 and record.context is not None and record.hops <= 4
    only = make_demo_dataset(1, 4, 2, max_context_tokens=200, tokenizer=tok, task_types=("reading",))
    assert {r.task_type for r in only[0] + only[1]} == {"reading"}
