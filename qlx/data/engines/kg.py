"""Engine (a): knowledge-graph multi-hop questions — multi-fact, temporal, comparison, causal and hypothetical (a
temporal question asked as if one of its two years had been ``shift`` years later or earlier).

A reasoning path is sampled by random walk or BFS over functional edges; each of its facts is taken from a different
document. Relations become nested noun phrases ("the birthplace of the founder of the maker of the Zentra X5"), and the
start entity may be obfuscated by a description that only it satisfies ("the energy company founded in the late 1990s
and based in Lorvik"), whose facts join the evidence. Complexity is the number of hops.
"""

import random

from qlx.data.engines.base import Candidate, format_number, ordered_docs
from qlx.data.graph import KnowledgeGraph, Triple

PHRASES = {
    "born_in": "the birthplace of {}",
    "birth_year": "the birth year of {}",
    "works_for": "the employer of {}",
    "studied_at": "the university attended by {}",
    "headquartered_in": "the city where {} is based",
    "founded_year": "the founding year of {}",
    "founded_by": "the founder of {}",
    "led_by": "the head of {}",
    "acquired_by": "the company that acquired {}",
    "sector": "the business sector of {}",
    "made_by": "the maker of {}",
    "launch_year": "the launch year of {}",
    "price": "the price in credits of {}",
    "located_in": "the country in which {} lies",
    "population": "the population of {}",
    "capital": "the capital of {}",
    "took_place_in": "the city where {} took place",
    "event_year": "the year of {}",
    "involved": "the organisation involved in {}",
    "caused_by": "the event that caused {}",
}
YEAR_CLAUSES = {
    "birth_year": "{} was born",
    "founded_year": "{} was founded",
    "launch_year": "{} was launched",
    "event_year": "of {}",
}
NUMBER_RELATIONS = {"population", "price"}
COMPARABLE = {
    "city": ("population", "max", "city has the larger population"),
    "org": ("founded_year", "min", "organisation was founded earlier"),
    "person": ("birth_year", "min", "person was born earlier"),
    "product": ("price", "max", "product is more expensive"),
}
PARADIGMS = ("multifact", "temporal", "comparison", "causal", "hypothetical")
SHIFTS = (-10, -7, -5, -3, -2, 2, 3, 5, 7, 10)


def phrase(relation: str, inner: str) -> str:
    return PHRASES.get(relation, "the " + relation.replace("_", " ") + " of {}").format(inner)


def _period(year: int) -> str:
    part = "early" if year % 10 <= 3 else "mid" if year % 10 <= 6 else "late"
    return f"{part} {year // 10 * 10}s"


def _approx(n: int) -> str:
    digits = len(str(n)) - 2
    return str(round(n, -digits) if digits > 0 else n)


