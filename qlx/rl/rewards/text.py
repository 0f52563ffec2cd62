"""Answer extraction and normalisation: pure string functions, linear time, never raising on a string."""

import collections
import re
import string

THINK_END = "</think>"
_ANSWER_PHRASE = re.compile(r"the (?:correct )?answer is", re.IGNORECASE)
_PUNCT = str.maketrans("", "", string.punctuation + "‘’“”–—…")
_ASCII_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_BOXED = ("\\boxed{", "\\fbox{")


def strip_thinking(response):
    """The text after the last ``</think>`` (the whole text when there is none)."""
    cut = response.rfind(THINK_END)
    return response if cut < 0 else response[cut + len(THINK_END) :]


def last_boxed(text, tags=_BOXED):
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``; ``tags`` names the openers) with balanced braces,
    or None."""
    start = max(text.rfind(tag) for tag in tags)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def answer_span(text):
    """Text after the last "the answer is" / "the correct answer is" (case-insensitive), up to the end of its line
    (the first non-empty line), or None when no phrase occurs."""
    last = collections.deque(_ANSWER_PHRASE.finditer(text), maxlen=1)
    if not last:
        return None
    rest = text[last[0].end() :].lstrip(" \t\r\n:*")
    line_end = rest.find("\n")
    return rest if line_end < 0 else rest[:line_end]


def extract_answer(response):
    """The recipe's answer extraction: after the last ``</think>``, the span after the last answer phrase (else the
    whole text); inside it, the last ``\\boxed{}`` content if any. Trailing markdown and whitespace are stripped."""
    text = strip_thinking(response)
    span = answer_span(text)
    span = text if span is None else span
    boxed = last_boxed(span)
    return (span if boxed is None else boxed).strip().strip("*").strip()


def normalize_answer(text, *, ascii_only=False):
    """SQuAD normalisation: lower case, drop punctuation, drop the articles a/an/the, squeeze whitespace.
    Punctuation is Python's ``string.punctuation`` plus curly quotes, dashes and the ellipsis; ``ascii_only=True``
    drops only ``string.punctuation`` (the LongBench / SQuAD rule the evaluator must match byte for byte)."""
    text = text.lower().translate(_ASCII_PUNCT if ascii_only else _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())
