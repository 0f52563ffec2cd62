"""End-to-end synthesis: determinism, shards equal a single run, lengths, independent answer checks, CLI and card."""

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from qlx.cli import main as cli_main
from qlx.data.records import TASK_TYPES, read_context, read_jsonl
from qlx.data.synth import SynthConfig, default_tokenizer, synthesize
from qlx.data.world import generate_world


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(0)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("single")
    config = SynthConfig(n=25, min_tokens=1024, max_tokens=12_000, seed=4, inline_max_tokens=4096)
    card = synthesize(config, out, tokenizer=tok, progress=False)
    return out, list(read_jsonl(out / "records.jsonl")), card


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_same_seed_same_records_and_other_seed_differs(single_run, tok, tmp_path):
    out, records, _ = single_run
    config = SynthConfig(n=25, min_tokens=1024, max_tokens=12_000, seed=4, inline_max_tokens=4096)
    synthesize(config, tmp_path / "again", tokenizer=tok, progress=False)
    assert _lines(tmp_path / "again" / "records.jsonl") == _lines(out / "records.jsonl")
    for record in records:
        if record.context_ref is not None:
            a = (out / record.context_ref["path"]).read_bytes()
            assert a == (tmp_path / "again" / record.context_ref["path"]).read_bytes()
    other = SynthConfig(n=5, min_tokens=1024, max_tokens=12_000, seed=5)
    synthesize(other, tmp_path / "other", tokenizer=tok, progress=False)
    assert {r.question for r in read_jsonl(tmp_path / "other" / "records.jsonl")}.isdisjoint(
        r.question for r in records
    )


def test_shards_reproduce_the_single_run_exactly(single_run, tok, tmp_path):
    out, records, _ = single_run
    lines = []
    for i in range(3):
        config = SynthConfig(
            n=25, min_tokens=1024, max_tokens=12_000, seed=4, inline_max_tokens=4096, shard_index=i, shard_count=3
        )
        synthesize(config, tmp_path, tokenizer=tok, progress=False)
        lines += _lines(tmp_path / f"records-{i:05d}-of-00003.jsonl")
    by_id = {json.loads(line)["id"]: line for line in lines}
    assert sorted(by_id) == sorted(r.id for r in records) and len(lines) == len(records)
    for line in _lines(out / "records.jsonl"):
        assert by_id[json.loads(line)["id"]] == line
    for record in records:
        if record.context_ref is not None:
            assert (tmp_path / record.context_ref["path"]).read_bytes() == (
                out / record.context_ref["path"]
            ).read_bytes()


def test_lengths_types_spans_and_table_answers(single_run, tok):
    out, records, card = single_run
    assert len(records) == 25 and card["records"] == 25 and card["dropped"].get("not_derivable", 0) == 0
    counts = Counter(r.task_type for r in records)
    assert set(counts) == set(TASK_TYPES) and max(counts.values()) - min(counts.values()) <= 1
    assert any(r.context_ref is not None for r in records) and any(r.context is not None for r in records)
    world = generate_world(4, records[0].source["origin"]["n_orgs"])
    financial = defaultdict(int)
    for row in world.financials:
        financial[(row.org, row.year, row.segment, "revenue")] = row.revenue
        financial[(row.org, row.year, row.segment, "operating_expenses")] = row.operating_expenses
    for record in records:
        context = read_context(record, out)
        target = record.source["target_tokens"]
        assert record.length_tokens == len(tok.encode(context))
        assert abs(record.length_tokens - target) <= 0.02 * target
        for fact in record.evidence["facts"]:
            assert fact["object"] in context[fact["char_start"] : fact["char_end"]]
        for doc in record.evidence["docs"]:
            piece = context[doc["char_start"] : doc["char_end"]]
            assert piece and len(tok.encode(context[: doc["char_start"]])) == doc["token_start"]
        program = record.evidence["program"]
        program = program.get("inner", program)
        if "axis" in program:
            values = defaultdict(int)
            for (org, year, segment, measure), value in financial.items():
                row = {"org": org, "year": year, "segment": segment}
                selected = all(row[k] == v for k, v in program["filters"].items())
                if measure == program["measure"] and selected and row[program["axis"]] in program["groups"]:
                    values[row[program["axis"]]] += value
            v = [values[g] for g in program["groups"]]
            want = {
                "sum": str(sum(v)),
                "mean": f"{sum(v) / len(v):.2f}",
                "difference": str(v[-1] - v[0]),
                "growth": f"{(v[-1] - v[0]) * 100.0 / v[0]:.2f}",
                "ranking": ", ".join(str(g) for _, g in sorted(zip(v, program["groups"], strict=True), reverse=True)),
                "count": str(sum(x > (program["threshold"] or 0) for x in v)),
                "argmax": str(program["groups"][v.index(max(v))]),
            }.get(program["op"])
            if program["op"] == "hypothetical":
                changed = v[program["groups"].index(program["changed"])]
                want = f"{sum(v) - changed + changed * (1 + program['percent'] / 100):.2f}"
            got = record.answer if record.options is None else record.options["ABCD".index(record.answer)]
            assert got == want, record.question


def test_card_files_and_cli_with_shards(single_run, tmp_path, capsys):
    out, records, card = single_run
    assert {"card.json", "card.md", "card_lengths.png"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "card.json").read_text())["task_types"] == dict(Counter(r.task_type for r in records))
    assert sum(b["count"] for b in card["length_histogram"]) == 25
    args = ["synth", "--engine", "kg", "--n", "6", "--min-tokens", "1024", "--max-tokens", "2048", "--seed", "2"]
    args += ["--out", str(tmp_path), "--quiet", "--array-record"]
    for shard in ("0/2", "1/2"):
        assert cli_main([*args, "--shard", shard]) == 0
    assert "# Dataset card" in capsys.readouterr().out
    assert cli_main(["synth", "--card", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "card.json").read_text())
    assert merged["records"] == 6 and merged["task_types"]["multihop"] + merged["task_types"]["reading"] == 6
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "records-00001-of-00002.array_record").is_file()
    assert cli_main(["synth", "--out", str(tmp_path), "--shard", "2/2"]) == 2
    assert "shard 2/2" in capsys.readouterr().err
