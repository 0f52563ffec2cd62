"""Filters: derivability (a tampered record is caught), knowledge grounding, robustness, dedup, difficulty bins."""

import dataclasses
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
    assert {r.id for r in dropped} == known and len(kept) + len(dropped) == len(records)

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
    assert grown.count("\n\n") == context.count("\n\n") + 2 and "Extra doc two." in grown


def test_dedup_and_equal_draws_per_difficulty_bin(run):
    _, records = run
    twice = [*records, dataclasses.replace(records[2], id="copy", question=records[2].question.upper() + "  ")]
    kept, dropped = filters.dedup(twice)
    assert [r.id for r in dropped] == ["copy"] and len(kept) == len(records)
    rng = random.Random(4)
    rates = [rng.choice([0.0, 0.1, 0.3, 0.6, 0.9, 1.0]) for _ in records]
    drawn, rest = filters.difficulty_bins(records, rates, n_bins=4, seed=1)
    bins = Counter(min(int(rates[records.index(r)] * 4), 3) for r in drawn)
    assert len(set(bins.values())) == 1 and set(bins) == {min(int(x * 4), 3) for x in rates}
    assert len(drawn) + len(rest) == len(records)
    with pytest.raises(ValueError, match="smallest non-empty bin"):
        filters.difficulty_bins(records, rates, n_bins=4, per_bin=len(records))
    with pytest.raises(ValueError, match="outside"):
        filters.difficulty_bins(records[:1], [1.5])


def test_pass_rates_are_fractions_of_k(run):
    out, records = run

    def half_right(prompts, k):
        return [[("Therefore, the answer is " + r.answer) if j % 2 == 0 else "?" for j in range(k)] for r in records]

    rates = filters.pass_rates(records, half_right, _correct, k=4, base_dir=out)
    assert rates.tolist() == [0.5] * len(records)
    assert re.search("answer", filters.closed_book_messages(records[0])[0]["content"])
