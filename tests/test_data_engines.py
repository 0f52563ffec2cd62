"""Engines: every answer re-derived from the world's structured data by code independent of the engines."""

import random
from collections import defaultdict

import pytest

from qlx.data.engines.dialogue import DialogueEngine
from qlx.data.engines.kg import KGEngine
from qlx.data.engines.mc import MCEngine
from qlx.data.engines.table import TableEngine
from qlx.data.sources import world_source
from qlx.data.tokenizer import train_bpe_tokenizer
from qlx.data.world import SECTORS, generate_world

SEED, ORGS = 3, 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    world = generate_world(SEED, ORGS)
    tok = train_bpe_tokenizer([e.name + " was founded in 1990." for e in world.entities.values()], vocab_size=600)
    source = world_source(SEED, tok, tmp_path_factory.mktemp("world"), n_orgs=ORGS)
    return world, source


def _attr(world, name, relation):
    return str(world.entities[name].attrs[relation])


def _follow(world, facts, chain, start=None):
    """The world's value at the end of the chain's relations (the facts give only the relations walked)."""
    node = start if start is not None else facts[chain[0]].subject
    for i in chain:
        node = _attr(world, node, facts[i].relation)
    return node


def _period_of(year):
    return ("early" if year % 10 <= 3 else "mid" if year % 10 <= 6 else "late", year // 10 * 10)


def _kg_answer(world, p, facts):
    if p["op"] == "chain":
        for i in p["describe"]:
            fact = facts[i]
            assert fact.subject == p["start"] and _attr(world, fact.subject, fact.relation) == fact.object
        if p["describe"]:
            start = world.entities[p["start"]]
            same = [
                e
                for e in world.of_kind(start.kind)
                if all(
                    (_period_of(int(e.attrs.get(f.relation, 0))) == _period_of(int(f.object)))
                    if f.relation in ("founded_year", "birth_year")
                    else (str(e.attrs.get(f.relation)) == f.object)
                    for f in (facts[i] for i in p["describe"])
                    if f.relation != "population"
                )
            ]
            if start.kind != "city":
                assert same == [start], "the obfuscated description must fit only the start entity"
        return _follow(world, facts, p["chain"], p["start"])
    if p["op"] == "year_diff":
        a, b = (int(_follow(world, facts, chain)) for chain in p["chains"])
        return str(abs(a + p["shift"] - b))
    ends = [
        _follow(world, facts, ch) if ch else facts[v].subject for ch, v in zip(p["chains"], p["values"], strict=True)
    ]
    relation = facts[p["values"][0]].relation
    values = [float(world.entities[e].attrs[relation]) for e in ends]
    return ends[values.index(max(values) if p["better"] == "max" else min(values))]


def test_kg_questions_follow_from_the_world(setup):
    world, source = setup
    engine = KGEngine(source.kg, max_hops=4, obfuscate_p=0.5)
    seen = defaultdict(int)
    for i in range(300):
        rng = random.Random(i)
        task_type = "reading" if i % 3 == 0 else "multihop"
        c = engine.propose(rng, task_type, cost=source.docs.tokens, budget=10_000)
        if c is None:
            continue
        seen[(c.task_type, c.paradigm)] += 1
        if c.paradigm == "hypothetical":
            shift = c.program["shift"]
            assert shift != 0 and f"had been {abs(shift)} years {'later' if shift > 0 else 'earlier'}" in c.question
        elif c.program["op"] == "year_diff":
            assert c.program["shift"] == 0 and c.question.startswith("How many years passed")
        seen["described"] += bool(c.program.get("describe"))
        assert c.task_type == ("reading" if c.hops == 1 else "multihop")
        assert c.answer == _kg_answer(world, c.program, c.facts), c.question
        path = [c.facts[i] for i in range(c.hops)]
        assert len({f.doc_id for f in path}) == len(path), "path facts must sit in different documents"
        assert set(c.evidence) == {f.doc_id for f in c.facts}
        assert sum(source.docs.tokens(d) for d in c.evidence) <= 10_000
    for key in [("reading", "multifact"), ("reading", "causal"), ("multihop", "multifact"), ("multihop", "temporal")]:
        assert seen[key] > 3, dict(seen)
    assert seen[("multihop", "comparison")] > 3 and seen[("multihop", "causal")] > 3, dict(seen)
    assert seen[("multihop", "hypothetical")] > 3, dict(seen)
    assert seen["described"] > 10, dict(seen)


def _table_answer(world, p):
    """Pure-Python recomputation from the world's financial rows."""
    role = {"org": "org", "year": "year", "segment": "segment"}
    values = defaultdict(int)
    for row in world.financials:
        if all(getattr(row, role[k]) == v for k, v in p["filters"].items()) and getattr(row, p["axis"]) in p["groups"]:
            values[getattr(row, p["axis"])] += getattr(row, p["measure"])
    v = [values[g] for g in p["groups"]]
    op = p["op"]
    if op == "sum":
        return str(sum(v))
    if op == "mean":
        return "%.2f" % (sum(v) / len(v))
    if op == "difference":
        return str(v[1] - v[0])
    if op == "growth":
        return "%.2f" % ((v[1] - v[0]) * 100.0 / v[0])
    if op == "ranking":
        return ", ".join(g for _, g in sorted(zip(v, p["groups"], strict=True), reverse=True))
    if op == "count":
        return str(sum(x > p["threshold"] for x in v))
    if op == "hypothetical":
        scaled = [
            x * (100 + p["percent"]) / 100 if g == p["changed"] else x for g, x in zip(p["groups"], v, strict=True)
        ]
        return f"{sum(scaled):.2f}"
    return str(p["groups"][v.index(max(v))])


def test_table_answers_equal_python_recomputation(setup):
    world, source = setup
    engine = TableEngine(source.sql)
    ops = defaultdict(int)
    for i in range(150):
        c = engine.propose(random.Random(i), cost=source.docs.tokens, budget=20_000)
        if c is None:
            continue
        ops[c.program["op"]] += 1
        assert c.answer == _table_answer(world, c.program), c.question
        if c.program["op"] == "hypothetical":
            p = c.program
            change = f"{abs(p['percent'])}% {'higher' if p['percent'] > 0 else 'lower'}"
            assert c.question.startswith("If the ") and str(p["changed"]) in c.question and change in c.question
            assert p["changed"] in p["groups"], c.question
        for fact in c.facts:
            q = dict(fact.qualifiers)
            (row,) = [r for r in world.financials if (r.org, r.year, r.segment) == (q["org"], q["year"], q["segment"])]
            assert str(getattr(row, fact.relation)) == fact.object
    assert set(ops) == {"sum", "mean", "difference", "growth", "ranking", "count", "argmax", "hypothetical"}, dict(ops)


def test_multiple_choice_has_four_distinct_options_from_the_graph(setup):
    world, source = setup
    kg_engine = KGEngine(source.kg)
    engine = MCEngine(kg_engine, TableEngine(source.sql), source.confusable)
    made = 0
    for i in range(80):
        c = engine.propose(random.Random(i), cost=source.docs.tokens, budget=20_000)
        if c is None:
            continue
        made += 1
        assert len(c.options) == 4 and len(set(c.options)) == 4 and c.answer in "ABCD"
        inner = c.program["inner"]
        correct = _table_answer(world, inner) if "axis" in inner else _kg_answer(world, inner, c.facts)
        assert c.options["ABCD".index(c.answer)] == correct
        if correct in world.entities:
            assert {world.entities[o].kind for o in c.options if o in world.entities} == {world.entities[correct].kind}
        elif correct in SECTORS:
            assert set(c.options) <= set(SECTORS)
    assert made > 30


def test_dialogue_mrcr_and_niah(setup):
    world, source = setup
    engine = DialogueEngine(source.places, lambda texts: [len(t.split()) for t in texts])
    kinds = defaultdict(int)
    for i in range(40):
        c = engine.propose(random.Random(i))
        kinds[c.paradigm] += 1
        assert c.task_type == "dialogue"
        if c.paradigm == "mrcr":
            prefix, index = c.program["prefix"], c.program["index"]
            responses = [p.text.split("\nAssistant: ", 1)[1] for p in c.evidence]
            assert c.answer == prefix + responses[index]
            assert len(set(responses)) == len(responses) == c.hops
        else:
            place = c.question.split("for the ")[1].split(" archive")[0]
            (needle,) = [p.text for p in c.evidence if f"for the {place} archive is" in p.text]
            assert needle.split(" archive is ")[1].split(".")[0] == c.answer
    assert kinds["mrcr"] > 5 and kinds["niah"] > 5
