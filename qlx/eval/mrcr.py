"""OpenAI MRCR (docs/eval-rules.md §3): multi-round co-reference over a synthetic conversation; 2/4/8 needles.

Data: ``{2,4,8}needle.parquet`` or the Dec-2025 layout ``{k}needle/{k}needle_{0,1}.parquet`` (parquet needs
pyarrow), or the same rows as JSONL. ``prompt`` is a JSON-encoded message list. Score: the card's grader, exactly —
0 unless the response starts with ``random_string_to_prepend``; else difflib's ratio (library defaults, autojunk
on) of response and answer, one prefix copy removed from each. Both protocols run it after the reasoning strip
(QwenLong-L1 style; INFERRED for QL, a no-op for API models). No judge.

Bins use ``n_tokens`` = tokens of every message content + tokens of the answer (the card counts o200k_base tokens;
qlx counts the evaluated model's own tokens, set by the evaluator before binning; see README).
"""

import difflib
import hashlib
import json

from qlx.eval.records import Item, RecordError, find_files, load_records, require
from qlx.eval.scoring import Score, check_protocol
from qlx.eval.text import strip_reasoning

NAME = "mrcr"
TASK = None
FIELDS = {"prompt": str, "answer": str, "random_string_to_prepend": str, "n_needles": int}
SPLITS = ("n_needles", "bin")
GENERATION = {"official": {"temperature": 0.0, "top_p": 1.0}}
BOUNDS = (4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)
BIN_NAMES = ("4K-8K", "8K-16K", "16K-32K", "32K-64K", "64K-128K", "128K-256K", "256K-512K", "512K-1M")


def mrcr_bin(n_tokens, style="card"):
    """The length bin (0..7) of a sample of ``n_tokens`` total tokens (§3.4).

    card (authoritative): [4096, 8192] is bin 0, then (2^k, 2^(k+1)] up to (524288, 1048576] = bin 7; outside
    [4096, 1048576] None. openbench: half-open [lo, hi) bins (the last one closed) and anything outside goes to bin 0,
    so exact powers of two land one bin higher than on the card (8192: card 0, openbench 1).
    """
    if style == "card":
        if n_tokens < BOUNDS[0] or n_tokens > BOUNDS[-1]:
            return None
        for i, hi in enumerate(BOUNDS[1:]):
            if n_tokens <= hi:
                return i
    if style == "openbench":
        for i in range(len(BOUNDS) - 1):
            lo, hi = BOUNDS[i], BOUNDS[i + 1]
            if lo <= n_tokens < hi or (i == len(BOUNDS) - 2 and n_tokens == hi):
                return i
        return 0
    raise ValueError(f"style must be 'card' or 'openbench', got {style!r}")


def _item(record, path):
    require(record, FIELDS)
    try:
        conversation = json.loads(record["prompt"])
    except ValueError as e:
        raise RecordError(f"key 'prompt' must be a JSON-encoded message list ({e})") from None
    if not isinstance(conversation, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in conversation
    ):
        raise RecordError("key 'prompt' must decode to a list of {role, content} messages")
    if not record["answer"].startswith(record["random_string_to_prepend"]):
        raise RecordError("key 'answer' does not begin with 'random_string_to_prepend'")
    digest = hashlib.sha1((record["prompt"] + "\0" + record["answer"]).encode()).hexdigest()[:16]
    return Item(NAME, f"{record['n_needles']}needle-{digest}", record, {"n_needles": str(record["n_needles"])})


def load(root):
    """Items from parquet or JSONL files under ``root`` (any of the released layouts)."""
    patterns = ("*needle.parquet", "*needle/*.parquet", "*.parquet", "*.jsonl", "*/*.jsonl")
    return load_records(find_files(root, patterns, "MRCR"), NAME, _item)


def messages(record, protocol):
    """The decoded conversation, sent as a multi-turn chat (no template)."""
    check_protocol(protocol)
    return json.loads(record["prompt"])


def memory_inputs(record, protocol):
    """(the conversation before the last message, as "role: content" paragraphs; the last user message, which names
    the needle and the prefix; no instructions) for the memory agent."""
    conversation = messages(record, protocol)
    document = "\n\n".join(f"{m['role']}: {m['content']}" for m in conversation[:-1])
    return document, conversation[-1]["content"], ""


def grade(response, answer, prefix):
    """The dataset card's grader: 0 unless ``response`` starts with ``prefix`` (exact, no trimming); else
    ``SequenceMatcher(None, response - prefix, answer - prefix).ratio()`` with library defaults."""
    if not response.startswith(prefix):
        return 0.0
    return difflib.SequenceMatcher(None, response.removeprefix(prefix), answer.removeprefix(prefix)).ratio()


def extract(response, protocol):
    """The response after the reasoning strip (what the grader reads)."""
    check_protocol(protocol)
    return strip_reasoning(response, "qwenlong_l1")


def score(response, record, protocol="ql", judge=None, parser=None):
    text = extract(response, protocol)
    return Score(grade(text, record["answer"], record["random_string_to_prepend"]), text)
