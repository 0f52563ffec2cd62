"""Rewards: answer extraction, rule verifiers, the task-type registry and the optional LLM judge.

from qlx.rl import rewards
rewards.reward("reading", response, "Paris")                       # rule only
rewards.reward("dialogue", response, gold, prefix="x7Qa")           # MRCR ratio with its prefix
judge = rewards.Judge(rewards.JudgeConfig("http://127.0.0.1:8000/v1", "gpt-oss-120b"))
rewards.reward("multihop", response, gold, question=q, judge=judge)  # max(rule, judge)
"""

from qlx.rl.rewards.judge import Judge, JudgeConfig, parse_verdict
from qlx.rl.rewards.match import (
    best_of,
    choice_letter,
    cover_exact_match,
    exact_match,
    is_number_answer,
    mc_letter_match,
    numeric_match,
    parse_number,
    sequence_ratio,
    sub_exact_match,
    token_f1,
)
from qlx.rl.rewards.registry import VERIFIERS, Verifier, get_verifier, register_verifier, reward, rule_reward
from qlx.rl.rewards.text import answer_span, extract_answer, last_boxed, normalize_answer, strip_thinking

__all__ = [
    "VERIFIERS",
    "Judge",
    "JudgeConfig",
    "Verifier",
    "answer_span",
    "best_of",
    "choice_letter",
    "cover_exact_match",
    "exact_match",
    "extract_answer",
    "get_verifier",
    "is_number_answer",
    "last_boxed",
    "mc_letter_match",
    "normalize_answer",
    "numeric_match",
    "parse_number",
    "parse_verdict",
    "register_verifier",
    "reward",
    "rule_reward",
    "sequence_ratio",
    "strip_thinking",
    "sub_exact_match",
    "token_f1",
]
