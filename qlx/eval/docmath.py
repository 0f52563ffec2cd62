"""DocMath-Eval (docs/eval-rules.md §4): numeric reasoning over financial documents; testmini has 800 items in four
subsets (complong 300, compshort 200, simplong 100, simpshort 200).

Data: ``{subset}_testmini.json`` or ``{subset}-testmini.json`` (a JSON array, or JSONL) per subset; the test split
hides ``ground_truth`` and is reported as malformed. Context = ``paragraphs`` joined by "\\n".

Scoring compares numbers with :func:`docmath_match` (three variants: official, qwenlong_l1, spell), whose
normaliser ends in a small arithmetic parser — model text never reaches ``eval``. Extraction is SPELL's regex
extractor in both protocols: the official pipeline's LLM extractor (gpt-3.5-turbo) is not reproduced, so "official"
here means the official comparison on a rule-extracted answer (see README).
"""

import math
import re

from qlx.eval.records import Item, Loaded, RecordError, find_files, load_records, require
from qlx.eval.scoring import Score, check_protocol, rule_or_judge
from qlx.eval.text import spell_answer_text, substitute
from qlx.rl.rewards.text import last_boxed

NAME = "docmath"
TASK = "docmath"
SUBSETS = ("complong", "compshort", "simplong", "simpshort")
SPLITS = ("subset",)
GENERATION = {"official": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 1024}}
VARIANTS = ("official", "qwenlong_l1", "spell")

OFFICIAL_SYSTEM = (
    "You are a financial expert, you are supposed to answer the given question based on the provided financial "
    "document context. You need to first think through the problem step by step, documenting each necessary step. "
    "Then you are required to conclude your response with the final answer in your last sentence as 'Therefore, "
    "the answer is {final answer}'. The final answer should be a numeric value."
)
OFFICIAL_USER = "{context}\n\nQuestion: {question}\n\nLet's think step by step to answer the given question."
QL_FORMAT = (
    'Please reason step by step, and format your answer as follows: "Therefore, the answer is (insert answer here)."'
)
QL_TEMPLATE = f"""You are an expert in document analysis and numerical reasoning. Read the following text, reason \
step by step, and finish with "Therefore, the answer is (insert answer here)"; the answer should be a number.

<text>
{{context}}
</text>

Question: {{question}}

{QL_FORMAT}"""

_FILE = re.compile(r"(complong|compshort|simplong|simpshort)[_-](testmini|test)")


def _item_for(subset):
    def make(record, path):
        require(record, {"question_id": str, "question": str, "paragraphs": list})
        if "ground_truth" not in record:
            raise RecordError("missing key 'ground_truth' (the test split hides its answers; use testmini)")
        if not isinstance(record["ground_truth"], int | float | bool):
            raise RecordError(f"key 'ground_truth' must be a number, got {type(record['ground_truth']).__name__}")
        if not all(isinstance(p, str) for p in record["paragraphs"]):
            raise RecordError("key 'paragraphs' must be a list of strings")
        return Item(NAME, f"{subset}/{record['question_id']}", record, {"subset": subset})

    return make


def load(root):
    """Items of every ``{subset}_{split}`` file under ``root``; the subset comes from the file name."""
    loaded = Loaded([], [], [])
    files = find_files(root, ("*testmini*.json", "*testmini*.jsonl", "*.json", "*.jsonl"), "DocMath")
    for path in files:
        hit = _FILE.search(path.name)
        if hit is None:
            loaded.problems.append(f"{path}: file name names no subset ({', '.join(SUBSETS)}); skipped")
            continue
        loaded.add(load_records([path], NAME, _item_for(hit.group(1))))
    return loaded


def context(record):
    return "\n".join(record["paragraphs"])


def messages(record, protocol):
    """official: the CoT system + user pair; ql: SPELL's ``docmath_qa`` single user message (paraphrased)."""
    check_protocol(protocol)
    values = {"{context}": context(record), "{question}": record["question"]}
    if protocol == "official":
        return [
            {"role": "system", "content": OFFICIAL_SYSTEM},
            {"role": "user", "content": substitute(OFFICIAL_USER, values)},
        ]
    return [{"role": "user", "content": substitute(QL_TEMPLATE, values)}]


def memory_inputs(record, protocol):
    """(paragraphs, question, QL's format line) for the memory agent, in both protocols."""
    check_protocol(protocol)
    return context(record), f"Question: {record['question']}", QL_FORMAT


_NUM = r"=?≈?`?%?\$?°?£?€?¥?-?[0-9.,]+"
_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        rf"the answer is \(({_NUM})\)",
        rf"the answer is ({_NUM})",
        rf"answer is \(({_NUM})\)",
        rf"answer is ({_NUM})",
    )
)


