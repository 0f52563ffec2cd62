"""Re-derive a record's answer from its evidence facts alone — the programmatic "derivable from the evidence" check.

Each fact's object must appear in its span of the context; the facts must connect as the program says (a chain's
subject is the previous object); the answer is recomputed from the facts' objects (table cells parsed as numbers) in
plain Python, independently of the SQL that produced it. Programs:

- ``chain``: ``answer = facts[chain[-1]].object``; ``describe`` facts are about the start entity.
- ``year_diff``: ``|year(chain 0) + shift - year(chain 1)|`` (``shift`` 0 unless the question is hypothetical).
- ``compare``: the chain end whose value fact is larger (``better="max"``) or smaller (``"min"``).
- ``sum | mean | difference | growth | ranking | count | argmax | hypothetical``: over groups of table facts
  (``qualifiers[axis]``), each group's value the sum of its cells; ``hypothetical`` is the sum had group ``changed``
  been ``percent`` % higher, ``sum(v) + v[changed] * percent / 100``; ``mean``, ``growth`` and ``hypothetical`` to two
  decimals.
- ``niah``: the needle's value; ``mrcr``: ``prefix`` + the ``index``-th response in context order.
- ``mc``: the letter of the inner program's answer among ``options``.
"""

from qlx.data.engines.base import format_number
from qlx.data.tables import parse_number


class DerivationError(ValueError):
    """The evidence does not support the recorded answer (or is malformed)."""


def _connected(facts: list[dict], chain: list[int], start: str | None = None) -> dict:
    prev = start
    for i in chain:
        if prev is not None and facts[i]["subject"] != prev:
            raise DerivationError(f"fact {i} starts at {facts[i]['subject']!r}, expected {prev!r}")
        prev = facts[i]["object"]
    return facts[chain[-1]]


def _table(program: dict, facts: list[dict]) -> str:
    values: dict = {}
    for fact in facts:
        group = fact["qualifiers"][program["axis"]]
        number = parse_number(fact["object"])
        if number is None:
            raise DerivationError(f"table cell {fact['object']!r} is not a number")
        values[group] = values.get(group, 0) + number
    groups = program["groups"]
    if set(values) != set(groups):
        raise DerivationError(f"evidence covers groups {sorted(values)}, the question asks about {sorted(groups)}")
    v = [values[g] for g in groups]
    op = program["op"]
    if op == "sum":
        return format_number(sum(v))
    if op == "mean":
        return format_number(sum(v) / len(v), 2)
    if op == "difference":
        return format_number(v[1] - v[0])
    if op == "growth":
        return format_number((v[1] - v[0]) * 100.0 / v[0], 2)
    if op == "ranking":
        return ", ".join(str(g) for g in sorted(groups, key=lambda g: -values[g]))
    if op == "count":
        return str(sum(x > program["threshold"] for x in v))
    if op == "argmax":
        return str(max(groups, key=lambda g: values[g]))
    if op == "hypothetical":
        if program["changed"] not in values:
            raise DerivationError(f"the changed group {program['changed']!r} is not among {sorted(values)}")
        return format_number(sum(v) + values[program["changed"]] * program["percent"] / 100.0, 2)
    raise DerivationError(f"unknown table operation {op!r}")


def derive(program: dict, facts: list[dict], options: list[str] | None = None) -> str | None:
    """The answer the program gives on ``facts`` (``None`` for programs with no programmatic check)."""
    op = program["op"]
    if op == "chain":
        for i in program.get("describe", []):
            if facts[i]["subject"] != program["start"]:
                raise DerivationError(f"description fact {i} is not about {program['start']!r}")
        return _connected(facts, program["chain"], program["start"])["object"]
    if op == "year_diff":
        a, b = (int(_connected(facts, chain)["object"]) for chain in program["chains"])
        return format_number(abs(a + program.get("shift", 0) - b))
    if op == "compare":
        ends = [_connected(facts, c)["object"] if c else None for c in program["chains"]]
        value_facts = [facts[i] for i in program["values"]]
        for end, fact in zip(ends, value_facts, strict=True):
            if end is not None and fact["subject"] != end:
                raise DerivationError(f"value fact about {fact['subject']!r} does not follow the chain to {end!r}")
        numbers = [float(f["object"]) for f in value_facts]
        pick = max if program["better"] == "max" else min
        return value_facts[numbers.index(pick(numbers))]["subject"]
    if op in ("sum", "mean", "difference", "growth", "ranking", "count", "argmax", "hypothetical"):
        return _table(program, facts)
    if op == "niah":
        return facts[program["needle"]]["object"]
    if op == "mrcr":
        responses = sorted(facts, key=lambda f: f["char_start"])
        return program["prefix"] + responses[program["index"]]["object"]
    if op == "mc":
        inner = derive(program["inner"], facts)
        if options is None or inner not in options:
            raise DerivationError(f"the derived answer {inner!r} is not among the options {options}")
        return "ABCD"[options.index(inner)]
    if op == "llm_verified":
        return None
    raise DerivationError(f"unknown program {op!r}")


def check_spans(facts: list[dict], span_texts: list[str]) -> None:
    """Every fact's object appears in the text of its span."""
    for i, (fact, text) in enumerate(zip(facts, span_texts, strict=True)):
        if fact["object"] not in text:
            raise DerivationError(f"fact {i}: {fact['object']!r} is not in its span {text[:80]!r}")
