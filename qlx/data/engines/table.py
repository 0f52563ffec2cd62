"""Engine (b): corpus-level numerical questions over the unified tables, answered by executing SQL.

A template picks an *axis* — the years of one entity, several entities in one year, or the parts (segments) of one
entity — and an operation: sum, mean, difference, growth rate, ranking, count above a threshold, arg-max, or a
*hypothetical scenario* (the total had one group's value been ``percent`` % higher or lower:
``sum(values) + values[changed] * percent / 100``). Each group's value is the sum of its rows (an organisation's total
is the sum of its segments). The query runs on the SQL store to give the ground truth; the table cells it reads,
with their spans, are the evidence.
"""

import json
import random

from qlx.data.documents import Fact
from qlx.data.engines.base import Candidate, format_number, ordered_docs
from qlx.data.tables import SqlStore, TableView

OPS_BY_AXIS = {
    "period": ("sum", "mean", "difference", "growth", "argmax", "hypothetical"),
    "entity": ("sum", "mean", "difference", "ranking", "count", "argmax", "hypothetical"),
    "dimension": ("sum", "difference", "ranking", "argmax"),
}
TWO_DECIMALS = {"mean", "growth", "hypothetical"}
PERCENTS = (-50, -25, -20, -10, 10, 15, 20, 25, 50)


