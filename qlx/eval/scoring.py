"""The score of one response and the protocols' ways of combining a rule with a judge (docs/eval-rules.md §1.5)."""

import dataclasses

from qlx.eval.judge import parse_judge_reply

PROTOCOLS = ("official", "ql")


@dataclasses.dataclass(frozen=True)
class Score:
    """score: the final value in [0, 1]; extracted: the answer the rule and judge saw (None: nothing extracted);
    rule: the rule's value (None where the protocol has no rule); judge: the parsed judge verdict (None: not asked);
    judge_reply: the judge's reply text (None: not asked)."""

    score: float
    extracted: str | None
    rule: float | None = None
    judge: float | None = None
    judge_reply: str | None = None


def check_protocol(protocol):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be 'official' or 'ql', got {protocol!r}")


def rule_or_judge(rule, extracted, problem, gold, judge, parser):
    """QL: max(rule, judge), the judge asked only when rule < 1 and a judge is given (SPELL without --judge_all)."""
    if rule >= 1.0 or judge is None:
        return Score(rule, extracted, rule=rule)
    reply = judge(problem, "None" if extracted is None else extracted, gold)
    verdict = parse_judge_reply(reply, parser)
    return Score(max(rule, verdict), extracted, rule=rule, judge=verdict, judge_reply=reply)


def judge_only(extracted, problem, gold, judge, parser, benchmark):
    """Official CorpusQA and Frames: the judge alone decides."""
    if judge is None:
        raise ValueError(f"the official {benchmark} scorer is an LLM judge; pass judge=... (qlx eval: --judge-url)")
    reply = judge(problem, "None" if extracted is None else extracted, gold)
    verdict = parse_judge_reply(reply, parser)
    return Score(verdict, extracted, judge=verdict, judge_reply=reply)
