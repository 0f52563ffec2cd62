"""The dataset card: counts per task type and paradigm, a context-length histogram (also drawn as PNG), hop counts,
what each filter saw, kept and dropped, and what was dropped or reported while synthesising."""

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from qlx.data.records import TASK_TYPES, Record

HIST_EDGES = [2**k for k in range(8, 23)]
"""Length-histogram bin edges in tokens: 256, 512, ..., 4M (last bin open)."""


class CardBuilder:
    """Accumulates the card while records stream past (no record is kept)."""

    def __init__(self, config: dict | None = None):
        self.config = dict(config or {})
        self.task_types: Counter = Counter()
        self.paradigms: Counter = Counter()
        self.hops: Counter = Counter()
        self.lengths: Counter = Counter()
        self.dropped: Counter = Counter()
        self.filters: dict[str, dict[str, int]] = {}
        self.problems: list[str] = []
        self.n = 0
        self.total_tokens = 0

    def add(self, record: Record) -> None:
        self.n += 1
        self.total_tokens += record.length_tokens
        self.task_types[record.task_type] += 1
        self.paradigms[f"{record.task_type}/{record.source.get('paradigm', '-')}"] += 1
        self.hops[record.hops] += 1
        k = max(0, min(len(HIST_EDGES) - 1, int(math.log2(max(record.length_tokens, 1))) - 8))
        self.lengths[k] += 1

    def drop(self, reason: str, detail: str | None = None) -> None:
        self.dropped[reason] += 1
        if detail:
            self.problems.append(detail)

    def filtered(self, name: str, n_in: int, n_kept: int) -> None:
        """Filter ``name`` saw ``n_in`` records and kept ``n_kept``."""
        counts = self.filters.setdefault(name, {"in": 0, "kept": 0, "dropped": 0})
        counts["in"] += n_in
        counts["kept"] += n_kept
        counts["dropped"] += n_in - n_kept

    def card(self) -> dict:
        bins = [
            {
                "from": HIST_EDGES[k],
                "to": HIST_EDGES[k + 1] if k + 1 < len(HIST_EDGES) else None,
                "count": self.lengths[k],
            }
            for k in range(len(HIST_EDGES))
            if self.lengths[k]
        ]
        return {
            "records": self.n,
            "total_context_tokens": self.total_tokens,
            "task_types": {t: self.task_types[t] for t in TASK_TYPES},
            "paradigms": dict(sorted(self.paradigms.items())),
            "hops": {str(h): c for h, c in sorted(self.hops.items())},
            "length_histogram": bins,
            "filters": {name: dict(c) for name, c in self.filters.items()},
            "dropped": dict(self.dropped),
            "problems": len(self.problems),
            "problem_examples": self.problems[:20],
            "config": self.config,
        }


def card_from_records(records: Iterable[Record], config: dict | None = None) -> dict:
    builder = CardBuilder(config)
    for record in records:
        builder.add(record)
    return builder.card()


def merge_counts(cards: Iterable[dict]) -> tuple[dict, dict]:
    """(filters, dropped) summed over the cards of several shards."""
    filters: dict[str, dict[str, int]] = {}
    dropped: Counter = Counter()
    for card in cards:
        dropped.update(card.get("dropped", {}))
        for name, counts in card.get("filters", {}).items():
            total = filters.setdefault(name, {"in": 0, "kept": 0, "dropped": 0})
            for key in total:
                total[key] += counts[key]
    return filters, dict(dropped)


def format_card(card: dict) -> str:
    """The card as markdown."""
    lines = ["# Dataset card", "", f"records: {card['records']}, context tokens: {card['total_context_tokens']:,}", ""]
    lines += ["| task type | records |", "|---|---|"] + [f"| {t} | {c} |" for t, c in card["task_types"].items()]
    lines += ["", "| task type / paradigm | records |", "|---|---|"]
    lines += [f"| {p} | {c} |" for p, c in card["paradigms"].items()]
    lines += ["", "| hops | records |", "|---|---|"] + [f"| {h} | {c} |" for h, c in card["hops"].items()]
    lines += ["", "| context tokens | records |", "|---|---|"]
    for b in card["length_histogram"]:
        upper = f"{b['to']:,}" if b["to"] else "..."
        lines.append(f"| {b['from']:,} – {upper} | {b['count']} |")
    if card.get("filters"):
        lines += ["", "| filter | in | kept | dropped |", "|---|---|---|---|"]
        lines += [f"| {n} | {c['in']} | {c['kept']} | {c['dropped']} |" for n, c in card["filters"].items()]
    if card["dropped"] or card["problems"]:
        lines += ["", f"dropped: {card['dropped']}; problems reported: {card['problems']}"]
        lines += [f"- {p}" for p in card["problem_examples"]]
    return "\n".join(lines) + "\n"


def write_card(card: dict, out_dir: str | Path, stem: str = "card") -> list[Path]:
    """``{stem}.json``, ``{stem}.md`` and ``{stem}_lengths.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}_lengths.png"]
    paths[0].write_text(json.dumps(card, indent=2) + "\n")
    paths[1].write_text(format_card(card))
    fig, (ax_len, ax_task, ax_hops) = plt.subplots(1, 3, figsize=(15, 3.8))
    bins = card["length_histogram"]
    ax_len.bar(
        [f"{b['from'] // 1024}K" if b["from"] >= 1024 else str(b["from"]) for b in bins], [b["count"] for b in bins]
    )
    ax_len.set_xlabel("context tokens (bin start)")
    ax_len.set_ylabel("records")
    ax_len.set_title("context length")
    ax_task.bar(list(card["task_types"]), list(card["task_types"].values()), color="tab:orange")
    ax_task.set_title("task types")
    ax_hops.bar(list(card["hops"]), list(card["hops"].values()), color="tab:green")
    ax_hops.set_xlabel("hops")
    ax_hops.set_title("hop counts")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths
