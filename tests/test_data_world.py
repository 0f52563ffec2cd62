"""The world generator, its rendered documents, fact spans, table parsing and the SQL store."""

import random

import pytest

from qlx.data.documents import Document
from qlx.data.graph import KnowledgeGraph
from qlx.data.render import render_world
from qlx.data.tables import SqlStore, parse_csv_table, parse_document_tables, parse_markdown_tables, parse_number
from qlx.data.world import RELATIONS, generate_world


@pytest.fixture(scope="module")
def world():
    return generate_world(5, 30)


@pytest.fixture(scope="module")
def docs(world):
    return list(render_world(world))


def test_same_seed_same_world_and_documents(world, docs):
    again = list(render_world(generate_world(5, 30)))
    assert [(d.doc_id, d.text) for d in again] == [(d.doc_id, d.text) for d in docs]
    other = list(render_world(generate_world(6, 30)))
    assert {d.title for d in other}.isdisjoint({d.title for d in docs if d.kind == "biography"})


def test_document_styles_and_near_duplicates(world, docs):
    assert {d.kind for d in docs} == {"biography", "profile", "news", "report", "transcript", "gazetteer"}
    assert any("|---|" in d.text for d in docs if d.kind == "report")
    pairs = [(a, b) for a, twins in world.twins.items() for b in twins]
    assert pairs and all(a != b and world.entities[a].kind == world.entities[b].kind for a, b in pairs)


def test_every_fact_is_in_its_span_and_true_in_the_world(world, docs):
    rows = {(r.org, r.year, r.segment): r for r in world.financials}
    n_facts = 0
    for doc in docs:
        for fact in doc.facts:
            n_facts += 1
            assert fact.doc_id == doc.doc_id
            assert fact.object in doc.text[fact.start : fact.end], fact
            if fact.qualifiers:
                q = dict(fact.qualifiers)
                assert str(getattr(rows[(fact.subject, q["year"], q["segment"])], fact.relation)) == fact.object
            else:
                assert fact.relation in RELATIONS
                assert str(world.entities[fact.subject].attrs[fact.relation]) == fact.object, fact
    assert n_facts > 500
    relations = {f.relation for d in docs for f in d.facts if not f.qualifiers}
    assert relations == set(RELATIONS)


def test_knowledge_graph_edges_are_functional_and_cross_document(world, docs):
    kg = KnowledgeGraph([f for d in docs for f in d.facts], kinds={n: e.kind for n, e in world.entities.items()})
    for subject, edges in kg.out.items():
        for relation, obj in edges:
            assert str(world.entities[subject].attrs[relation]) == obj
    rng = random.Random(0)
    starts = [e for e in kg.entities if kg.out[e]]
    found = 0
    for _ in range(200):
        path = kg.random_walk(rng, rng.choice(starts), 3)
        if path is None:
            continue
        for (_, _, o), (s2, _, _) in zip(path, path[1:], strict=False):
            assert o == s2
        facts = kg.assign_documents(rng, path)
        if facts is not None:
            found += 1
            assert len({f.doc_id for f in facts}) == 3
    assert found > 20
    path = kg.bfs_path(rng, starts[0], 2)
    assert path is None or (len(path) == 2 and path[0][0] == starts[0] and path[0][2] == path[1][0])


def test_rendered_report_tables_reparse_to_the_financials(world, docs):
    parsed = set()
    for doc in docs:
        if doc.kind != "report":
            continue
        (table,) = parse_markdown_tables(doc.text)
        assert table.header == ["Segment", "Revenue", "Operating expenses"]
        org, year = doc.title.rsplit(" Annual Report ", 1)
        for row, spans in zip(table.rows, table.cell_spans, strict=True):
            assert [doc.text[a:b] for a, b in spans] == row
            parsed.add((org, int(year), row[0], int(row[1]), int(row[2])))
    want = {(r.org, r.year, r.segment, r.revenue, r.operating_expenses) for r in world.financials}
    assert parsed == want


def test_sql_store_sums_match_python(world, docs):
    sql = SqlStore.from_documents(d for d in docs if d.tables)
    (view,) = sql.views
    assert (view.entity, view.period, view.dimension) == ("org", "year", "segment")
    assert set(view.measures) == {"revenue", "operating_expenses"}
    rng = random.Random(1)
    for row in rng.sample(world.financials, 10):
        want = sum(r.revenue for r in world.financials if r.org == row.org and r.year == row.year)
        (got,) = sql.query(f"SELECT SUM(revenue) FROM {view.name} WHERE org = ? AND year = ?", [row.org, row.year])
        assert got[0] == want


def test_markdown_and_csv_parsing_of_user_tables():
    text = (
        "Results\n\n| Region | Sales | Change |\n| :--- | ---: | --- |\n| North | 1,250 | (30) |\n"
        '| South | 980.5 | 4.5% |\n\nAfter.\n\n```csv\nname,score\n"Lee, A",7\nKim,9\n```\n'
    )
    doc = Document("a.md", "Results", text)
    md, csv_table = parse_document_tables(doc)
    assert md.rows == [["North", "1,250", "(30)"], ["South", "980.5", "4.5%"]]
    assert [parse_number(c) for c in ("1,250", "(30)", "980.5", "4.5%", "North", "")] == [
        1250,
        -30,
        980.5,
        4.5,
        None,
        None,
    ]
    assert [[text[a:b] for a, b in spans] for spans in md.cell_spans] == md.rows
    assert csv_table.header == ["name", "score"] and csv_table.rows == [["Lee, A", "7"], ["Kim", "9"]]
    assert [[text[a:b] for a, b in spans] for spans in csv_table.cell_spans] == csv_table.rows
    assert parse_csv_table("just one line") is None
