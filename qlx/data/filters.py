"""Filters over synthesised records (recipe §1.4): derivable from the evidence, test-set decontamination, knowledge
grounding, contextual robustness, deduplication, and pass@k difficulty bins with equal draws per bin.

Model-based filters take ``answer_fn(messages_list, k) -> list[list[str]]`` (k responses per prompt; chat messages in
OpenAI form) and ``is_correct(record, response) -> bool`` — e.g. the RL reward verifier of the record's task type.
Each filter returns ``(kept, dropped)`` with ``dropped`` a list of ``(record, reason)``: nothing disappears without
being returned. Model-based filters and decontamination record what they measured in each kept record's
``source["checks"][name]`` (``{"correct": c, "k": k}``, or ``{"overlap": x}``); a record's outcome depends on that
record alone (and the seed), so a sharded run filters exactly as a single run does.
"""

import dataclasses
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qlx.data.derive import DerivationError, check_spans, derive
from qlx.data.docstore import SEPARATOR
from qlx.data.llm import ChatClient
from qlx.data.prompts import MC_FORMAT, QA_FORMAT, user_prompt
from qlx.data.records import Record, context_spans, read_context

AnswerFn = Callable[[list[list[dict]], int], list[list[str]]]
IsCorrect = Callable[[Record, str], bool]
Dropped = list[tuple[Record, str]]


def _checked(record: Record, name: str, result: dict) -> Record:
    """``record`` with ``source["checks"][name] = result`` (a new record; the input is not changed)."""
    checks = {**record.source.get("checks", {}), name: result}
    return dataclasses.replace(record, source={**record.source, "checks": checks})


def derivable(records: Sequence[Record], base_dir: str | Path = ".") -> tuple[list[Record], Dropped]:
    """Records whose answer re-derives from their evidence facts (engines a and b, dialogue); LLM-verified records
    (engine c) pass, having no programmatic check."""
    kept, dropped = [], []
    for record in records:
        facts = record.evidence["facts"]
        try:
            check_spans(facts, context_spans(record, base_dir, [(f["char_start"], f["char_end"]) for f in facts]))
            answer = derive(record.evidence["program"], facts, record.options)
            if answer is not None and answer != record.answer:
                raise DerivationError(f"evidence gives {answer!r}, the record says {record.answer!r}")
            kept.append(record)
        except DerivationError as e:
            dropped.append((record, str(e)))
    return kept, dropped


# -- test-set decontamination ----------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """``text`` lower-cased, as its words ``[a-z0-9]+`` (punctuation and spacing dropped)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The word n-grams of :func:`words` of ``text`` (none when it has fewer than ``n`` words)."""
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def read_test_set(path: str | Path, fields: Sequence[str] | None = None) -> list[str]:
    """The texts of a test set: for ``.jsonl``, the string values (nested ones included) of each line's object —
    only those under the top-level keys ``fields`` when given; any other file is one text. A line that is not a
    JSON object raises an error naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"test set {path} is not a file")
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
            texts += _strings(item if fields is None else {k: item[k] for k in fields if k in item})
    return texts


def record_grams(record: Record, n: int) -> set[tuple[str, ...]]:
    """The word n-grams of the record's question, options and answer, each on its own (no gram spans two)."""
    return set().union(*(ngrams(part, n) for part in [record.question, *(record.options or []), record.answer]))


@dataclasses.dataclass(frozen=True)
class NgramIndex:
    """The word ``n``-grams of a test set's texts (no gram spans two texts), and the texts as normalised words."""

    n: int
    grams: frozenset
    lines: tuple[str, ...]

    @classmethod
    def build(cls, texts: Iterable[str], n: int) -> "NgramIndex":
        if n < 1:
            raise ValueError(f"n-gram length must be >= 1, got {n}")
        grams: set[tuple[str, ...]] = set()
        lines = []
        for text in texts:
            w = words(text)
            grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
            lines.append(f" {' '.join(w)} ")
        return cls(n, frozenset(grams), tuple(lines))


