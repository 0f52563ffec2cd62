"""The benchmark registry and the public functions that dispatch on a benchmark name."""

import importlib

from qlx.eval.scoring import check_protocol
from qlx.eval.stats import bootstrap_mean

NAMES = ("docmath", "longbench_v2", "frames", "mrcr", "corpusqa", "longbench_v1_qa")  # Table 7's column order
TITLES = {
    "docmath": "DocMath",
    "longbench_v2": "LongBench-V2",
    "frames": "Frames",
    "mrcr": "MRCR",
    "corpusqa": "CorpusQA",
    "longbench_v1_qa": "LongBench-V1-QA",
}


def module(benchmark):
    """The module of a benchmark (``qlx.eval.<name>``)."""
    if benchmark not in NAMES:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(NAMES)}")
    return importlib.import_module(f"qlx.eval.{benchmark}")


def extract_answer(benchmark, response, protocol="ql"):
    """The answer the benchmark's scorer reads from ``response`` under ``protocol`` (None: nothing extracted)."""
    return module(benchmark).extract(response, protocol)


def score_details(benchmark, response, record, *, protocol="ql", judge=None, parser=None):
    """The :class:`~qlx.eval.scoring.Score` of ``response`` (extracted answer, rule, judge verdict and reply)."""
    check_protocol(protocol)
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    return module(benchmark).score(response, record, protocol, judge, parser)


def score(benchmark, response, record, *, protocol="ql", judge=None, parser=None):
    """The protocol's final score in [0, 1] of ``response`` against the benchmark's own ``record``.

    ``judge(problem, prediction, gold) -> reply text`` is called only where the protocol calls one (QL: rule < 1 on
    DocMath and the QA benchmarks; official: CorpusQA and Frames always); ``parser`` overrides the reply parser
    (default P3, Frames official "frames"). Without a judge QL keeps the rule score; official CorpusQA and Frames
    raise, their scorer being the judge.
    """
    return score_details(benchmark, response, record, protocol=protocol, judge=judge, parser=parser).score


def _ci(groups, strata=None, seed=0):
    mean, low, high = bootstrap_mean(groups, strata, seed=seed)
    return {"mean": round(100 * mean, 2), "low": round(100 * low, 2), "high": round(100 * high, 2), "n": len(groups)}


def _by_item(rows):
    items = {}
    for row in rows:
        items.setdefault(row["id"], []).append(row)
    return items


def aggregate(benchmark, rows, *, seed=0):
    """The report of one benchmark from its scored rows (dicts with ``id``, ``score`` and ``split``; one row per
    (item, sample)): 100 × mean with a 95% bootstrap interval overall and per split label, the macro-average over
    subsets where the benchmark's column is one (LongBench v1 QA), and the rates (percent of rows) of truncated
    prompts (``truncated``), multi-turn prompts over the budget sent whole (``over_budget``), empty answers
    (``empty``) and responses without ``</think>`` (``missing_think_end``)."""
    mod = module(benchmark)
    items = _by_item(rows)
    groups = [[r["score"] for r in group] for group in items.values()]
    splits = [group[0].get("split", {}) for group in items.values()]
    macro = getattr(mod, "MACRO", None)
    strata = [s.get(macro, "") for s in splits] if macro else None
    report = {"benchmark": benchmark, "score": _ci(groups, strata, seed), "splits": {}, "rates": {}}
    report["samples"] = max((len(g) for g in groups), default=0)
    for key in mod.SPLITS:
        labels = sorted({s[key] for s in splits if key in s})
        report["splits"][key] = {
            label: _ci([g for g, s in zip(groups, splits, strict=True) if s.get(key) == label], seed=seed)
            for label in labels
        }
    for rate in ("truncated", "over_budget", "empty", "missing_think_end"):
        flagged = [r for r in rows if rate in r]
        if flagged:
            report["rates"][rate] = round(100 * sum(bool(r[rate]) for r in flagged) / len(flagged), 2)
    return report


def table7_average(reports):
    """The mean of the benchmark columns present (Table 7's Avg when all six are)."""
    values = [r["score"]["mean"] for r in reports.values()]
    return round(sum(values) / len(values), 2) if values else float("nan")
