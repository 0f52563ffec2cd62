"""Held-out accuracy per task type with 95% intervals, before and after training (what the demo's table shows).

Each question is answered ``samples`` times with the rollout sampling settings (the recipe evaluates at temperature
0.7, top-p 0.95). A response is correct when it matches the reference *exactly*:

    mc          the option letter (``qlx.rl.rewards.mc_score``)
    dialogue    the reference reproduced exactly (SequenceMatcher ratio 1, required prefix included)
    otherwise   the extracted answer equals the reference after normalisation (numbers and years: or its first
                number equals the reference's, so "1,386" matches "1386")

which is stricter than the training rewards (sub-EM containment, 1% numeric tolerance), so a policy cannot gain here
by gaming a lenient verifier. A question's score is its mean over the samples; intervals are over questions:

    mean ± 1.96 · s / √n         (s: sample std of the per-question scores; Wald, clipped to [0, 1])

and the change between two evaluations of the same questions is a paired interval on the per-question differences.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from qlx.data.records import Record
from qlx.rl import rewards
from qlx.rl.rewards.registry import dialogue_score, mc_score
from qlx.rollout.engine import generate
from qlx.train.inputs import Dataset

Z95 = 1.959964


def exact_score(record: Record, response: str) -> float:
    """1.0 when ``response`` answers the record exactly (see the module docstring), else 0.0."""
    gold = record.answer
    if record.task_type == "mc":
        return float(mc_score(response, gold) >= 1.0)
    if record.task_type == "dialogue":
        prefix = record.evidence.get("program", {}).get("prefix", "")
        return float(dialogue_score(response, gold, prefix=prefix) >= 1.0)
    pred = rewards.extract_answer(response)
    if rewards.exact_match(pred, gold):
        return 1.0
    return float(record.answer_type in ("number", "year") and rewards.numeric_match(pred, gold, rel_tol=1e-12) > 0)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval and the number of questions behind it."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{100 * self.mean:5.1f} [{100 * self.low:5.1f}, {100 * self.high:5.1f}]"


def mean_interval(scores: Sequence[float], *, clip: bool = True) -> Interval:
    """Mean of per-question scores with a 95% normal interval (clipped to [0, 1] when ``clip``)."""
    x = np.asarray(scores, np.float64)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    half = Z95 * float(x.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    low, high = mean - half, mean + half
    if clip:
        low, high = max(0.0, low), min(1.0, high)
    return Interval(mean, low, high, n)


@dataclasses.dataclass
class EvalResult:
    """Per-question scores (mean over samples) with each question's task type; intervals per task and overall."""

    scores: np.ndarray
    task_types: list[str]

    def by_task(self) -> dict[str, Interval]:
        names = sorted(set(self.task_types))
        types = np.asarray(self.task_types)
        return {name: mean_interval(self.scores[types == name]) for name in names}

    def overall(self) -> Interval:
        return mean_interval(self.scores)


def evaluate(
    model,
    dataset: Dataset,
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int = 64,
    progress: bool = True,
) -> EvalResult:
    """Sample ``samples`` answers per question of ``dataset`` and score them exactly (module docstring)."""
    tokenizer = dataset.builder.tokenizer
    n = len(dataset)
    scores = np.zeros((n, samples))
    per_batch = max(1, batch_size // samples)
    for start in tqdm(range(0, n, per_batch), desc="eval", disable=not progress, leave=False):
        indices = list(range(start, min(start + per_batch, n)))
        result = generate(
            model,
            [dataset.prompt(i) for i in indices for _ in range(samples)],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=[tokenizer.eos_id],
            seed=seed + start,
            return_logprobs=False,
        )
        for j, ids in enumerate(result.sequences()):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            scores[indices[j // samples], j % samples] = exact_score(dataset.records[indices[j // samples]], text)
    return EvalResult(scores=scores.mean(axis=1), task_types=[r.task_type for r in dataset.records])


def paired_change(before: EvalResult, after: EvalResult) -> Interval:
    """Mean change in per-question score (after − before) with its 95% paired interval (not clipped)."""
    if before.task_types != after.task_types:
        raise ValueError("the two evaluations cover different questions")
    return mean_interval(after.scores - before.scores, clip=False)


def format_table(before: EvalResult, after: EvalResult) -> str:
    """Accuracy (%) per task type before and after, with 95% intervals and the paired change."""
    rows = [("task type", "n", "before RL", "after RL", "change [95% CI]")]
    names = sorted(set(before.task_types))
    types = np.asarray(before.task_types)
    for name in [*names, "all"]:
        keep = np.ones(len(types), bool) if name == "all" else types == name
        b, a = mean_interval(before.scores[keep]), mean_interval(after.scores[keep])
        d = mean_interval(after.scores[keep] - before.scores[keep], clip=False)
        change = f"{100 * d.mean:+5.1f} [{100 * d.low:+5.1f}, {100 * d.high:+5.1f}]"
        rows.append((name, str(b.n), str(b), str(a), change))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
