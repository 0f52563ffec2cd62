"""Reports of a scored run (``report.json``, ``report.md``, ``score_vs_length.png``) and paired comparisons of two."""

import json
from pathlib import Path

import numpy as np

from qlx.eval.benchmarks import NAMES, TITLES, aggregate, module, table7_average
from qlx.eval.stats import bootstrap_mean
from qlx.eval.store import read_rows, write_atomic


def build_report(score_rows, *, meta=None, seed=0):
    """{"benchmarks": {name: aggregate(...)}, "table7_average", "meta"} over the benchmarks present, Table 7 order."""
    by_benchmark = {}
    for row in score_rows:
        by_benchmark.setdefault(row["benchmark"], []).append(row)
    reports = {b: aggregate(b, by_benchmark[b], seed=seed) for b in NAMES if b in by_benchmark}
    return {
        "benchmarks": reports,
        "table7_average": table7_average(reports),
        "complete_table7": len(reports) == len(NAMES),
        "meta": meta or {},
    }


def _cell(ci):
    return f"{ci['mean']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}] (n={ci['n']})"


def render_markdown(report):
    """The report as Markdown: the Table 7 row, then each benchmark's splits and rates."""
    reports = report["benchmarks"]
    lines = ["# qlx eval report", ""]
    for key, value in report["meta"].items():
        lines.append(f"- {key}: {value}")
    lines += ["", "Scores are 100 × mean with 95% bootstrap intervals (over items; over samples too when k > 1).", ""]
    head = [TITLES[b] for b in reports] + ["Avg" if report["complete_table7"] else f"Avg of {len(reports)}"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [
        "| "
        + " | ".join([f"{r['score']['mean']:.2f}" for r in reports.values()] + [f"{report['table7_average']:.2f}"])
        + " |",
        "",
    ]
    for name, r in reports.items():
        lines += [f"## {TITLES[name]}", "", f"- overall: {_cell(r['score'])}, samples per item: {r['samples']}"]
        for rate, value in r["rates"].items():
            lines.append(f"- {rate.replace('_', ' ')}: {value:.2f}%")
        for key, groups in r["splits"].items():
            lines += ["", f"| {key} | score |", "|---|---|"]
            lines += [f"| {label} | {_cell(ci)} |" for label, ci in groups.items()]
        lines.append("")
    return "\n".join(lines)


def plot_score_vs_length(score_rows, path):
    """PNG: each benchmark's mean score per prompt-length bin (powers of two of prompt tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in NAMES:
        rows = [r for r in score_rows if r["benchmark"] == name and r["prompt_tokens"] > 0]
        if not rows:
            continue
        bins = np.floor(np.log2([r["prompt_tokens"] for r in rows])).astype(int)
        scores = np.array([r["score"] for r in rows])
        xs = sorted(set(bins.tolist()))
        ax.plot([2.0**x for x in xs], [100 * scores[bins == x].mean() for x in xs], marker="o", label=TITLES[name])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens (before truncation; bin lower edge)")
    ax.set_ylabel("score (100 × mean)")
    ax.set_ylim(-2, 102)
    ax.set_title("qlx eval: score against prompt length")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out, score_rows, *, meta=None):
    """report.json, report.md and score_vs_length.png in ``out``; returns the report dict."""
    out = Path(out)
    report = build_report(score_rows, meta=meta)
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    write_atomic(out / "report.md", render_markdown(report))
    plot_score_vs_length(score_rows, out / "score_vs_length.png")
    return report


def _item_means(rows):
    sums = {}
    for row in rows:
        sums.setdefault((row["benchmark"], row["id"]), []).append(row["score"])
    return {key: float(np.mean(v)) for key, v in sums.items()}


def compare(dir_a, dir_b, *, seed=0):
    """Paired differences A − B per benchmark over the items both runs scored: 100 × mean difference with a 95%
    bootstrap interval over items (LongBench v1 QA: the macro-average over subsets), plus each side's mean."""
    a = _item_means(read_rows(Path(dir_a) / "scores.jsonl"))
    b = _item_means(read_rows(Path(dir_b) / "scores.jsonl"))
    splits = {(r["benchmark"], r["id"]): r["split"] for r in read_rows(Path(dir_a) / "scores.jsonl")}
    result = {}
    for name in NAMES:
        shared = sorted(k for k in a if k[0] == name and k in b)
        if not shared:
            continue
        macro = getattr(module(name), "MACRO", None)
        strata = [splits[k].get(macro, "") for k in shared] if macro else None
        diff = bootstrap_mean([[a[k] - b[k]] for k in shared], strata, seed=seed)
        mean_a = bootstrap_mean([[a[k]] for k in shared], strata)[0]
        mean_b = bootstrap_mean([[b[k]] for k in shared], strata)[0]
        result[name] = {
            "n": len(shared),
            "a": round(100 * mean_a, 2),
            "b": round(100 * mean_b, 2),
            "diff": round(100 * diff[0], 2),
            "low": round(100 * diff[1], 2),
            "high": round(100 * diff[2], 2),
        }
    return result


def render_compare(result, dir_a, dir_b):
    lines = [f"A = {dir_a}", f"B = {dir_b}", "", "| benchmark | n | A | B | A − B [95% CI] |", "|---|---|---|---|---|"]
    for name, r in result.items():
        interval = f"{r['diff']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"
        lines.append(f"| {TITLES[name]} | {r['n']} | {r['a']:.2f} | {r['b']:.2f} | {interval} |")
    return "\n".join(lines)
