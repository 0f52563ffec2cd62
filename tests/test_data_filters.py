"""Filters: derivability (a tampered record is caught), decontamination, knowledge grounding, robustness, dedup,
difficulty bins."""

import dataclasses
import json
import random
import re
from collections import Counter

import pytest

from qlx.data import filters
from qlx.data.prompts import extract_final_answer
from qlx.data.records import read_context, read_jsonl
from qlx.data.synth import SynthConfig, default_tokenizer, synthesize


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    config = SynthConfig(n=20, min_tokens=1024, max_tokens=3000, seed=12, inline_max_tokens=1500)
    synthesize(config, out, tokenizer=default_tokenizer(0), progress=False)
    return out, list(read_jsonl(out / "records.jsonl"))


def _correct(record, response):
    answer = extract_final_answer(response)
    return answer is not None and answer.lower() == record.answer.lower()


def test_derivable_catches_tampered_answers_and_spans(run):
    out, records = run
    kept, dropped = filters.derivable(records, out)
    assert len(kept) == len(records) and not dropped
    plain = [r for r in records if r.task_type not in ("dialogue", "mc")]
    tampered = [dataclasses.replace(r, answer=r.answer + "0") for r in plain][:5]
    facts = [
        dict(f, char_start=f["char_start"] + 3, char_end=f["char_start"] + 4) for f in records[0].evidence["facts"]
    ]
    shifted = dataclasses.replace(records[0], evidence=dict(records[0].evidence, facts=facts))
    kept, dropped = filters.derivable([*tampered, shifted], out)
    assert not kept and len(dropped) == 6
    assert all("evidence gives" in why for _, why in dropped[:5]) and "is not in its span" in dropped[5][1]


def test_knowledge_grounding_and_robustness_with_a_fake_model(run):
    out, records = run
    known = {r.id for r in records[::3]}

    def closed_book(prompts, k):
        by_question = {r.question: r for r in records}
        answers = []
        for messages in prompts:
            record = next(r for q, r in by_question.items() if messages[0]["content"].startswith(q))
            answers.append([f"Therefore, the answer is {record.answer}" if record.id in known else "no idea"] * k)
        return answers

    kept, dropped = filters.knowledge_grounding(records, closed_book, _correct, k=2)
    assert {r.id for r, _ in dropped} == known and len(kept) + len(dropped) == len(records)
    assert all(why == "answered correctly without the context in 2 of 2 tries" for _, why in dropped)
    assert all(r.source["checks"]["grounding"] == {"correct": 0, "k": 2} for r in kept)
    assert "checks" not in records[0].source, "filters return new records; the inputs are unchanged"

    def reader(prompts, k):
        """Answers right only when the text still has at most 40 documents (extra distractors confuse it)."""
        out_answers = []
        for messages, record in zip(prompts, records, strict=True):
            text = messages[0]["content"].split("<text>\n", 1)[1].split("</text>", 1)[0]
            ok = text.count("\n\n") <= 40 and record.answer.split(", ")[0] in text
            out_answers.append([f"Therefore, the answer is {record.answer}" if ok else "?"] * k)
        return out_answers

    distractors = [f"Irrelevant note {i} about weather." for i in range(50)]
    few, _ = filters.robustness(records, reader, _correct, distractors, per_record=2, k=2, base_dir=out)
    many, lost = filters.robustness(records, reader, _correct, distractors, per_record=45, k=2, base_dir=out)
    assert len(lost) == len(records) - len(many) and len(many) < len(few)
    context = read_context(records[0], out)
    grown = filters.add_distractors(context, ["Extra doc one.", "Extra doc two."], random.Random(0))
    assert grown.count("\n\n") == context.count("\n\n") + 2 and "Extra doc two.\n\n" in grown
    for record in records[:8]:
        context = read_context(record, out)
        spans = [(d["char_start"], d["char_end"]) for d in record.evidence["docs"]]
        for seed in range(5):
            extra = [f"Extra doc {i}." for i in range(6)]
            grown = filters.add_distractors(context, extra, random.Random(seed), spans)
            assert all(grown.count(f"Extra doc {i}.\n\n") == 1 for i in range(6))
            stripped = grown
            for i in range(6):
                stripped = stripped.replace(f"Extra doc {i}.\n\n", "")
            assert stripped == context, "only whole documents are added"
            for a, b in spans:
                assert context[a:b] in grown, "evidence documents stay whole"


def test_dedup_and_equal_draws_per_difficulty_bin(run):
    _, records = run
    twice = [*records, dataclasses.replace(records[2], id="copy", question=records[2].question.upper() + "  ")]
    kept, dropped = filters.dedup(twice)
    assert [(r.id, why) for r, why in dropped] == [("copy", f"same question as record {records[2].id}")]
    assert len(kept) == len(records)
    rng = random.Random(4)
    rates = [rng.choice([0.0, 0.1, 0.3, 0.6, 0.9, 1.0]) for _ in records]
    drawn, rest = filters.difficulty_bins(records, rates, n_bins=4, seed=1)
    bins = Counter(min(int(rates[records.index(r)] * 4), 3) for r in drawn)
    assert len(set(bins.values())) == 1 and set(bins) == {min(int(x * 4), 3) for x in rates}
    assert len(drawn) + len(rest) == len(records) and all("difficulty bin" in why for _, why in rest)
    with pytest.raises(ValueError, match="smallest non-empty bin"):
        filters.difficulty_bins(records, rates, n_bins=4, per_bin=len(records))
    with pytest.raises(ValueError, match="outside"):
        filters.difficulty_bins(records[:1], [1.5])