def _listing(items: list) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class TableEngine:
    """Proposes ``numerical`` questions from the views of an :class:`SqlStore`."""

    def __init__(self, sql: SqlStore):
        if not sql.views:
            raise ValueError("the SQL store has no table with numeric columns; the table engine needs one")
        self.sql = sql

    def _distinct(self, view: TableView, column: str, filters: dict) -> list:
        where, params = self._where(filters)
        return [r[0] for r in self.sql.query(f"SELECT DISTINCT {column} FROM {view.name}{where} ORDER BY 1", params)]

    @staticmethod
    def _where(filters: dict, extra: str = "") -> tuple[str, list]:
        clauses = [f"{c} = ?" for c in filters] + ([extra] if extra else [])
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", list(filters.values())

    def propose(self, rng: random.Random, task_type: str = "numerical", *, cost=None, budget=None) -> Candidate | None:
        if task_type != "numerical":
            raise ValueError(f"the table engine makes 'numerical' questions, not {task_type!r}")
        view = rng.choice(self.sql.views)
        axes = ["entity"] + (["period"] if view.period else []) + (["dimension"] if view.dimension else [])
        axis = rng.choice(axes)
        op = rng.choice(OPS_BY_AXIS[axis])
        measure = rng.choice(sorted(view.measures))
        filters, groups = self._groups(rng, view, axis, op)
        if groups is None:
            return None
        return self._build(rng, view, axis, op, measure, filters, groups, cost or (lambda _d: 0), budget)

    def _groups(self, rng, view: TableView, axis: str, op: str) -> tuple[dict, list | None]:
        filters: dict = {}
        if axis in ("period", "dimension"):
            filters[view.entity] = rng.choice(self._distinct(view, view.entity, {}))
        if axis in ("entity", "dimension") and view.period:
            filters[view.period] = rng.choice(self._distinct(view, view.period, filters))
        if view.dimension and axis != "dimension" and rng.random() < 0.4:
            values = self._distinct(view, view.dimension, filters)
            filters[view.dimension] = rng.choice(values)
        column = {"period": view.period, "entity": view.entity, "dimension": view.dimension}[axis]
        available = self._distinct(view, column, filters)
        if axis == "period":
            if len(available) < 2:
                return filters, None
            size = 2 if op in ("difference", "growth") else rng.randint(2, min(4, len(available)))
            first = rng.randrange(len(available) - size + 1)
            span = available[first : first + size]
            groups = [span[0], span[-1]] if op in ("difference", "growth") else span
        else:
            size = {"difference": 2, "ranking": 3, "count": 4, "argmax": 3}.get(op, rng.randint(2, 4))
            if axis == "dimension" and op == "argmax":
                size = len(available)
            if len(available) < max(size, 2):
                return filters, None
            groups = rng.sample(available, size)
        return filters, groups

    def _build(self, rng, view, axis, op, measure, filters, groups, cost, budget) -> Candidate | None:
        column = {"period": view.period, "entity": view.entity, "dimension": view.dimension}[axis]
        marks = ", ".join("?" * len(groups))
        where, params = self._where(filters, f"{column} IN ({marks})")
        sub = f"WITH sub AS (SELECT {column} AS g, SUM({measure}) AS s FROM {view.name}{where} GROUP BY {column}) "
        params += groups
        values = dict(self.sql.query(sub + "SELECT g, s FROM sub", params))
        if len(values) != len(groups) or len(set(values.values())) != len(groups):
            return None
        threshold = changed = percent = None
        if op == "sum":
            sql, args = "SELECT SUM(s) FROM sub", []
        elif op == "mean":
            sql, args = "SELECT AVG(s) FROM sub", []
        elif op == "difference":
            sql, args = (
                "SELECT (SELECT s FROM sub WHERE g = ?) - (SELECT s FROM sub WHERE g = ?)",
                [groups[1], groups[0]],
            )
        elif op == "growth":
            if values[groups[0]] == 0:
                return None
            sql = "SELECT ((SELECT s FROM sub WHERE g = ?) - (SELECT s FROM sub WHERE g = ?)) * 100.0 / "
            sql, args = sql + "(SELECT s FROM sub WHERE g = ?)", [groups[1], groups[0], groups[0]]
        elif op == "ranking":
            sql, args = "SELECT g FROM sub ORDER BY s DESC", []
        elif op == "hypothetical":
            changed, percent = rng.choice(groups), rng.choice(PERCENTS)
            sql = "SELECT SUM(s) + (SELECT s FROM sub WHERE g = ?) * ? / 100.0 FROM sub"
            args = [changed, percent]
        elif op == "count":
            ordered = sorted(values.values())
            i = rng.randrange(-1, len(ordered))
            lo = ordered[i] if i >= 0 else ordered[0] - abs(ordered[0]) // 2 - 1
            hi = ordered[i + 1] if i + 1 < len(ordered) else ordered[-1] + abs(ordered[-1]) // 2 + 1
            threshold = int((lo + hi) // 2)
            sql, args = "SELECT COUNT(*) FROM sub WHERE s > ?", [threshold]
        else:
            sql, args = "SELECT g FROM sub ORDER BY s DESC LIMIT 1", []
        rows = self.sql.query(sub + sql, params + args)
        if op == "ranking":
            answer = ", ".join(str(r[0]) for r in rows)
        elif isinstance(rows[0][0], str):
            answer = rows[0][0]
        else:
            answer = format_number(rows[0][0], 2 if op in TWO_DECIMALS else None)
        facts = self._evidence(view, column, measure, filters, groups)
        evidence = ordered_docs(facts)
        if budget is not None and sum(cost(d) for d in evidence) > budget:
            return None
        rng.shuffle(evidence)
        question = self._question(view, axis, op, measure, filters, groups, threshold, (changed, percent))
        answer_type = {"ranking": "list", "argmax": "year" if axis == "period" else "entity"}.get(op, "number")
        program = {
            "op": op,
            "axis": column,
            "groups": groups,
            "filters": filters,
            "measure": measure,
            "threshold": threshold,
            "changed": changed,
            "percent": percent,
            "sql": sub + sql,
            "params": params + args,
        }
        return Candidate("numerical", question, answer, answer_type, len(evidence), facts, program, evidence, op)

    def _evidence(self, view, column, measure, filters, groups) -> list[Fact]:
        roles = [c for c in (view.entity, view.period, view.dimension) if c]
        where, params = self._where(filters, f"{column} IN ({', '.join('?' * len(groups))})")
        sql = f"SELECT doc_id, _spans, _cells, {', '.join(roles)} FROM {view.name}{where} ORDER BY rowid"
        facts = []
        for doc_id, spans, cells, *role_values in self.sql.query(sql, params + list(groups)):
            start, end = json.loads(spans)[measure]
            qualifiers = tuple(sorted(zip(roles, role_values, strict=True)))
            facts.append(Fact(str(role_values[0]), measure, json.loads(cells)[measure], doc_id, start, end, qualifiers))
        return facts

    def _question(self, view, axis, op, measure, filters, groups, threshold, scenario) -> str:
        label = view.measures[measure].lower()
        dim_value = filters.get(view.dimension) if view.dimension and axis != "dimension" else None
        what = f"{label} of the {dim_value} {view.dimension}" if dim_value else label
        if view.dimension and not dim_value and axis != "dimension":
            what = f"total {label} (all {view.dimension}s together)"
        unit = f", in {view.unit}" if view.unit else ""
        when = f" in {filters[view.period]}" if view.period in filters else ""
        entity = filters.get(view.entity)
        two = " Round to two decimal places."
        if op == "hypothetical":
            changed, percent = scenario
            change = f"{abs(percent)}% {'higher' if percent > 0 else 'lower'}"
            if axis == "period":
                return (
                    f"If the {what} of {entity} in {changed} had been {change} than reported, what would its combined "
                    f"{what} over the years {groups[0]} to {groups[-1]} have been{unit}?{two}"
                )
            return (
                f"If the {what} of {changed}{when} had been {change} than reported, what would the combined {what} of "
                f"{_listing(groups)}{when} have been{unit}?{two}"
            )
        if axis == "period":
            y1, y2 = groups[0], groups[-1]
            return {
                "sum": f"What was the combined {what} of {entity} over the years {y1} to {y2}{unit}?",
                "mean": f"What was the average yearly {what} of {entity} over the years {y1} to {y2}{unit}?{two}",
                "difference": f"By how much did the {what} of {entity} change from {y1} to {y2}{unit}? "
                "Give the later value minus the earlier one.",
                "growth": f"By what percentage did the {what} of {entity} grow from {y1} to {y2}?{two}",
                "argmax": f"In which year from {y1} to {y2} did {entity} report its highest {what}?",
            }[op]
        if axis == "entity":
            names = _listing(groups)
            return {
                "sum": f"What was the combined {what} of {names}{when}{unit}?",
                "mean": f"What was the average {what} of {names}{when}{unit}?{two}",
                "difference": f"How much higher was the {what} of {groups[1]} than that of {groups[0]}{when}{unit}? "
                f"Give {groups[1]}'s value minus {groups[0]}'s (negative if lower).",
                "ranking": f"Rank {names} by {what}{when}, from highest to lowest.",
                "count": f"How many of {names} reported {what} above {threshold}{when}{unit}?",
                "argmax": f"Which of {names} reported the highest {what}{when}?",
            }[op]
        dim = view.dimension
        parts = _listing(groups)
        return {
            "sum": f"What was the combined {label} of the {parts} {dim}s of {entity}{when}{unit}?",
            "difference": f"How much higher was the {label} of the {groups[1]} {dim} than that of the {groups[0]} "
            f"{dim} at {entity}{when}{unit}? Give the {groups[1]} value minus the {groups[0]} value.",
            "ranking": f"Rank the {parts} {dim}s of {entity} by {label}{when}, from highest to lowest.",
            "argmax": f"Which {dim} of {entity} had the highest {label}{when}?",
        }[op]
