"""Task type → verifier, and the training reward r = max(rule, judge) (QwenLong-L1.5 §5.1).

The five task types of the recipe's sampler, as the data records name them:

    mc         multiple choice                      option-letter match on "The correct answer is (X)"
    multihop   doc multi-hop reasoning              sub-EM of the extracted answer (containment either way)
    reading    general reading comprehension        sub-EM of the extracted answer
    numerical  corpus-level numerical calculation   numeric match with relative tolerance (rel_tol, 1e-2); sub-EM
                                                    for non-numeric golds (the entity of an arg-max, a ranking)
    dialogue   dialogue memory (MRCR-style)         SequenceMatcher ratio with the required prefix (prefix="")

Only ``judged`` types (multihop, reading, numerical) ask the judge, and only when the rule scored below 1.
"""

import dataclasses
from collections.abc import Callable

from qlx.rl.rewards.match import (
    best_of,
    is_number_answer,
    mc_letter_match,
    numeric_match,
    sequence_ratio,
    sub_exact_match,
)
from qlx.rl.rewards.text import extract_answer


@dataclasses.dataclass(frozen=True)
class Verifier:
    """score(response, gold, **options) → [0, 1]; judged: whether the LLM judge may raise a failed rule score."""

    score: Callable[..., float]
    judged: bool = False


def qa_score(response, gold):
    return best_of(sub_exact_match, extract_answer(response), gold)


def mc_score(response, gold):
    return best_of(mc_letter_match, response, gold)


def _numerical_match(pred, gold, *, rel_tol):
    return numeric_match(pred, gold, rel_tol=rel_tol) if is_number_answer(gold) else sub_exact_match(pred, gold)


def numerical_score(response, gold, *, rel_tol=1e-2):
    return best_of(_numerical_match, extract_answer(response), gold, rel_tol=rel_tol)


def dialogue_score(response, gold, *, prefix=""):
    return best_of(sequence_ratio, response, gold, prefix=prefix)


VERIFIERS = {
    "mc": Verifier(mc_score),
    "multihop": Verifier(qa_score, judged=True),
    "reading": Verifier(qa_score, judged=True),
    "numerical": Verifier(numerical_score, judged=True),
    "dialogue": Verifier(dialogue_score),
}


def register_verifier(task_type, score, *, judged=False, replace=False):
    """Add (or with replace=True, change) the verifier of a task type."""
    if task_type in VERIFIERS and not replace:
        raise ValueError(f"task type {task_type!r} already has a verifier; pass replace=True to change it")
    VERIFIERS[task_type] = Verifier(score, judged)


def get_verifier(task_type):
    if task_type not in VERIFIERS:
        raise KeyError(f"no verifier for task type {task_type!r}; known: {sorted(VERIFIERS)}")
    return VERIFIERS[task_type]


def rule_reward(task_type, response, gold, **options):
    """The rule verifier's score of ``response`` (full model output, thinking included) against ``gold``."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    return float(get_verifier(task_type).score(response, gold, **options))


def reward(task_type, response, gold, *, question="", judge=None, **options):
    """max(rule, judge): the judge (a ``Judge``, or None) is asked only for judged task types whose rule score is
    below 1; it compares the extracted answer with each gold string. A failed judge leaves the rule score."""
    score = rule_reward(task_type, response, gold, **options)
    if judge is None or score >= 1.0 or not get_verifier(task_type).judged:
        return score
    pred = extract_answer(response)
    for g in [gold] if isinstance(gold, str) else gold:
        if judge.equivalent(question, pred, g):
            return 1.0
    return score
