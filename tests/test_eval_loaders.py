"""Each benchmark's loader on small files written in the released formats, malformed records reported with
file:line and counted; and the prompt builders of both protocols."""

import csv
import json

import pytest

import qlx.eval as E


def _lb2(i, **kw):
    record = {
        "_id": f"id{i}",
        "domain": "Single-Document QA",
        "sub_domain": "x",
        "difficulty": "easy" if i % 2 else "hard",
        "length": ("short", "medium", "long")[i % 3],
        "question": f"Question {i}? $Q$",
        "choice_A": "alpha",
        "choice_B": "beta",
        "choice_C": "gamma",
        "choice_D": "delta",
        "answer": "ABCD"[i % 4],
        "context": f"  Doc {i} quoting $C_A$ and $Q$.  ",
    }
    record.update(kw)
    return record


def test_longbench_v2_data_json(tmp_path):
    records = [_lb2(0), _lb2(1, answer="E"), _lb2(2), {k: v for k, v in _lb2(3).items() if k != "context"}, _lb2(0)]
    (tmp_path / "data.json").write_text(json.dumps(records, indent=2))
    loaded = E.module("longbench_v2").load(tmp_path)
    assert [it.id for it in loaded.items] == ["id0", "id2"]
    assert [it.split for it in loaded.items] == [
        {"difficulty": "hard", "length": "short"},
        {"difficulty": "hard", "length": "long"},
    ]
    text = (tmp_path / "data.json").read_text().splitlines()
    assert len(loaded.problems) == 3
    for problem, key in zip(loaded.problems, ("'answer'", "'context'", "duplicate id 'id0'"), strict=True):
        path, line = problem.split(":")[:2]
        assert path.endswith("data.json") and text[int(line) - 1].strip() == "{" and key in problem
    user = E.module("longbench_v2").messages(loaded.items[0].record, "official")[0]["content"]
    assert "<text>\nDoc 0 quoting $C_A$ and $Q$.\n</text>" in user  # stripped, inserted verbatim (one pass)
    assert "What is the correct answer to this question: Question 0? $Q$\nChoices:\n(A) alpha\n" in user
    assert user.endswith('Format your response as follows: "The correct answer is (insert answer here)".')
    ql = E.module("longbench_v2").messages(loaded.items[0].record, "ql")[0]["content"]
    assert ql.endswith('Format your answer as follows: "The correct answer is (insert answer here)."')


def test_mrcr_jsonl(tmp_path):
    conv = [{"role": "user", "content": "write a poem about tapirs"}, {"role": "assistant", "content": "tapir poem"}]
    conv += [{"role": "user", "content": "Prepend AbC123 to the 1st poem about tapirs."}]
    good = {"prompt": json.dumps(conv), "answer": "AbC123tapir poem", "random_string_to_prepend": "AbC123"}
    good.update(n_needles=2, desired_msg_index=1, total_messages=3, n_chars=40)
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "prompt": "[1, 2]"}),
        json.dumps({**good, "n_needles": "2"}),
    ]
    lines += [json.dumps({**good, "answer": "tapir poem"})]
    (tmp_path / "2needle.jsonl").write_text("\n".join(lines) + "\n")
    loaded = E.module("mrcr").load(tmp_path)
    assert len(loaded.items) == 1 and loaded.items[0].split == {"n_needles": "2"}
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in loaded.problems] == ["2", "3", "4", "5"]
    assert "not JSON" in loaded.problems[0] and "'n_needles' must be int" in loaded.problems[2]
    assert E.module("mrcr").messages(loaded.items[0].record, "ql") == conv


