"""CorpusQA (docs/eval-rules.md §6): questions over whole corpora (Set1 128K: 329 items), prompts pre-built.

Data: JSONL records ``{id, prompt: [{role, content}], question, answer}``; the id prefix gives the domain
(financial_zh, financial_en, education_en, real_estate_en). Gold answers may be ``[]``, a list, a number, a
percentage or a ``YYYY-MM`` date.

Scoring: official, the J-EQ judge alone (parser P3) on the first "The answer is: " line (else the whole stripped
response). ql (INFERRED, §6.4): the same extraction after the SPELL strip, then max(CEM-strict, J-EQ); the
strict CEM's empty-gold guard keeps gold ``[]`` (normalised to "") from matching everything.
"""

import re

from qlx.eval import qa
from qlx.eval.records import Item, RecordError, find_files, load_records, require
from qlx.eval.scoring import check_protocol, judge_only
from qlx.eval.text import spell_answer_text, strip_reasoning

NAME = "corpusqa"
TASK = "qa"
SPLITS = ("domain",)
DOMAINS = ("financial_zh", "financial_en", "education_en", "real_estate_en")
GENERATION = {"official": {"temperature": 0.0, "top_p": 1.0}}
_CUE = re.compile(r"The answer is: (.*)")


def _item(record, path):
    require(record, {"id": str, "prompt": list, "question": str, "answer": str})
    if not record["prompt"] or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in record["prompt"]
    ):
        raise RecordError("key 'prompt' must be a non-empty list of {role, content} messages")
    domain = next((d for d in DOMAINS if record["id"].startswith(d)), "other")
    return Item(NAME, record["id"], record, {"domain": domain})


def load(root):
    return load_records(find_files(root, ("*.jsonl", "*/*.jsonl"), "CorpusQA"), NAME, _item)


def messages(record, protocol):
    """The record's own message list (the corpus is already embedded), in both protocols."""
    check_protocol(protocol)
    return [{"role": m["role"], "content": m["content"]} for m in record["prompt"]]


MEMORY_FORMAT = 'Finish with one line "The answer is: " followed by your answer.'


def memory_inputs(record, protocol):
    """(the prompt's text, which embeds the corpus; the question; a format line asking for the "The answer is: "
    cue the extractor reads) for the memory agent (INFERRED: the paper does not give its memory-agent prompt)."""
    check_protocol(protocol)
    return "\n\n".join(m["content"] for m in record["prompt"]), record["question"], MEMORY_FORMAT


def _cue_line(text):
    hit = _CUE.search(text)
    return hit.group(1).strip() if hit else text.strip()


def extract(response, protocol):
    """The first "The answer is: " (case-sensitive, colon and space) to the end of its line, trimmed ("" allowed);
    without it the whole text, trimmed. Read after the reasoning strip (official: QwenLong-L1 style; ql: SPELL)."""
    check_protocol(protocol)
    text = strip_reasoning(response, "qwenlong_l1") if protocol == "official" else spell_answer_text(response, TASK)
    return _cue_line(text)


def score(response, record, protocol="ql", judge=None, parser=None):
    extracted = extract(response, protocol)
    if protocol == "official":
        return judge_only(extracted, record["question"], record["answer"], judge, parser or "p3", NAME)
    return qa.ql_score(extracted, record["question"], record["answer"], judge, parser)
