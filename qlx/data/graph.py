"""A cross-document knowledge graph of atomic facts, and reasoning-path sampling over it (random walk and BFS).

Only *functional* edges are walked: ``(subject, relation)`` pairs that the documents give exactly one object, so every
step of a path — and so the answer of a question composed from it — is unambiguous. Qualified facts (table cells) are
left to the SQL store. A path's facts can be assigned to pairwise different documents (:meth:`assign_documents`).
"""

import random
from collections import defaultdict
from collections.abc import Iterable

from qlx.data.documents import Fact

Triple = tuple[str, str, str]


class KnowledgeGraph:
    def __init__(self, facts: Iterable[Fact], kinds: dict[str, str] | None = None):
        """``kinds`` maps entity names to kinds (world generator); without it, an entity is any fact subject."""
        self.mentions: dict[Triple, list[Fact]] = defaultdict(list)
        objects: dict[tuple[str, str], set[str]] = defaultdict(set)
        for fact in facts:
            if fact.qualifiers:
                continue
            self.mentions[(fact.subject, fact.relation, fact.object)].append(fact)
            objects[(fact.subject, fact.relation)].add(fact.object)
        self.kinds = dict(kinds) if kinds is not None else {s: "entity" for s, _ in objects}
        self.out: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for (subject, relation), objs in objects.items():
            if len(objs) == 1:
                self.out[subject].append((relation, next(iter(objs))))
        self.entities = sorted(self.out)

    def is_entity(self, name: str) -> bool:
        return name in self.kinds

    def value(self, subject: str, relation: str) -> str | None:
        """The object of a functional edge, or ``None``."""
        return next((o for r, o in self.out.get(subject, ()) if r == relation), None)

    def random_walk(
        self, rng: random.Random, start: str, hops: int, *, relations=None, literal_end: bool = True
    ) -> list[Triple] | None:
        """A path of exactly ``hops`` functional edges from ``start`` visiting no node twice; only the last edge may
        end in a literal (if ``literal_end``). ``relations`` optionally restricts the first edge's relation."""
        path: list[Triple] = []
        seen = {start}
        node = start
        for step in range(hops):
            last = literal_end and step == hops - 1
            edges = [
                (r, o)
                for r, o in self.out.get(node, ())
                if o not in seen and (last or self.is_entity(o)) and (step > 0 or relations is None or r in relations)
            ]
            if not edges:
                return None
            relation, node = rng.choice(edges)
            path.append((path[-1][2] if path else start, relation, node))
            seen.add(node)
        return path

    def bfs_path(self, rng: random.Random, start: str, hops: int, *, max_frontier: int = 2000) -> list[Triple] | None:
        """A uniformly chosen simple path of exactly ``hops`` edges among those found breadth-first from ``start``."""
        frontier: list[list[Triple]] = [[]]
        for step in range(hops):
            last = step == hops - 1
            grown = []
            for path in frontier:
                node = path[-1][2] if path else start
                visited = {start, *(t[2] for t in path)}
                for relation, obj in self.out.get(node, ()):
                    if obj not in visited and (last or self.is_entity(obj)):
                        grown.append([*path, (node, relation, obj)])
            if not grown:
                return None
            frontier = grown if len(grown) <= max_frontier else rng.sample(grown, max_frontier)
        return rng.choice(frontier)

    def assign_documents(
        self, rng: random.Random, triples: list[Triple], *, cost=None, budget: int | None = None
    ) -> list[Fact] | None:
        """One mention per triple, all in different documents (``None`` if impossible); with ``cost(doc_id)`` and
        ``budget``, the documents' total cost must stay within the budget (smallest documents tried first)."""
        options = []
        for triple in triples:
            facts = list(self.mentions.get(triple, ()))
            if not facts:
                return None
            rng.shuffle(facts)
            if cost is not None:
                facts.sort(key=lambda f: cost(f.doc_id))
            options.append(facts)
        chosen: list[Fact] = []

        def search(i: int, spent: int) -> bool:
            if i == len(options):
                return True
            used = {f.doc_id for f in chosen}
            for fact in options[i][:8]:
                extra = cost(fact.doc_id) if cost is not None else 0
                if fact.doc_id in used or (budget is not None and spent + extra > budget):
                    continue
                chosen.append(fact)
                if search(i + 1, spent + extra):
                    return True
                chosen.pop()
            return False

        return chosen if search(0, 0) else None
