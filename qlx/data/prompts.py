"""The recipe's single-pass QA prompt (§1.5) and its answer extraction, shared by the data pipeline and the engines.

The user turn is ``prefix + context + suffix``: the context (documents, each followed by a blank line) sits between
``<text>\\n`` and ``</text>``, so tokenizing the three pieces separately gives the same ids as tokenizing the whole.
Multiple-choice questions list their options and ask for "The correct answer is (X)" (SPELL's variant).
"""

import re

from qlx.data.tokenizer import render_chat

INSTRUCTION = "Please read the following text and answer the question below."
QA_FORMAT = 'Format your response as follows: "Therefore, the answer is (insert answer here)".'
MC_FORMAT = 'Format your response as follows: "The correct answer is (insert answer here)".'
_CONTEXT_MARK = "\x00context\x00"


def question_parts(question: str, options: list[str] | None = None) -> tuple[str, str]:
    """(question with its options listed, the answer-format instruction): the recipe's q_core and q_inst."""
    body = question
    if options:
        body += "\n\n" + "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD", options, strict=True))
    return body, MC_FORMAT if options else QA_FORMAT


def prompt_pieces(question: str, options: list[str] | None = None) -> tuple[str, str]:
    """(prefix, suffix) of the user turn around the context."""
    body, form = question_parts(question, options)
    return f"{INSTRUCTION}\n\n<text>\n", f"</text>\n\n{body}\n\n{form}"


def user_prompt(question: str, context: str, options: list[str] | None = None) -> str:
    prefix, suffix = prompt_pieces(question, options)
    return prefix + context + suffix


def chat_pieces(question: str, options: list[str] | None = None, *, mode: str = "thinking") -> tuple[str, str]:
    """(text before the context, text after it) of the whole chat prompt, generation prompt included."""
    prefix, suffix = prompt_pieces(question, options)
    rendered = render_chat(
        [{"role": "user", "content": prefix + _CONTEXT_MARK + suffix}], add_generation_prompt=True, mode=mode
    )
    before, after = rendered.split(_CONTEXT_MARK)
    return before, after


def extract_final_answer(text: str) -> str | None:
    """The answer after the last "the answer is" (or "correct answer is") after any ``</think>``; else ``None``."""
    text = text.rsplit("</think>", 1)[-1]
    matches = list(re.finditer(r"(?:the correct answer is|the answer is)\s*:?\s*", text, flags=re.I))
    if not matches:
        return None
    answer = text[matches[-1].end() :].strip().split("\n")[0].strip()
    answer = answer.strip(" \"'*").rstrip(".").strip(" \"'*")
    if answer.startswith("(") and answer.endswith(")"):
        answer = answer[1:-1].strip()
    return answer or None
