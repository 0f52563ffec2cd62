"""Rule verifiers: each maps (response or extracted answer, gold) to a score in [0, 1] in linear or bounded time.

A gold may be a list of acceptable strings; ``best_of`` takes the maximum. Empty answers never match.
"""

import difflib
import math
import re
from collections import Counter

from qlx.rl.rewards.text import answer_span, extract_answer, normalize_answer, strip_thinking


def best_of(score, pred, gold, **kwargs):
    """max over the gold strings of score(pred, g); gold is a string or a list/tuple of strings."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    for g in golds:
        if not isinstance(g, str):
            raise TypeError(f"gold answers must be strings, got {type(g).__name__}: {g!r}")
    return max((score(pred, g, **kwargs) for g in golds), default=0.0)


def exact_match(pred, gold):
    """1 if the normalised strings are equal and non-empty."""
    p = normalize_answer(pred)
    return float(bool(p) and p == normalize_answer(gold))


def sub_exact_match(pred, gold):
    """QwenLong-L1's sub-EM: 1 if either normalised string contains the other (both non-empty)."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    return float(bool(p) and bool(g) and (g in p or p in g))


def cover_exact_match(pred, gold):
    """Cover EM (CEM): 1 if the normalised gold is contained in the normalised prediction."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    return float(bool(g) and g in p)


def token_f1(pred, gold):
    """SQuAD token F1 of the normalised strings: 2·P·R / (P + R) over the multiset of common tokens."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


_LETTER_PAREN = re.compile(r"\(([A-Z])\)")
_LETTER_LEAD = re.compile(r"[^A-Za-z0-9]{0,20}([A-Z])(?:[).:]|[*\s]*$)")


def choice_letter(text):
    """The option letter of a multiple-choice answer: the first "(X)" among the first 1,000 characters, else a
    capital letter at the start that is the whole answer or is followed by ")", "." or ":" ("C", "**C**",
    "C) Paris", "C. Paris"), else None — so "I think B" has no letter."""
    head = text[:1000]
    hit = _LETTER_PAREN.search(head) or _LETTER_LEAD.match(head)
    return hit.group(1) if hit else None


def mc_letter_match(response, gold):
    """1 if the chosen letter (after the last "correct answer is", else of the extracted answer) equals gold's."""
    text = strip_thinking(response)
    span = answer_span(text)
    letter = choice_letter(extract_answer(response) if span is None else span)
    return float(letter is not None and letter == choice_letter(gold.strip().upper()))


_NUM_RUN = re.compile(r"[-+−]?\.?\d[\d.,]*")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SCALES = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12, "k": 1e3, "m": 1e6, "bn": 1e9}
_AFTER = re.compile(r"\s{0,3}(%|percent\b|[A-Za-z]{1,8})")


def _parse_run(run):
    """Numbers in a run of digits, dots and commas: "1,234.5" → [1234.5], "1,2,3" → [1, 2, 3]."""
    sign = -1.0 if run[0] in "-−" else 1.0
    body = run.lstrip("+-−").rstrip(".,")
    pieces = [body.replace(",", "")] if _THOUSANDS.fullmatch(body) else body.split(",")
    out = []
    for piece in pieces:
        try:
            out.append(sign * float(piece))
        except ValueError:
            continue
    return out


def parse_number(text):
    """The first number in ``text`` with its readings, or None. Thousands separators are dropped; a following
    "%"/"percent" adds the reading x/100 and a scale word (thousand, million, billion, k, m, bn) adds x·scale."""
    for hit in _NUM_RUN.finditer(text[:100_000]):
        values = _parse_run(hit.group(0))
        if not values:
            continue
        value = values[0]
        readings = {value}
        after = _AFTER.match(text, hit.end())
        if after:
            word = after.group(1).lower()
            if word in ("%", "percent"):
                readings.add(value / 100.0)
            elif word in _SCALES:
                readings.add(value * _SCALES[word])
        return readings
    return None


_NUMBER_ANSWER = re.compile(
    r"[-+−]?[\d.,]*\d(?:\s*+(?:%|percent|thousand|million|billion|trillion|k|m|bn))?", re.IGNORECASE
)


def is_number_answer(text):
    """Whether ``text`` is one number (thousands separators, a percent sign or scale word allowed) and nothing else.

    Matched on the stripped text with one possessive whitespace run, so no input backtracks quadratically."""
    return _NUMBER_ANSWER.fullmatch(text.strip()) is not None


def numeric_match(pred, gold, *, rel_tol=1e-2):
    """1 if some reading of the first number of ``pred`` is within ``rel_tol`` (relative) of some reading of
    gold's first number (percent and scale readings included; 0 compares with an absolute 1e-9)."""
    p, g = parse_number(pred), parse_number(gold)
    if p is None or g is None:
        return 0.0
    return float(any(math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9) for a in p for b in g if math.isfinite(a)))


def sequence_ratio(response, gold, *, prefix="", max_chars=4096):
    """MRCR score: 0 unless the response (after thinking, leading whitespace dropped) starts with ``prefix``; else
    difflib.SequenceMatcher(None, response, gold).ratio() with the prefix removed from both.

    SequenceMatcher takes time quadratic in the lengths on unfavourable text (a 16K-character gold with ~100
    distinct characters already takes seconds), so both strings are matched on at most their ``max_chars`` leading
    characters while the ratio keeps their full lengths: 2·M / (len(response) + len(gold)), where M is the matched
    size of the heads. Equal strings score 1 whatever their length. Strings within
    ``max_chars`` get the exact ratio.
    """
    text = strip_thinking(response).lstrip()
    if not text.startswith(prefix):
        return 0.0
    text, gold = text[len(prefix) :], gold.removeprefix(prefix)
    if text == gold:
        return 1.0
    matcher = difflib.SequenceMatcher(None, text[:max_chars], gold[:max_chars])
    matched = sum(block.size for block in matcher.get_matching_blocks())
    return 2.0 * matched / (len(text) + len(gold))
