"""The filters of a ``qlx synth`` run, applied batch by batch as records are made, and the difficulty balancing of the
finished run.

Order: test-set decontamination, then the model-based filters in :data:`MODEL_FILTERS` order (knowledge grounding,
contextual robustness, pass@k difficulty) — cheapest first, each seeing only what the previous ones kept. Every
dropped record goes to the rejects file as ``{"filter", "reason", "record"}``; the card counts what each filter saw,
kept and dropped. Each decision depends on one record and the seed, so shards filter exactly as a single run does.
Drawing equal numbers per difficulty bin needs every record's pass rate, so it runs once over the finished run
(:func:`balance`): automatically after an unsharded run, by ``qlx synth --balance DIR`` after a sharded one.
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from qlx.data import filters
from qlx.data.card import CardBuilder, card_from_records, write_card
from qlx.data.records import Record, read_jsonl

MODEL_FILTERS = ("grounding", "robustness", "difficulty")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """What ``qlx synth`` filters, and how. ``model`` lists model-based filters (applied in :data:`MODEL_FILTERS`
    order); ``k`` responses per prompt for each; ``keep_pass_rate`` bounds the pass rate ``difficulty`` keeps."""

    model: tuple[str, ...] = ()
    k: int = 4
    robustness_docs: int = 3
    keep_pass_rate: tuple[float, float] = (0.0, 1.0)
    bins: int = 4
    per_bin: int | None = None
    decontaminate: str | None = None
    decontaminate_n: int = 8
    decontaminate_threshold: float = 0.5
    decontaminate_fields: tuple[str, ...] | None = None
    batch: int = 16

    def __post_init__(self):
        unknown = set(self.model) - set(MODEL_FILTERS)
        if unknown:
            raise ValueError(f"filters {sorted(unknown)} unknown; choose from {MODEL_FILTERS}")
        if self.k < 1 or self.batch < 1 or self.bins < 1 or self.robustness_docs < 1:
            raise ValueError(
                f"filter k ({self.k}), batch ({self.batch}), bins ({self.bins}) and robustness_docs "
                f"({self.robustness_docs}) must be >= 1"
            )
        lo, hi = self.keep_pass_rate
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"keep_pass_rate ({lo}, {hi}) must satisfy 0 <= lo <= hi <= 1")
        if self.per_bin is not None and self.per_bin < 1:
            raise ValueError(f"per_bin must be >= 1, got {self.per_bin}")
        if self.decontaminate_n < 1 or not 0.0 < self.decontaminate_threshold <= 1.0:
            raise ValueError(
                f"decontaminate_n ({self.decontaminate_n}) must be >= 1 and decontaminate_threshold "
                f"({self.decontaminate_threshold}) in (0, 1]"
            )

    @property
    def active(self) -> bool:
        return bool(self.model) or self.decontaminate is not None


class FilterChain:
    """Applies a :class:`FilterConfig` to batches of records; ``answer_fn`` and ``is_correct`` as in
    :mod:`qlx.data.filters`, ``distractors`` the documents the robustness check may add."""

    def __init__(
        self,
        config: FilterConfig,
        *,
        answer_fn: filters.AnswerFn | None = None,
        is_correct: filters.IsCorrect | None = None,
        distractors: Sequence[str] = (),
        seed: int = 0,
        base_dir: str | Path = ".",
    ):
        if config.model and (answer_fn is None or is_correct is None):
            raise ValueError(f"filters {config.model} need a model: give an answer_fn and is_correct")
        if "robustness" in config.model and len(distractors) < config.robustness_docs:
            raise ValueError(f"robustness needs {config.robustness_docs} distractor documents, got {len(distractors)}")
        self.config, self.answer_fn, self.is_correct = config, answer_fn, is_correct
        self.distractors, self.seed, self.base_dir = list(distractors), seed, base_dir
        self.test_set = None
        if config.decontaminate:
            texts = filters.read_test_set(config.decontaminate, config.decontaminate_fields)
            self.test_set = filters.NgramIndex.build(texts, config.decontaminate_n)

    def _steps(self):
        c = self.config
        if self.test_set is not None:
            n, threshold = c.decontaminate_n, c.decontaminate_threshold
            yield "decontaminate", lambda rs: filters.decontaminate(rs, self.test_set, n=n, threshold=threshold)
        model = (self.answer_fn, self.is_correct)
        steps = {
            "grounding": lambda rs: filters.knowledge_grounding(rs, *model, k=c.k),
            "robustness": lambda rs: filters.robustness(
                rs, *model, self.distractors, per_record=c.robustness_docs, k=c.k, seed=self.seed,
                base_dir=self.base_dir,
            ),
            "difficulty": lambda rs: filters.difficulty(
                rs, *model, k=c.k, base_dir=self.base_dir, keep=c.keep_pass_rate
            ),
        }  # fmt: skip
        for name in MODEL_FILTERS:
            if name in c.model:
                yield name, steps[name]

    def apply(self, records: list[Record], card: CardBuilder, rejects: TextIO) -> list[Record]:
        """The records every filter keeps; the others are written to ``rejects``; counts go to ``card``."""
        for name, step in self._steps():
            kept, dropped = step(records)
            card.filtered(name, len(records), len(kept))
            write_rejects(rejects, name, dropped)
            records = kept
        return records


def write_rejects(sink: TextIO, name: str, dropped: filters.Dropped) -> None:
    for record, reason in dropped:
        line = {"filter": name, "reason": reason, "record": dataclasses.asdict(record)}
        sink.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")


def balance(directory: str | Path, *, n_bins: int = 4, per_bin: int | None = None, seed: int = 0) -> dict:
    """Equal draws per pass@k bin over every ``records*.jsonl`` in ``directory`` (records in id order, each carrying
    ``source["checks"]["difficulty"]``): writes ``balanced.jsonl``, ``balanced_rejects.jsonl`` (the records not
    drawn, with their bin) and ``balanced_card.*``; returns the card."""
    directory = Path(directory)
    files = sorted(directory.glob("records*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{directory}: no records*.jsonl files to balance")
    records = sorted((r for f in files for r in read_jsonl(f)), key=lambda r: r.id)
    rates = []
    for record in records:
        check = record.source.get("checks", {}).get("difficulty")
        if check is None:
            raise ValueError(f"record {record.id} has no difficulty check; synthesise with --filters difficulty")
        rates.append(check["correct"] / check["k"])
    drawn, rest = filters.difficulty_bins(records, rates, n_bins=n_bins, per_bin=per_bin, seed=seed)
    with open(directory / "balanced.jsonl", "w", encoding="utf-8") as f:
        f.writelines(r.to_json() + "\n" for r in drawn)
    with open(directory / "balanced_rejects.jsonl", "w", encoding="utf-8") as f:
        write_rejects(f, "difficulty_bins", rest)
    config = {"source": [p.name for p in files], "n_bins": n_bins, "per_bin": per_bin, "seed": seed}
    card = card_from_records(drawn, config)
    card["filters"] = {"difficulty_bins": {"in": len(records), "kept": len(drawn), "dropped": len(rest)}}
    write_card(card, directory, "balanced_card")
    return card
