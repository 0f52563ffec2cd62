"""The cross-cutting rules of the benchmark suite (docs/eval-rules.md §1): middle truncation, the reasoning strip,
the SQuAD normaliser, cover-exact-match, token F1, and one-pass template substitution. Pure string functions."""

import re
from collections import Counter

from qlx.rl.rewards.text import normalize_answer as _normalize

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY = "Empty"  # SPELL's answer text for an unterminated <think>
_TAIL_CHARS = {"mc": 300, "docmath": 300, "qa": 1000}


def middle_truncate(ids, budget, style="longbench_v2"):
    """Keep the head and tail of ``ids`` when ``len(ids) > budget`` (§1.1).

    longbench_v2 (LongBench v2 and QwenLong-L1): ``ids[:L//2] + ids[-ceil(L/2):]``, exactly L ids (L = 5 on 0..9
    gives [0, 1, 7, 8, 9]). longbench_v1: ``int(L/2)`` ids on each side, 2·floor(L/2) in all (L = 5 gives
    [0, 1, 8, 9]). Returns a list; ``ids`` of length <= budget come back whole.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    if style == "longbench_v2":
        head, tail = budget // 2, budget - budget // 2
    elif style == "longbench_v1":
        head = tail = budget // 2
    else:
        raise ValueError(f"style must be 'longbench_v2' or 'longbench_v1', got {style!r}")
    return ids[:head] + (ids[-tail:] if tail else [])


def strip_reasoning(text, style="spell", task="qa"):
    """The answer part of a response that may hold a reasoning trace (§1.2).

    spell: with ``<think>`` present, "Empty" if ``</think>`` is missing, else the text after the last ``</think>``
    (stripped); else, if ``</think>`` occurs or the text contains "answer is" (for task "docmath" also
    ``\\boxed{``), the text after the last ``</think>`` (the whole text when there is none); else the last N
    characters, N = 300 for task "mc" / "docmath" and 1000 for "qa" (not stripped).
    qwenlong_l1: the text after the last ``</think>``, stripped; the whole text when there is no ``</think>``.
    """
    if style == "qwenlong_l1":
        cut = text.rfind(THINK_CLOSE)
        return text if cut < 0 else text[cut + len(THINK_CLOSE) :].strip()
    if style != "spell":
        raise ValueError(f"style must be 'spell' or 'qwenlong_l1', got {style!r}")
    if task not in _TAIL_CHARS:
        raise ValueError(f"task must be one of {sorted(_TAIL_CHARS)}, got {task!r}")
    if THINK_OPEN in text:
        cut = text.rfind(THINK_CLOSE)
        return EMPTY if cut < 0 else text[cut + len(THINK_CLOSE) :].strip()
    if THINK_CLOSE in text or "answer is" in text or (task == "docmath" and "\\boxed{" in text):
        return text.rsplit(THINK_CLOSE, 1)[-1]
    return text[-_TAIL_CHARS[task] :]


def spell_answer_text(text, task):
    """The text SPELL's extractors read: :func:`strip_reasoning` (spell), falling back to the whole response when
    the stripped text is empty (e.g. a response that ends at ``</think>``)."""
    stripped = strip_reasoning(text, "spell", task)
    return stripped if stripped else text


def normalize_answer(s):
    """N(s) of §1.3: lowercase; delete ASCII ``string.punctuation``; whole-word a/an/the become a space; collapse
    whitespace. ``Jean-Paul`` → ``jeanpaul``, ``3.5`` → ``35``, curly quotes survive."""
    return _normalize(s, ascii_only=True)


def cem(pred, gold, strict=True):
    """Cover exact match (§1.4). strict (the paper's CEM): 1 iff N(gold) and N(pred) are non-empty and N(gold) is a
    character substring of N(pred) (gold "10" matches "100"). strict=False (QwenLong-L1's sub_em): N(gold) ⊆ N(pred)
    or N(pred) ⊆ N(gold), with no emptiness guard (a pred of "the" matches everything)."""
    if pred is None:
        return 0.0
    p, g = normalize_answer(pred), normalize_answer(gold)
    if strict:
        return float(bool(p) and bool(g) and g in p)
    return float(g in p or p in g)


_YES_NO = ("yes", "no", "noanswer")


def token_f1(pred, gold, variant="longbench"):
    """SQuAD token F1 of N(pred) and N(gold) split on spaces (§1.3): 0 when no token is common (either side empty
    included), else 2PR/(P+R) over the multiset intersection. variant "qwenlong_l1" adds: if either normalised side is
    "yes", "no" or "noanswer" and the two differ, 0 ("yes it is" vs "yes": 0.5 in LongBench, 0 here)."""
    if variant not in ("longbench", "qwenlong_l1"):
        raise ValueError(f"variant must be 'longbench' or 'qwenlong_l1', got {variant!r}")
    if pred is None:
        return 0.0
    p, g = normalize_answer(pred), normalize_answer(gold)
    if variant == "qwenlong_l1" and (p in _YES_NO or g in _YES_NO) and p != g:
        return 0.0
    p_tokens, g_tokens = p.split(), g.split()
    common = sum((Counter(p_tokens) & Counter(g_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p_tokens), common / len(g_tokens)
    return 2 * precision * recall / (precision + recall)


def substitute(template, values):
    """Fill ``template``'s placeholders (the keys of ``values``, e.g. "$DOC$" or "{context}") in one pass, so a
    value that contains a placeholder (a document quoting "$Q$") is inserted verbatim, never re-substituted."""
    keys = sorted(values, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(k) for k in keys))
    return pattern.sub(lambda m: values[m.group(0)], template)
