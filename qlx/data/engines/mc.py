"""Multiple-choice variants: a knowledge-graph or table question with 4 options, distractors drawn from the graph.

Entity distractors come first from near-duplicate names, then from the other side of a comparison, then from
entities that are objects of the same relation elsewhere in the graph, then from entities of the same kind; year and
number distractors are other values of the same relation or measure near the answer.
"""

import random

from qlx.data.engines.base import Candidate, format_number
from qlx.data.engines.kg import KGEngine
from qlx.data.engines.table import TableEngine


class MCEngine:
    def __init__(self, kg_engine: KGEngine, table_engine: TableEngine | None = None, confusable=None):
        """``confusable``: name -> near-duplicate names (the world's twins)."""
        self.kg_engine, self.table_engine = kg_engine, table_engine
        self.confusable = confusable or {}
        self.objects_of: dict[str, list[str]] = {}
        for (_, relation, obj), _mentions in sorted(kg_engine.kg.mentions.items()):
            self.objects_of.setdefault(relation, []).append(obj)

    def propose(self, rng: random.Random, task_type: str = "mc", *, cost=None, budget=None) -> Candidate | None:
        if task_type != "mc":
            raise ValueError(f"the MC engine makes 'mc' questions, not {task_type!r}")
        if self.table_engine is not None and rng.random() < 0.3:
            base = self.table_engine.propose(rng, "numerical", cost=cost, budget=budget)
        else:
            base = self.kg_engine.propose(rng, rng.choice(("reading", "multihop")), cost=cost, budget=budget)
        if base is None or base.answer_type not in ("entity", "year", "number"):
            return None
        distractors = self._distractors(rng, base)
        if len(distractors) < 3:
            return None
        options = [base.answer, *distractors[:3]]
        rng.shuffle(options)
        program = {"op": "mc", "inner": base.program}
        letter = "ABCD"[options.index(base.answer)]
        return Candidate(
            "mc", base.question, letter, "option", base.hops, base.facts, program, base.evidence, base.paradigm, options
        )

    def _distractors(self, rng: random.Random, base: Candidate) -> list[str]:
        answer, program = base.answer, base.program
        pool: list[str] = []
        if base.answer_type == "entity":
            kinds = self.kg_engine.kg.kinds
            pool += self.confusable.get(answer, [])
            if program["op"] == "compare":
                pool += [base.facts[i].subject for i in program["values"]]
            relation = base.facts[program["chain"][-1]].relation if program["op"] == "chain" else None
            same_relation = sorted(set(self.objects_of.get(relation, ())))
            pool += rng.sample(same_relation, min(6, len(same_relation)))
            same_kind = self.kg_engine.by_kind.get(kinds.get(answer, "entity"), [])
            pool += rng.sample(same_kind, min(6, len(same_kind)))
        else:
            value = float(answer)
            decimals = len(answer.split(".")[1]) if "." in answer else None
            if base.answer_type == "year" or (value.is_integer() and abs(value) < 20):
                offsets = rng.sample([-9, -7, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 7, 9], 6)
                pool += [format_number(value + o) for o in offsets if base.answer_type == "year" or value + o >= 0]
            else:
                factors = rng.sample([0.5, 0.75, 0.8, 0.9, 1.1, 1.2, 1.25, 1.5, 2.0], 6)
                pool += [format_number(round(value * f, decimals or 0), decimals) for f in factors]
        seen, out = {answer}, []
        for option in pool:
            if option not in seen:
                seen.add(option)
                out.append(option)
        return out
