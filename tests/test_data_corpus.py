"""User corpora: loading with every bad line reported as file:line, tables unified across documents, and table
questions whose answers equal a pure-Python recomputation from the tables as written."""

import json
import random
from collections import defaultdict

import pytest

from qlx.data.corpus import load_corpus
from qlx.data.engines.table import TableEngine
from qlx.data.records import read_jsonl
from qlx.data.synth import SynthConfig, synthesize
from qlx.data.tables import SqlStore
from qlx.data.tokenizer import train_bpe_tokenizer


def _report(name: str, rows) -> str:
    lines = [
        f"# {name} yearly figures",
        "",
        "Figures by region.",
        "",
        "| Region | Year | Sales | Costs |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r} | {y} | {s:,} | {c:,} |" for r, y, s, c in rows]
    return "\n".join(lines + ["", "End of report."]) + "\n"


@pytest.fixture()
def corpus_dir(tmp_path):
    rng = random.Random(7)
    tables = {}
    for name in ("Northwind", "Eastgate", "Southmere"):
        rows = [
            (r, y, rng.randint(1000, 90_000), rng.randint(500, 60_000))
            for y in (2020, 2021, 2022)
            for r in ("North", "South")
        ]
        tables[name] = rows
        (tmp_path / f"{name.lower()}.md").write_text(_report(name, rows))
    (tmp_path / "scores.csv").write_text('name,score\n"Lee, A",7\nKim,9\n')
    (tmp_path / "notes.txt").write_text("Plain notes without tables.\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    lines = [
        json.dumps({"id": "j1", "title": "First", "text": "Some text."}),
        '{"id": "j2", "title": "Broken", "text": ',
        json.dumps({"id": "j3", "title": "No text"}),
        "",
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "j1", "title": "Again", "text": "Duplicate id."}),
        json.dumps({"id": "j4", "title": "Last", "text": "More text."}),
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path, tables


def test_malformed_lines_are_reported_with_file_and_line(corpus_dir):
    path, _ = corpus_dir
    corpus = load_corpus(path)
    assert [d.doc_id for d in corpus.documents] == [
        "j1",
        "j4",
        "eastgate.md",
        "northwind.md",
        "notes.txt",
        "scores.csv",
        "southmere.md",
    ]
    problems = [str(p) for p in corpus.problems]
    jsonl = str(path / "docs.jsonl")
    assert problems[0] == f"{jsonl}:2: invalid JSON (Expecting value)"
    assert problems[1] == f"{jsonl}:3: keys ['text'] missing or not strings"
    assert problems[2] == f"{jsonl}:5: expected a JSON object, got list"
    assert any("image.png" in p and "unsupported" in p for p in problems)
    assert any("duplicate document id 'j1'" in p for p in problems)
    assert len(problems) == 5
    assert next(d for d in corpus.documents if d.doc_id == "northwind.md").title == "Northwind yearly figures"
    with pytest.raises(FileNotFoundError, match="not found"):
        load_corpus(path / "missing")


def test_corpus_tables_are_unified_and_answers_match_python(corpus_dir):
    path, tables = corpus_dir
    sql = SqlStore.from_documents(load_corpus(path).documents)
    view = next(v for v in sql.views if "sales" in v.measures)
    assert (view.entity, view.period, view.dimension) == ("doc_title", "year", "region")
    by_title = {f"{name} yearly figures": rows for name, rows in tables.items()}
    engine = TableEngine(sql)
    checked = 0
    for i in range(60):
        c = engine.propose(random.Random(i))
        if c is None or "sales" not in c.program["measure"] and "costs" not in c.program["measure"]:
            continue
        p = c.program
        values = defaultdict(int)
        for title, rows in by_title.items():
            for region, year, sales, costs in rows:
                row = {"doc_title": title, "year": year, "region": region}
                if all(row[k] == v for k, v in p["filters"].items()) and row[p["axis"]] in p["groups"]:
                    values[row[p["axis"]]] += sales if p["measure"] == "sales" else costs
        v = [values[g] for g in p["groups"]]
        want = {
            "sum": str(sum(v)),
            "mean": f"{sum(v) / len(v):.2f}",
            "difference": str(v[1] - v[0]),
            "growth": f"{(v[1] - v[0]) * 100.0 / v[0]:.2f}",
            "ranking": ", ".join(str(g) for _, g in sorted(zip(v, p["groups"], strict=True), reverse=True)),
            "count": str(sum(x > (p["threshold"] or 0) for x in v)),
            "argmax": str(p["groups"][v.index(max(v))]),
        }.get(p["op"])
        if p["op"] == "hypothetical":
            changed = v[p["groups"].index(p["changed"])]
            want = f"{sum(v) - changed + changed * (100 + p['percent']) / 100:.2f}"
        assert c.answer == want, c.question
        checked += 1
    assert checked > 20


def test_synthesis_over_a_corpus_counts_its_problems(corpus_dir, tmp_path):
    path, _ = corpus_dir
    tok = train_bpe_tokenizer([p.read_text() for p in path.glob("*.md")] * 5, vocab_size=400)
    out = tmp_path / "out"
    config = SynthConfig(engine="table", n=4, min_tokens=200, max_tokens=400, seed=0, corpus=str(path))
    card = synthesize(config, out, tokenizer=tok, progress=False)
    records = list(read_jsonl(out / "records.jsonl"))
    assert len(records) == 4 and all(r.task_type == "numerical" for r in records)
    assert card["dropped"]["source_problems"] == 5
    assert any(p.endswith("docs.jsonl:2: invalid JSON (Expecting value)") for p in card["problem_examples"])
    with pytest.raises(ValueError, match="knowledge graph"):
        synthesize(
            SynthConfig(engine="kg", n=2, min_tokens=200, max_tokens=400, corpus=str(path)),
            tmp_path / "kg",
            tokenizer=tok,
            progress=False,
        )


def test_a_pool_smaller_than_the_longest_context_is_refused(corpus_dir, tmp_path):
    path, _ = corpus_dir
    tok = train_bpe_tokenizer([p.read_text() for p in path.glob("*.md")], vocab_size=300)
    with pytest.raises(ValueError, match="fewer than --max-tokens 8192"):
        synthesize(SynthConfig(engine="table", n=2, corpus=str(path)), tmp_path, tokenizer=tok, progress=False)
