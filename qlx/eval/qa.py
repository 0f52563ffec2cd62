"""What the QA benchmarks (Frames, LongBench v1 QA, CorpusQA) share under the QL protocol: SPELL's reading prompt
(``doc_general_qa``), SPELL's QA answer extractor, and the score max(CEM-strict, J-EQ judge)."""

from qlx.eval.scoring import check_protocol, rule_or_judge
from qlx.eval.text import cem, spell_answer_text, strip_reasoning, substitute

FORMAT = 'Format your response as follows: "The correct answer is (insert answer here)."'
QL_TEMPLATE = f"""Please read the following text and answer the question below.

<text>
{{context}}
</text>

Question: {{question}}

{FORMAT}"""
CUES = ("the answer is", "correct answer is", "answer is")
_DEEPSEEK_TOKENS = ("<｜Assistant｜>", "<｜end▁of▁sentence｜>")


def ql_messages(context, question):
    """One user message: the reading instruction, the ``<text>`` block, ``Question: ...`` and the cue line."""
    return [{"role": "user", "content": substitute(QL_TEMPLATE, {"{context}": context, "{question}": question})}]


def memory_inputs(context, question):
    """(document, question, instructions) for the memory agent: the reading prompt without its ``<text>`` block."""
    return context, f"Question: {question}", FORMAT


def spell_extract(response):
    """SPELL's QA extractor (§5.3): the SPELL strip (N = 1000); delete ``*`` and DeepSeek's special tokens; the
    first of the cues "the answer is", "correct answer is", "answer is" (case-sensitive) that occurs, and the text
    after its last occurrence; trimmed, dots stripped; None if it echoes "insert answer here"; then its first line,
    trimmed and dots stripped. None when no cue occurs."""
    text = spell_answer_text(response, "qa").replace("*", "")
    for token in _DEEPSEEK_TOKENS:
        text = text.replace(token, "")
    cue = next((c for c in CUES if c in text), None)
    if cue is None:
        return None
    answer = text.rsplit(cue, 1)[1].strip().strip(".")
    if "insert answer here" in answer:
        return None
    return answer.split("\n", 1)[0].strip().strip(".")


def extract(response, protocol):
    """official: the whole output after the reasoning strip (an autorater or F1 reads it); ql: SPELL's QA
    extractor (``spell_extract``)."""
    check_protocol(protocol)
    return strip_reasoning(response, "qwenlong_l1") if protocol == "official" else spell_extract(response)


def ql_score(extracted, problem, gold, judge, parser):
    """max(CEM-strict, judge), the judge asked when CEM < 1 (a None extraction reaches it as "None")."""
    return rule_or_judge(cem(extracted, gold, strict=True), extracted, problem, gold, judge, parser or "p3")
