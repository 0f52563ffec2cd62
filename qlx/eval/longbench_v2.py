"""LongBench-V2 (docs/eval-rules.md §2): 503 four-way multiple-choice questions over 8K–2M-word contexts.

Data: the released ``data.json`` (a JSON array; ``THUDM/LongBench-v2``) or the same records as JSONL. Splits:
difficulty easy/hard, length short/medium/long (pre-assigned by words; never recomputed). Scoring: 1 iff the
extracted letter equals ``answer``, no judge (both protocols); an empty or missing answer scores 0 and is counted
(the official script drops empty API outputs instead, §2.6).
"""

import re

from qlx.eval.records import Item, RecordError, find_files, load_records, require
from qlx.eval.scoring import Score, check_protocol
from qlx.eval.text import spell_answer_text, strip_reasoning, substitute

NAME = "longbench_v2"
TASK = "mc"
LETTERS = "ABCD"
FIELDS = {
    "_id": str,
    "domain": str,
    "difficulty": str,
    "length": str,
    "question": str,
    "choice_A": str,
    "choice_B": str,
    "choice_C": str,
    "choice_D": str,
    "answer": str,
    "context": str,
}
SPLITS = ("difficulty", "length")
GENERATION = {"official": {"temperature": 0.1, "top_p": 1.0, "max_new_tokens": 128}}

_READ = """Please read the following text and answer the question below.

<text>
$DOC$
</text>

"""
_QUESTION = """What is the correct answer to this question: $Q$
Choices:
(A) $C_A$
(B) $C_B$
(C) $C_C$
(D) $C_D$"""
FORMATS = {
    "official": 'Format your response as follows: "The correct answer is (insert answer here)".',
    "ql": 'Format your answer as follows: "The correct answer is (insert answer here)."',
}
OFFICIAL_TEMPLATE = f"{_READ}{_QUESTION}\n\n{FORMATS['official']}"
QL_TEMPLATE = f"{_READ}{_QUESTION}\n\n{FORMATS['ql']}"


def _item(record, path):
    require(record, FIELDS)
    if record["answer"] not in LETTERS:
        raise RecordError(f"key 'answer' must be one of A, B, C, D, got {record['answer']!r}")
    difficulty = "easy" if record["difficulty"] == "easy" else "hard"
    length = record["length"] if record["length"] in ("short", "medium") else "long"
    return Item(NAME, record["_id"], record, {"difficulty": difficulty, "length": length})


def load(root):
    """Items from ``root`` (``data.json``, or a folder holding it or ``*.jsonl``)."""
    return load_records(find_files(root, ("data.json", "*.json", "*.jsonl"), "LongBench-V2"), NAME, _item)


def _values(record):
    values = {"$DOC$": record["context"].strip(), "$Q$": record["question"].strip()}
    values.update({f"$C_{x}$": record[f"choice_{x}"].strip() for x in LETTERS})
    return values


def messages(record, protocol):
    """One user message: the official ``0shot.txt`` prompt, or QL's SPELL ``doc_mc`` prompt (without SPELL's
    4-space indentation of the question block); fields stripped, placeholders filled in one pass."""
    check_protocol(protocol)
    template = OFFICIAL_TEMPLATE if protocol == "official" else QL_TEMPLATE
    return [{"role": "user", "content": substitute(template, _values(record))}]


def memory_inputs(record, protocol):
    """(document, question with its choices, the protocol's format line) for the memory agent."""
    check_protocol(protocol)
    return record["context"].strip(), substitute(_QUESTION, _values(record)), FORMATS[protocol]


_OFFICIAL = (re.compile(r"The correct answer is \(([A-D])\)"), re.compile(r"The correct answer is ([A-D])"))
_SPELL = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\\boxed\{([A-D])\}",
        r"correct answer is \(([A-D])\)",
        r"correct answer is ([A-D])",
        r"answer is \(([A-D])\)",
        r"answer is ([A-D])",
    )
)


def extract(response, protocol):
    """The chosen letter or None (§2.3). official: after the reasoning strip (QwenLong-L1 style, a no-op for API
    models), delete ``*``, the first "The correct answer is (X)", else the first "The correct answer is X" (no word
    boundary: "...is Both" gives B). ql (SPELL): the SPELL strip (N = 300), delete ``*``; the first of five
    case-insensitive patterns that matches at all decides with its last match; a lower-case letter gives None."""
    check_protocol(protocol)
    if protocol == "official":
        text = strip_reasoning(response, "qwenlong_l1").replace("*", "")
        for pattern in _OFFICIAL:
            hit = pattern.search(text)
            if hit:
                return hit.group(1)
        return None
    text = spell_answer_text(response, TASK).replace("*", "").strip()
    for pattern in _SPELL:
        hits = pattern.findall(text)
        if hits:
            return hits[-1] if hits[-1] in LETTERS else None
    return None


def score(response, record, protocol="ql", judge=None, parser=None):
    """1 iff the extracted letter is ``answer`` (no judge in either protocol)."""
    letter = extract(response, protocol)
    return Score(float(letter is not None and letter == record["answer"]), letter, rule=None)
