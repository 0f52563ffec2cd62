"""Sources deconstructed for synthesis: the document pool (on disk, tokenized once), the knowledge graph of atomic
facts, and the SQL store of tables — from the built-in world generator or from a user corpus."""

import dataclasses
import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qlx.data.corpus import load_corpus
from qlx.data.docstore import DocStore
from qlx.data.documents import Document, Fact
from qlx.data.extract import extract_facts
from qlx.data.graph import KnowledgeGraph
from qlx.data.llm import ChatClient
from qlx.data.render import render_world
from qlx.data.tables import SqlStore
from qlx.data.tokenizer import Tokenizer
from qlx.data.world import generate_world

TOKENS_PER_ORG_GUESS = 2000
_BATCH = 512


@dataclasses.dataclass
class Source:
    origin: dict
    docs: DocStore
    kg: KnowledgeGraph | None
    sql: SqlStore
    confusable: dict[str, list[str]]
    """name -> near-duplicate names."""
    docs_about: dict[str, list[str]]
    """name -> ids of the documents about it."""
    places: list[str]
    problems: list[str]


def _fill_store(store: DocStore, docs: Iterable[Document]) -> tuple[list[Fact], list[Document], dict[str, list[str]]]:
    """Add documents in batches; keep their facts, their tables (text dropped) and who they are about.

    Each batch is tokenized and written on a worker thread (the tokenizer releases the GIL) while the next batch is
    being produced, with at most one batch in flight."""
    facts: list[Fact] = []
    with_tables: list[Document] = []
    about: dict[str, list[str]] = {}
    batch: list[Document] = []
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = None

        def flush():
            nonlocal pending
            if pending is not None:
                pending.result()
            pending = worker.submit(store.add, [(d.doc_id, d.text, d.mentions) for d in batch])
            for d in batch:
                facts.extend(d.facts)
                if d.tables:
                    with_tables.append(Document(d.doc_id, d.title, "", d.kind, tables=d.tables))
                for name in d.mentions:
                    about.setdefault(name, []).append(d.doc_id)
            batch.clear()

        for doc in docs:
            batch.append(doc)
            if len(batch) == _BATCH:
                flush()
        if batch:
            flush()
        if pending is not None:
            pending.result()
    store.close()
    return facts, with_tables, about


def world_source(
    seed: int,
    tokenizer: Tokenizer,
    workdir: str | Path,
    *,
    min_pool_tokens: int = 0,
    n_orgs: int | None = None,
    brief: bool = False,
) -> Source:
    """The world of ``seed``; without ``n_orgs``, large enough that its documents hold ``min_pool_tokens`` tokens."""
    n = n_orgs or max(40, math.ceil(min_pool_tokens / TOKENS_PER_ORG_GUESS))
    while True:
        world = generate_world(seed, n)
        store = DocStore(Path(workdir) / f"world-{seed}-{n}{'-brief' if brief else ''}.docs", tokenizer)
        facts, with_tables, about = _fill_store(store, render_world(world, brief=brief))
        if n_orgs is not None or store.total_tokens >= min_pool_tokens:
            break
        n = math.ceil(n * 1.1 * min_pool_tokens / max(store.total_tokens, 1))
    kg = KnowledgeGraph(facts, kinds={name: e.kind for name, e in world.entities.items()})
    origin = {"kind": "world", "seed": seed, "n_orgs": n, "brief": brief}
    places = [e.name for e in world.of_kind("city")]
    return Source(origin, store, kg, SqlStore.from_documents(with_tables), world.twins, about, places, [])


def corpus_source(
    path: str | Path, tokenizer: Tokenizer, workdir: str | Path, *, client: ChatClient | None = None
) -> Source:
    """A user corpus: tables parsed from markdown/CSV; facts extracted by the LLM behind ``client`` when given."""
    corpus = load_corpus(path)
    problems = [str(p) for p in corpus.problems]
    facts: list[Fact] = []
    if client is not None:
        for doc in corpus.documents:
            doc_facts, doc_problems = extract_facts(client, doc)
            facts += doc_facts
            problems += doc_problems
    sql = SqlStore.from_documents(corpus.documents)
    problems += sql.skipped
    for doc in corpus.documents:
        doc.mentions = [doc.title]
    store = DocStore(Path(workdir) / "corpus.docs", tokenizer)
    _fill_store(store, corpus.documents)
    kg = KnowledgeGraph(facts) if facts else None
    places = sorted({f.subject for f in facts}) or [d.title for d in corpus.documents]
    origin = {"kind": "corpus", "path": str(path), "documents": len(corpus.documents)}
    about = {d.title: [d.doc_id] for d in corpus.documents}
    return Source(origin, store, kg, sql, {}, about, places, problems)