def test_pass_rates_are_fractions_of_k(run):
    out, records = run

    def half_right(prompts, k):
        return [[("Therefore, the answer is " + r.answer) if j % 2 == 0 else "?" for j in range(k)] for r in records]

    rates = filters.pass_rates(records, half_right, _correct, k=4, base_dir=out)
    assert rates == [0.5] * len(records)
    kept, dropped = filters.difficulty(records, half_right, _correct, k=4, base_dir=out, keep=(0.6, 1.0))
    assert not kept and len(dropped) == len(records) and "pass rate 0.5" in dropped[0][1]
    kept, _ = filters.difficulty(records, half_right, _correct, k=4, base_dir=out)
    assert [r.source["checks"]["difficulty"] for r in kept] == [{"correct": 2, "k": 4}] * len(records)
    with pytest.raises(ValueError, match="responses for"):
        filters.pass_rates(records, lambda prompts, k: [["?"]] * len(prompts), _correct, k=2, base_dir=out)
    assert re.search("answer", filters.closed_book_messages(records[0])[0]["content"])


def _hand_record(run, question, answer="lambda"):
    _, records = run
    base = next(r for r in records if r.options is None)
    return dataclasses.replace(base, id=f"hand-{len(question)}", question=question, answer=answer)


def test_decontaminate_hand_built_overlaps(run, tmp_path):
    ten = "Alpha beta gamma delta epsilon zeta eta theta iota kappa?"
    record = _hand_record(run, ten)
    assert len(filters.record_grams(record, 4)) == 7, "10 words give 7 word 4-grams; the 1-word answer none"
    test = tmp_path / "test.jsonl"
    items = [{"question": "ALPHA, beta; Gamma-delta   epsilon!", "id": 7}, {"q": "unrelated words only here"}]
    test.write_text("\n".join(json.dumps(i) for i in items) + "\n\n")
    texts = filters.read_test_set(test)
    assert texts == ["ALPHA, beta; Gamma-delta   epsilon!", "unrelated words only here"], "non-strings skipped"
    kept, dropped = filters.decontaminate([record], texts, n=4, threshold=0.25)
    assert not kept and dropped[0][1] == "29% of its 4-grams are in the test set (e.g. 'alpha beta gamma delta')"
    kept, dropped = filters.decontaminate([record], texts, n=4, threshold=0.3)
    assert not dropped and kept[0].source["checks"]["decontaminate"] == {"overlap": round(2 / 7, 4)}

    # grams never span two JSON strings: "epsilon" alone in another field adds no 4-gram
    split = tmp_path / "split.jsonl"
    split.write_text(json.dumps({"question": "alpha beta gamma delta", "answer": ["epsilon zeta", {"x": "kappa"}]}))
    kept, _ = filters.decontaminate([record], filters.read_test_set(split), n=4, threshold=1.0)
    assert kept[0].source["checks"]["decontaminate"] == {"overlap": round(1 / 7, 4)}
    only_answers = filters.read_test_set(split, fields=("answer",))
    assert only_answers == ["epsilon zeta", "kappa"]

    # a record whose parts are all shorter than n words: its question's words, consecutive in one test text
    exact = _hand_record(run, "Who won?", answer="Ann Ode")
    plain = tmp_path / "plain.txt"
    plain.write_text("Some exam.\nWho won? Ann Ode\n")
    kept, dropped = filters.decontaminate([exact, record], filters.read_test_set(plain), n=8, threshold=1.0)
    assert [r.id for r, _ in dropped] == [exact.id] and [r.id for r in kept] == [record.id]
    assert dropped[0][1] == "its question 'who won' (fewer than 8 words) appears in the test set"
    kept, dropped = filters.decontaminate([_hand_record(run, "Who won?", "Ann Ode")], ["who wins ann ode"], n=8)
    assert kept[0].source["checks"]["decontaminate"] == {"overlap": 0.0} and not dropped
    kept, dropped = filters.decontaminate([_hand_record(run, "Who won the race?")], ["Who won", "the race"], n=8)
    assert kept and not dropped, "words split between two test texts do not match"

    (tmp_path / "bad.jsonl").write_text('{"question": "fine"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a JSON object"):
        filters.read_test_set(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        filters.read_test_set(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="threshold"):
        filters.decontaminate([record], texts, threshold=0.0)
    index = filters.NgramIndex.build(texts, 4)
    assert filters.decontaminate([record], index, n=4, threshold=0.25)[1][0][1].startswith("29% of its 4-grams")
    with pytest.raises(ValueError, match="holds 4-grams"):
        filters.decontaminate([record], index, n=8)


def test_decontaminate_real_records_against_a_test_set(run, tmp_path):
    _, records = run
    leaked = records[1:4]
    test_items = [{"question": r.question, "answer": r.answer} for r in leaked]
    test_items.append({"question": "What is the capital of a country that does not exist in this world at all?"})
    texts = [t for item in test_items for t in item.values()]
    kept, dropped = filters.decontaminate(records, texts)
    assert {r.id for r, _ in dropped} == {r.id for r in leaked}
    assert all(r.source["checks"]["decontaminate"]["overlap"] < 0.5 for r in kept)
    assert len(kept) == len(records) - 3