def test_mrcr_parquet_release_layout(tmp_path):
    """The Dec-2025 layout ({k}needle/{k}needle_{0,1}.parquet): rows read with their place ("file:row N")."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    conv = [{"role": "user", "content": "write a poem"}, {"role": "user", "content": "Prepend Zz9 to the 1st poem."}]
    row = {"prompt": json.dumps(conv), "answer": "Zz9 a poem", "random_string_to_prepend": "Zz9", "n_needles": 2}
    (tmp_path / "2needle").mkdir()
    pq.write_table(pa.Table.from_pylist([row, {**row, "answer": "no prefix"}]), tmp_path / "2needle/2needle_0.parquet")
    pq.write_table(pa.Table.from_pylist([{**row, "answer": "Zz9 another"}]), tmp_path / "2needle/2needle_1.parquet")
    loaded = E.module("mrcr").load(tmp_path)
    assert len(loaded.items) == 2 and E.module("mrcr").messages(loaded.items[0].record, "ql") == conv
    assert len(loaded.problems) == 1 and "2needle_0.parquet:row 1" in loaded.problems[0]


def test_docmath_testmini_files(tmp_path):
    rec = {"question_id": "q1", "question": "What?", "paragraphs": ["p1", "| a | b |"], "ground_truth": 1.5}
    (tmp_path / "complong_testmini.json").write_text(
        json.dumps([rec, {**rec, "question_id": "q2", "ground_truth": "x"}])
    )
    (tmp_path / "simpshort-testmini.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "simplong_test.json").write_text(json.dumps([{k: v for k, v in rec.items() if k != "ground_truth"}]))
    loaded = E.module("docmath").load(tmp_path)
    assert sorted(it.id for it in loaded.items) == ["complong/q1", "simpshort/q1"]
    assert len(loaded.problems) == 2
    assert any("simplong_test.json:1" in p and "hides its answers" in p for p in loaded.problems)
    assert any("complong_testmini.json:1" in p and "'ground_truth' must be a number" in p for p in loaded.problems)
    official = E.module("docmath").messages(loaded.items[0].record, "official")
    assert official[0]["role"] == "system" and official[1]["content"].startswith("p1\n| a | b |\n\nQuestion: What?")


def test_frames_tsv_and_processed_jsonl(tmp_path):
    with open(tmp_path / "test.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["Unnamed: 0", "Prompt", "Answer", "wikipedia_link_1", "reasoning_types", "wiki_links"])
        writer.writerow(["0", "Who?", "Ada", "https://en.wikipedia.org/wiki/Ada", "Temporal | Numerical", "[]"])
        writer.writerow(["1", "Where?"])
    loaded = E.module("frames").load(tmp_path / "test.tsv")
    assert [it.id for it in loaded.items] == ["0"] and loaded.items[0].split == {"reasoning_type": "Temporal"}
    assert len(loaded.problems) == 1 and "test.tsv:3" in loaded.problems[0]
    assert loaded.notes and "no article text" in loaded.notes[0]
    wiki = [{"title": "Ada_Lovelace", "text": "Ada was a mathematician."}, {"title": "B", "text": "b"}]
    rows = [{"Unnamed: 0": 0, "Prompt": "Who?", "Answer": "Ada", "wiki_items": wiki}, {"Unnamed: 0": 1, "Prompt": 3}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loaded = E.module("frames").load(tmp_path)
    assert len(loaded.items) == 1 and len(loaded.problems) == 1 and not loaded.notes
    user = E.module("frames").messages(loaded.items[0].record, "ql")[0]["content"]
    assert "<text>\nAda_Lovelace\nAda was a mathematician.\nB\nb\n</text>\n\nQuestion: Who?" in user


def test_corpusqa_jsonl(tmp_path):
    prompt = [{"role": "user", "content": "# Document 1:\n...\n# Question:\nWhich?"}]
    rows = [{"id": "financial_en_1", "prompt": prompt, "question": "Which?", "answer": "[]"}]
    rows += [{"id": "real_estate_en_2", "prompt": "not a list", "question": "q", "answer": "1"}]
    rows += [{"prompt": prompt, "question": "q", "answer": "1"}]
    (tmp_path / "128k_4domains.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loaded = E.module("corpusqa").load(tmp_path)
    assert [(it.id, it.split["domain"]) for it in loaded.items] == [("financial_en_1", "financial_en")]
    assert len(loaded.problems) == 2 and "missing key 'id'" in loaded.problems[1]
    assert E.module("corpusqa").messages(loaded.items[0].record, "official") == prompt


def test_longbench_v1_jsonl(tmp_path):
    rec = {"input": "Who?", "context": "Passage 1: Ada.", "answers": ["Ada"], "length": 3, "dataset": "hotpotqa"}
    rec.update(language="en", all_classes=None, _id="h1")
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "answers": []}) + "\n")
    (tmp_path / "qasper.jsonl").write_text(json.dumps({**rec, "_id": "q1", "dataset": "qasper"}) + "\n")
    (tmp_path / "hotpotqa_e.jsonl").write_text(json.dumps({**rec, "_id": "e1"}) + "\n")
    loaded = E.module("longbench_v1_qa").load(tmp_path)
    assert [it.id for it in loaded.items] == ["hotpotqa/h1", "qasper/q1"]
    assert len(loaded.problems) == 1 and "hotpotqa.jsonl:2" in loaded.problems[0]
    assert len(loaded.notes) == 3  # 2wikimqa, musique, narrativeqa missing
    official = E.module("longbench_v1_qa").messages(loaded.items[1].record, "official")[0]["content"]
    assert official.startswith("You are given a scientific article") and "\n\n Answer the question based" in official
    with pytest.raises(FileNotFoundError, match="none of"):
        E.module("longbench_v1_qa").load(tmp_path / "nothing")