class KGEngine:
    """Proposes ``reading`` (one hop) and ``multihop`` (2..``max_hops``) questions over a knowledge graph."""

    def __init__(self, kg: KnowledgeGraph, *, max_hops: int = 4, obfuscate_p: float = 0.3):
        if max_hops < 2:
            raise ValueError(f"max_hops must be >= 2, got {max_hops}")
        self.kg, self.max_hops, self.obfuscate_p = kg, max_hops, obfuscate_p
        self.starts = [e for e in kg.entities if kg.out[e]]
        self.by_kind: dict[str, list[str]] = {}
        for name in self.starts:
            self.by_kind.setdefault(kg.kinds.get(name, "entity"), []).append(name)
        self.causes = [e for e in self.starts if kg.value(e, "caused_by") is not None]
        self._description_counts: dict[str, dict] = {}

    def display(self, name: str) -> str:
        return f"the {name}" if self.kg.kinds.get(name) == "product" else name

    def chain_text(self, start_text: str, triples: list[Triple]) -> str:
        for _, relation, _ in triples:
            start_text = phrase(relation, start_text)
        return start_text

    def propose(self, rng: random.Random, task_type: str, *, cost=None, budget: int | None = None) -> Candidate | None:
        if task_type == "reading":
            paradigm, hops = rng.choice(("multifact", "causal")), 1
        elif task_type == "multihop":
            paradigm, hops = rng.choice(PARADIGMS), rng.randint(2, self.max_hops)
        else:
            raise ValueError(f"the KG engine makes 'reading' and 'multihop' questions, not {task_type!r}")
        cost = cost or (lambda _doc_id: 0)
        if paradigm == "causal" and not self.causes:
            paradigm = "multifact"
        make = {"multifact": self._chain, "causal": self._chain, "temporal": self._temporal}
        make["hypothetical"] = self._temporal
        make["comparison"] = self._comparison
        return make[paradigm](rng, paradigm, hops, cost, budget)

    def _finish(self, rng, paradigm, question, answer, answer_type, triples, program, cost, budget, describe=()):
        facts = self.kg.assign_documents(rng, triples, cost=cost, budget=budget)
        if facts is None:
            return None
        used = {f.doc_id for f in facts}
        for triple in describe:
            mentions = self.kg.mentions[triple]
            facts.append(next((m for m in mentions if m.doc_id in used), min(mentions, key=lambda m: cost(m.doc_id))))
            used.add(facts[-1].doc_id)
        evidence = ordered_docs(facts)
        if budget is not None and sum(cost(d) for d in evidence) > budget:
            return None
        rng.shuffle(evidence)
        hops = len(triples)
        task_type = "reading" if hops == 1 else "multihop"
        return Candidate(task_type, question, answer, answer_type, hops, facts, program, evidence, paradigm)

    def _answer_type(self, relation: str) -> str:
        if relation in YEAR_CLAUSES:
            return "year"
        return "number" if relation in NUMBER_RELATIONS else "entity"

    def _chain(self, rng, paradigm, hops, cost, budget):
        if paradigm == "causal":
            start = rng.choice(self.causes)
            path = self.kg.random_walk(rng, start, hops, relations={"caused_by"})
        else:
            start = rng.choice(self.starts)
            walk = self.kg.random_walk if rng.random() < 0.5 else self.kg.bfs_path
            path = walk(rng, start, hops)
        if path is None:
            return None
        start_text, describe = self._name_or_description(rng, start, path[-1][2])
        question = f"What is {self.chain_text(start_text, path)}?"
        program = {"op": "chain", "start": start, "chain": list(range(hops))}
        program["describe"] = list(range(hops, hops + len(describe)))
        answer = path[-1][2]
        return self._finish(
            rng, paradigm, question, answer, self._answer_type(path[-1][1]), path, program, cost, budget, describe
        )

    def _walk(self, rng, hops: int, *, start=None, final_relations=None, end_kind=None) -> list[Triple] | None:
        """A path of ``hops`` edges whose last edge is in ``final_relations`` or whose end is of ``end_kind``."""
        for _ in range(20):
            s = start if start is not None else rng.choice(self.starts)
            if final_relations is not None:
                path = self.kg.random_walk(rng, s, hops - 1, literal_end=False) if hops > 1 else []
                if path is None:
                    continue
                node = path[-1][2] if path else s
                edges = [(r, o) for r, o in self.kg.out[node] if r in final_relations]
                if edges:
                    return [*path, (node, *rng.choice(edges))]
            else:
                path = self.kg.random_walk(rng, s, hops, literal_end=False)
                if path and self.kg.kinds.get(path[-1][2]) == end_kind:
                    return path
        return None

    def _temporal(self, rng, paradigm, hops, cost, budget):
        hops_a = rng.randint(1, hops - 1)
        chain_a = self._walk(rng, hops_a, final_relations=YEAR_CLAUSES)
        if chain_a is None:
            return None
        start_b = chain_a[0][0] if rng.random() < 0.5 else None
        chain_b = self._walk(rng, hops - hops_a, start=start_b, final_relations=YEAR_CLAUSES)
        if chain_b is None or chain_b == chain_a or chain_a[-1][2] == chain_b[-1][2]:
            return None
        clauses = []
        for chain in (chain_a, chain_b):
            subject = self.chain_text(self.display(chain[0][0]), chain[:-1])
            clauses.append(YEAR_CLAUSES[chain[-1][1]].format(subject))
        shift = rng.choice(SHIFTS) if paradigm == "hypothetical" else 0
        if shift:
            question = (
                f"Suppose the year {clauses[0]} had been {abs(shift)} years {'later' if shift > 0 else 'earlier'}. "
                f"How many years would then have passed between that year and the year {clauses[1]}?"
            )
        else:
            question = f"How many years passed between the year {clauses[0]} and the year {clauses[1]}?"
        answer = format_number(abs(int(chain_a[-1][2]) + shift - int(chain_b[-1][2])))
        program = {"op": "year_diff", "chains": [list(range(hops_a)), list(range(hops_a, hops))], "shift": shift}
        return self._finish(rng, paradigm, question, answer, "number", chain_a + chain_b, program, cost, budget)

    def _comparison(self, rng, paradigm, hops, cost, budget):
        kinds = [k for k in COMPARABLE if len(self.by_kind.get(k, ())) >= 2]
        if not kinds:
            return None
        kind = rng.choice(kinds)
        relation, better, criterion = COMPARABLE[kind]
        extra = hops - 2
        hops_a = rng.randint(0, extra)
        chains = []
        for h in (hops_a, extra - hops_a):
            chain = [] if h == 0 else self._walk(rng, h, end_kind=kind)
            if chain is None:
                return None
            chains.append(chain)
        ends = [c[-1][2] if c else rng.choice(self.by_kind[kind]) for c in chains]
        values = [self.kg.value(e, relation) for e in ends]
        if ends[0] == ends[1] or None in values or values[0] == values[1]:
            return None
        texts = [
            self.chain_text(self.display(c[0][0]), c) if c else self.display(e)
            for c, e in zip(chains, ends, strict=True)
        ]
        pick = max if better == "max" else min
        answer = ends[values.index(pick(values, key=float))]
        question = f"Which {criterion}: {texts[0]} or {texts[1]}?"
        n_a, n_b = len(chains[0]), len(chains[1])
        triples = chains[0] + chains[1] + [(ends[0], relation, values[0]), (ends[1], relation, values[1])]
        program = {
            "op": "compare",
            "better": better,
            "chains": [list(range(n_a)), list(range(n_a, n_a + n_b))],
            "values": [n_a + n_b, n_a + n_b + 1],
        }
        return self._finish(rng, paradigm, question, answer, "entity", triples, program, cost, budget)

    # -- obfuscation ---------------------------------------------------------------------------------------------

    def _description(self, name: str) -> tuple[str, list[Triple], tuple] | None:
        """(phrase, facts it rests on, key shared by every entity the phrase fits) for ``name``, or ``None``."""
        kind, v = self.kg.kinds.get(name), lambda r: self.kg.value(name, r)
        if kind == "org" and v("sector") and v("founded_year") and v("headquartered_in"):
            year, city = int(v("founded_year")), v("headquartered_in")
            text = f"the {v('sector')} company founded in the {_period(year)} and based in {city}"
            key = ("org", v("sector"), _period(year), city)
            rels = ("sector", "founded_year", "headquartered_in")
        elif kind == "person" and v("born_in") and v("birth_year"):
            year = int(v("birth_year"))
            text, key = (
                f"the person born in {v('born_in')} in the {_period(year)}",
                ("person", v("born_in"), _period(year)),
            )
            rels = ("born_in", "birth_year")
        elif kind == "city" and v("located_in") and v("population"):
            approx = _approx(int(v("population")))
            text = f"the city in {v('located_in')} with roughly {approx} inhabitants"
            key, rels = ("city", v("located_in"), approx), ("located_in", "population")
        elif kind == "product" and v("made_by") and v("launch_year"):
            text = f"the product that {v('made_by')} launched in {v('launch_year')}"
            key, rels = ("product", v("made_by"), v("launch_year")), ("made_by", "launch_year")
        else:
            return None
        return text, [(name, r, v(r)) for r in rels], key

    def _name_or_description(self, rng, name: str, answer: str) -> tuple[str, list[Triple]]:
        if rng.random() >= self.obfuscate_p or name not in self.kg.kinds:
            return self.display(name), []
        described = self._description(name)
        if described is None or any(answer == t[2] for t in described[1]):
            return self.display(name), []
        kind = self.kg.kinds[name]
        if kind not in self._description_counts:
            counts: dict = {}
            for other in self.by_kind.get(kind, ()):
                d = self._description(other)
                if d is not None:
                    counts[d[2]] = counts.get(d[2], 0) + 1
            self._description_counts[kind] = counts
        if self._description_counts[kind].get(described[2]) != 1:
            return self.display(name), []
        return described[0], described[1]