def extract(response, protocol):
    """SPELL's DocMath extractor (§4.3): the SPELL strip (N = 300), delete ``*``; with ``\\boxed{`` the last
    balanced box (None if unbalanced); else the first of four "answer is" patterns that matches decides with its
    last match. Commas deleted, trailing dots stripped. ``$-1,200`` → ``$-1200``; ``-$1,200``, ``: 42`` → None."""
    check_protocol(protocol)
    text = spell_answer_text(response, TASK).replace("*", "")
    if "\\boxed{" in text:
        inner = last_boxed(text, ("\\boxed{",))
        return None if inner is None else inner.replace(",", "").rstrip(".")
    for pattern in _PATTERNS:
        hits = pattern.findall(text)
        if hits:
            return hits[-1].replace(",", "").rstrip(".")
    return None


# ---- the safe arithmetic parser (numbers, + - * / **, parentheses, pow, True/False, comma tuples) ----

_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|(\*\*|[-+*/(),])|(True|False|pow))")
_MAX_EXPONENT = 4096


class _ParseError(ValueError):
    pass


def _tokens(s):
    out, i = [], 0
    while i < len(s):
        hit = _TOKEN.match(s, i)
        if hit is None:
            if s[i:].strip():
                raise _ParseError(f"unexpected text at {s[i : i + 10]!r}")
            break
        number, op, name = hit.groups()
        if number is not None:
            is_int = re.fullmatch(r"\d+", number) is not None
            if is_int and len(number) > 1 and number[0] == "0" and number.strip("0"):
                raise _ParseError("leading zeros in an integer (a syntax error in Python)")
            out.append(("num", int(number) if is_int else float(number)))
        else:
            out.append(("op", op or name))
        i = hit.end()
    return out


class _Parser:
    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def take(self, op=None):
        kind, value = self.peek()
        if kind is None or (op is not None and value != op):
            raise _ParseError(f"expected {op or 'more input'}")
        self.i += 1
        return kind, value

    def expression(self):
        first = self.sum()
        if self.peek() != ("op", ","):
            return first
        items = [first]
        while self.peek() == ("op", ","):
            self.take(",")
            if self.peek()[0] is None or self.peek() == ("op", ")"):
                break
            items.append(self.sum())
        return tuple(items)

    def sum(self):
        value = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            _, op = self.take()
            right = self.term()
            value = value + right if op == "+" else value - right
        return value

    def term(self):
        value = self.unary()
        while self.peek() in (("op", "*"), ("op", "/")):
            _, op = self.take()
            right = self.unary()
            value = value * right if op == "*" else value / right
        return value

    def unary(self):
        if self.peek() in (("op", "-"), ("op", "+")):
            _, op = self.take()
            value = self.unary()
            return -value if op == "-" else +value
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() == ("op", "**"):
            self.take("**")
            return _pow(base, self.unary())
        return base

    def atom(self):
        kind, value = self.take()
        if kind == "num":
            return value
        if value in ("True", "False"):
            return value == "True"
        if value == "pow":
            self.take("(")
            base = self.sum()
            self.take(",")
            exponent = self.sum()
            self.take(")")
            return _pow(base, exponent)
        if value == "(":
            inner = self.expression()
            self.take(")")
            return inner
        raise _ParseError(f"unexpected {value!r}")


def _pow(base, exponent):
    if isinstance(base, tuple) or isinstance(exponent, tuple) or abs(exponent) > _MAX_EXPONENT:
        raise _ParseError("exponent out of range")
    return base**exponent


def safe_eval(s):
    """The value of an arithmetic expression: numbers (ints, decimals, exponents), + - * / **, parentheses,
    ``pow(a, b)``, True/False and comma tuples, with Python's semantics; anything else raises ``ValueError``."""
    parser = _Parser(_tokens(s))
    value = parser.expression()
    if parser.i != len(parser.tokens):
        raise _ParseError("trailing input")
    return value


# ---- normalise and compare (§4.4) ----

_UNITS = ("£", "€", "¥", "million", "billion", "thousand", "US", "USD", "RMB")
_N = r"[-+]?[\d,]*\.*\d+"
_UNIT_RULES = (
    re.compile(rf"({_N})\s[^\d\s]+"),
    re.compile(rf"[^\d\s]+\s({_N})"),
    re.compile(rf"({_N})[^\d]{{1,2}}"),
    re.compile(r"[^-+\d]{1,2}([\d,]*\.*\d+)"),
)
_WELL_FORMED = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_OPTION = re.compile(r"\(([a-d])\)")


