"""qlx.eval: the recipe's six long-context benchmarks (QwenLong-L1.5 Table 7) with faithful scorers, as pure
functions, plus the ``qlx eval`` harness (generation store, judge, reports). Rules: docs/eval-rules.md.

- ``middle_truncate(ids, budget, style)``, ``strip_reasoning(text, style, task)``, ``normalize_answer(s)``,
  ``cem(pred, gold, strict)``, ``token_f1(pred, gold, variant)``: the cross-cutting rules.
- ``extract_answer(benchmark, response, protocol)``, ``score(benchmark, response, record, *, protocol, judge)``,
  ``aggregate(benchmark, rows)``: per benchmark (``longbench_v2``, ``mrcr``, ``docmath``, ``frames``, ``corpusqa``,
  ``longbench_v1_qa``; each a module with ``load``, ``messages``, ``extract``, ``score``).
- ``parse_judge_reply(reply, parser)``, ``Judge``, ``judge_messages``: LLM judges.
- ``docmath_match(pred, gold, variant)``, ``mrcr_bin(n_tokens, style)``.
"""

from qlx.eval.benchmarks import NAMES, aggregate, extract_answer, module, score, score_details, table7_average
from qlx.eval.docmath import docmath_match
from qlx.eval.judge import Judge, JudgeCache, judge_messages, parse_judge_reply
from qlx.eval.mrcr import mrcr_bin
from qlx.eval.records import Item, Loaded
from qlx.eval.scoring import Score
from qlx.eval.text import cem, middle_truncate, normalize_answer, strip_reasoning, token_f1

__all__ = [
    "NAMES",
    "Item",
    "Judge",
    "JudgeCache",
    "Loaded",
    "Score",
    "aggregate",
    "cem",
    "docmath_match",
    "extract_answer",
    "judge_messages",
    "middle_truncate",
    "module",
    "mrcr_bin",
    "normalize_answer",
    "parse_judge_reply",
    "score",
    "score_details",
    "strip_reasoning",
    "table7_average",
    "token_f1",
]