def decontaminate(
    records: Sequence[Record], test: NgramIndex | Iterable[str], *, n: int = 8, threshold: float = 0.5
) -> tuple[list[Record], Dropped]:
    """Drop records that overlap the test set (its texts, or their :class:`NgramIndex` built once for many calls):
    overlap = |record_grams ∩ test grams| / |record_grams|, dropped when ``overlap >= threshold`` (``0 < threshold
    <= 1``); no gram spans two strings on either side. When every part of a record is shorter than ``n`` words, its
    overlap is 1 if the question's words appear consecutively in a test text, else 0 (answers and options that short
    are too common to count)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"decontaminate needs 0 < threshold <= 1, got {threshold}")
    index = test if isinstance(test, NgramIndex) else NgramIndex.build(test, n)
    if index.n != n:
        raise ValueError(f"the test-set index holds {index.n}-grams, decontaminate was asked for n={n}")
    kept, dropped = [], []
    for record in records:
        grams = record_grams(record, n)
        if grams:
            shared = grams & index.grams
            overlap = len(shared) / len(grams)
            why = f"{overlap:.0%} of its {n}-grams are in the test set (e.g. {' '.join(min(shared or [()]))!r})"
        else:
            short = " ".join(words(record.question))
            overlap = float(bool(short) and any(f" {short} " in line for line in index.lines))
            why = f"its question {short!r} (fewer than {n} words) appears in the test set"
        if overlap >= threshold:
            dropped.append((record, why))
        else:
            kept.append(_checked(record, "decontaminate", {"overlap": round(overlap, 4)}))
    return kept, dropped


# -- model-based filters ---------------------------------------------------------------------------------------------


def closed_book_messages(record: Record) -> list[dict]:
    """The question without its context (for the knowledge-grounding check)."""
    body = record.question
    if record.options:
        body += "\n\n" + "\n".join(f"{letter}. {o}" for letter, o in zip("ABCD", record.options, strict=True))
    return [{"role": "user", "content": f"{body}\n\n{MC_FORMAT if record.options else QA_FORMAT}"}]


def _correct_counts(records, prompts, answer_fn: AnswerFn, is_correct: IsCorrect, k: int) -> list[int]:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    responses = answer_fn(prompts, k)
    if len(responses) != len(records) or any(len(r) != k for r in responses):
        raise ValueError(f"answer_fn returned {[len(r) for r in responses]} responses for {len(records)} prompts × {k}")
    return [sum(bool(is_correct(r, a)) for a in answers) for r, answers in zip(records, responses, strict=True)]


def knowledge_grounding(
    records: Sequence[Record], answer_fn: AnswerFn, is_correct: IsCorrect, *, k: int = 1
) -> tuple[list[Record], Dropped]:
    """Drop records the model answers correctly without the documents (in any of ``k`` tries)."""
    counts = _correct_counts(records, [closed_book_messages(r) for r in records], answer_fn, is_correct, k)
    kept, dropped = [], []
    for record, correct in zip(records, counts, strict=True):
        if correct:
            dropped.append((record, f"answered correctly without the context in {correct} of {k} tries"))
        else:
            kept.append(_checked(record, "grounding", {"correct": 0, "k": k}))
    return kept, dropped


def add_distractors(
    context: str, distractors: Sequence[str], rng: random.Random, protected: Sequence[tuple[int, int]] = ()
) -> str:
    """``context`` with each distractor document (stripped, then a blank line) inserted at a random paragraph
    boundary — the start, or just after a blank line — that lies strictly inside none of the ``protected`` character
    spans (the evidence documents), so evidence stays whole."""
    cuts = [0] + [m.end() for m in re.finditer(re.escape(SEPARATOR), context)]
    cuts = sorted({c for c in cuts if not any(a < c < b for a, b in protected)})
    at = sorted((rng.choice(cuts), i) for i in range(len(distractors)))
    pieces, pos = [], 0
    for cut, i in at:
        pieces += [context[pos:cut], distractors[i].strip() + SEPARATOR]
        pos = cut
    return "".join(pieces) + context[pos:]


def robustness(
    records: Sequence[Record],
    answer_fn: AnswerFn,
    is_correct: IsCorrect,
    distractors: Sequence[str],
    *,
    per_record: int = 3,
    k: int = 4,
    seed: int = 0,
    base_dir: str | Path = ".",
) -> tuple[list[Record], Dropped]:
    """Keep records still answered (pass@k > 0) after ``per_record`` extra irrelevant documents, drawn from
    ``distractors`` with a generator seeded by ``(seed, record id)``, join the context at random paragraph boundaries
    outside the evidence documents."""
    if not 0 <= per_record <= len(distractors):
        raise ValueError(f"per_record={per_record} distractors asked for, {len(distractors)} given")
    prompts = []
    for record in records:
        rng = random.Random(f"{seed}:{record.id}")
        spans = [(d["char_start"], d["char_end"]) for d in record.evidence["docs"]]
        extra = rng.sample(list(distractors), per_record)
        context = add_distractors(read_context(record, base_dir), extra, rng, spans)
        prompts.append([{"role": "user", "content": user_prompt(record.question, context, record.options)}])
    kept, dropped = [], []
    for record, correct in zip(records, _correct_counts(records, prompts, answer_fn, is_correct, k), strict=True):
        if correct:
            kept.append(_checked(record, "robustness", {"correct": correct, "k": k}))
        else:
            dropped.append((record, f"pass@{k} is 0 with {per_record} extra distractor documents"))
    return kept, dropped


def pass_rates(
    records: Sequence[Record], answer_fn: AnswerFn, is_correct: IsCorrect, *, k: int = 8, base_dir="."
) -> list[float]:
    """Fraction of ``k`` responses that are correct, per record (with the full context)."""
    prompts = [
        [{"role": "user", "content": user_prompt(r.question, read_context(r, base_dir), r.options)}] for r in records
    ]
    return [c / k for c in _correct_counts(records, prompts, answer_fn, is_correct, k)]


def difficulty(
    records: Sequence[Record],
    answer_fn: AnswerFn,
    is_correct: IsCorrect,
    *,
    k: int = 8,
    base_dir=".",
    keep: tuple[float, float] = (0.0, 1.0),
) -> tuple[list[Record], Dropped]:
    """Measure pass@k with the full context (kept records carry ``checks["difficulty"] = {"correct", "k"}`` for
    :func:`difficulty_bins`) and drop records whose pass rate lies outside ``keep = (lo, hi)``, both inclusive."""
    lo, hi = keep
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"keep=({lo}, {hi}) must satisfy 0 <= lo <= hi <= 1")
    kept, dropped = [], []
    for record, rate in zip(records, pass_rates(records, answer_fn, is_correct, k=k, base_dir=base_dir), strict=True):
        if lo <= rate <= hi:
            kept.append(_checked(record, "difficulty", {"correct": round(rate * k), "k": k}))
        else:
            dropped.append((record, f"pass rate {rate:.3g} with the context is outside [{lo}, {hi}]"))
    return kept, dropped


def dedup(records: Sequence[Record]) -> tuple[list[Record], Dropped]:
    """Keep the first record of each question (case, punctuation and spacing ignored)."""
    first: dict[str, str] = {}
    kept, dropped = [], []
    for record in records:
        key = re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", record.question.lower())).strip()
        if key in first:
            dropped.append((record, f"same question as record {first[key]}"))
        else:
            first[key] = record.id
            kept.append(record)
    return kept, dropped


def difficulty_bins(
    records: Sequence[Record], rates: Sequence[float], *, n_bins: int = 4, per_bin: int | None = None, seed: int = 0
) -> tuple[list[Record], Dropped]:
    """Stratify by pass rate into ``n_bins`` equal-width bins of [0, 1] and draw ``per_bin`` records from every
    non-empty bin (default: the size of the smallest non-empty bin). Returns (drawn in input order, not drawn)."""
    if len(records) != len(rates):
        raise ValueError(f"{len(records)} records but {len(rates)} pass rates")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    bins: dict[int, list[int]] = {}
    for i, rate in enumerate(rates):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"pass rate of record {records[i].id} is {rate}, outside [0, 1]")
        bins.setdefault(min(int(rate * n_bins), n_bins - 1), []).append(i)
    smallest = min((len(v) for v in bins.values()), default=0)
    per_bin = smallest if per_bin is None else per_bin
    if per_bin > smallest:
        sizes = {b: len(v) for b, v in sorted(bins.items())}
        raise ValueError(f"per_bin={per_bin} but the smallest non-empty bin holds {smallest} (bin sizes {sizes})")
    rng = random.Random(seed)
    chosen = {i for b in sorted(bins) for i in rng.sample(bins[b], per_bin)}
    bin_of = {i: b for b, members in bins.items() for i in members}
    drawn = [r for i, r in enumerate(records) if i in chosen]
    rest = [
        (r, f"difficulty bin {bin_of[i]} of {n_bins} holds {len(bins[bin_of[i]])} records; {per_bin} drawn per bin")
        for i, r in enumerate(records)
        if i not in chosen
    ]
    return drawn, rest


def llm_answer_fn(
    client: ChatClient, *, temperature: float = 0.7, max_tokens: int = 2048, workers: int = 1
) -> AnswerFn:
    """An ``answer_fn`` backed by an OpenAI-compatible endpoint: one request per sample, sample ``j`` with
    ``seed=j``, up to ``workers`` requests in flight (replies keep their prompt order)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def answer(prompts: list[list[dict]], k: int) -> list[list[str]]:
        jobs = [(messages, j) for messages in prompts for j in range(k)]

        def one(job):
            return client.chat(job[0], temperature=temperature, max_tokens=max_tokens, seed=job[1])

        with ThreadPoolExecutor(workers) as pool:
            replies = list(pool.map(one, jobs))
        return [replies[i * k : (i + 1) * k] for i in range(len(prompts))]

    return answer