def normalize(s, variant="official"):
    """DocMath's normaliser (§4.4 steps 1-13) with the safe parser in place of ``eval``: the number (or bool, or
    list, or option string "(a)".."(d)") a string stands for. Empty or unparsable: 0 (official, qwenlong_l1) or
    999999999 (spell)."""
    fail = 999999999 if variant == "spell" else 0
    s = str(s).strip().rstrip(".")
    for unit in _UNITS:
        s = s.replace(unit, "")
    for sign in ("=", "≈"):
        if sign in s:
            s = s.rsplit(sign, 1)[-1]
    for char in "`%$°":
        s = s.replace(char, "")
    if s.strip().lower() in ("true", "yes"):
        s = "True"
    elif s.strip().lower() in ("false", "no"):
        s = "False"
    if "True" in s:
        s = "True"
    elif "False" in s:
        s = "False"
    s = s.replace("approximately", "")
    if " or " in s:
        s = s.split(" or ", 1)[0]
    s = s.strip()
    for rule in _UNIT_RULES:
        hit = rule.fullmatch(s)
        if hit:
            s = hit.group(1)
    s = re.sub(r"10\^(-?\d+)", r"pow(10,\1)", s).replace(" x ", "*").replace(" × ", "*")
    if _WELL_FORMED.fullmatch(s):
        s = s.replace(",", "")
    option = _OPTION.search(s)
    if option:
        return f"({option.group(1)})"
    if not s.strip():
        return fail
    try:
        value = safe_eval(s)
    except (ValueError, ZeroDivisionError, OverflowError):
        return fail
    if isinstance(value, tuple):
        return [v.real if isinstance(v, complex) else v for v in value]
    return value.real if isinstance(value, complex) else value


def _within(a, b):
    eps = 0.0015 * abs(b)
    return b - eps <= a <= b + eps


def _ceil(x, k):
    return math.ceil(x * 10**k) / 10**k


def _compare(p, gt, variant):
    if not isinstance(p, int | float) or not isinstance(gt, int | float):
        return False
    if isinstance(gt, bool):
        return p == gt
    v1, v2 = max(abs(p), abs(gt)), min(abs(p), abs(gt))
    if variant != "spell" and v1 != 0 and v2 != 0 and math.log10(v1 / v2).is_integer():
        return True
    if variant == "spell":
        if any(v2 <= 2 * v1 / s and _within(s * v2, v1) for s in (100, 1000, 10**6, 10**9)):
            return True
    elif (
        (v2 <= v1 / 50 and _within(100 * v2, v1))
        or (v2 <= v1 / 500 and _within(1000 * v2, v1))
        or (v2 <= v1 / 50000 and _within(100000 * v2, v1))
    ):
        return True
    k = 2 if variant == "qwenlong_l1" else 3
    if _ceil(v1, k) == _ceil(v2, k):
        return True
    return _within(p, gt)


def docmath_match(pred, gold, variant="official"):
    """1.0 iff DocMath's ``compare`` accepts ``pred`` (a string) against ``gold`` (a number, or a string) (§4.4).

    Both sides are normalised, except that the official variant takes a numeric gold as it is. Steps: (a, official
    and qwenlong_l1) equal magnitudes up to a power of ten; (b) a percent/scale slip — official: ×100, ×1000, ×10⁵
    with the guards v2 ≤ v1/50, /500, /50000; spell: ×100, ×10³, ×10⁶, ×10⁹ with v2 ≤ 2·v1/s; (c) equal when both
    magnitudes are rounded up to 3 decimals (qwenlong_l1: 2); (d) pred within 0.15% of gold. Sign is ignored by
    a-c. Any error is 0.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    try:
        p = normalize(pred, variant)
        numeric = isinstance(gold, int | float)
        g = gold if variant == "official" and numeric else normalize(str(gold), variant)
        return float(_compare(p, g, variant))
    except (ValueError, TypeError, OverflowError, ZeroDivisionError):
        return 0.0


def score(response, record, protocol="ql", judge=None, parser="p3"):
    """official: the official comparison of the extracted answer (None scores 0). ql: rule = SPELL's comparison
    when something was extracted (else 0), then max(rule, J-EQ judge) when rule < 1."""
    extracted = extract(response, protocol)
    gold = record["ground_truth"]
    if protocol == "official":
        return Score(docmath_match(extracted, gold, "official") if extracted else 0.0, extracted)
    rule = docmath_match(extracted, str(gold), "spell") if extracted else 0.0
    return rule_or_judge(rule, extracted, record["question"], str(gold), judge, parser or "p3")
