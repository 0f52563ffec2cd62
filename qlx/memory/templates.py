"""Memory-agent prompt templates, as text and as token pieces tokenised once.

A :class:`MemoryTemplate` holds two prompts with named slots, written ``{question}``, ``{memory}``, ``{chunk}`` and
``{instructions}`` (any other brace, such as ``\\boxed{}``, is literal text: templates are never ``str.format``-ed):

- ``update``: one memory-update turn; needs ``{question}``, ``{memory}`` and ``{chunk}`` once each.
- ``final``: the final-answer turn; needs ``{question}`` and ``{memory}`` once each, ``{instructions}`` at most once
  (the format instructions q_inst of the recipe, §3.1: shown only in the final turn).
- ``no_memory``: the memory text of the first turn (and of any turn whose carried memory came out empty).

Shipped templates (:data:`TEMPLATES`): ``"qwenlong"`` (QwenLong-L1.5 App. D, paraphrased: data blocks first, then the
rules and the ``<memory>``/``<plan>`` output format; ends with "Updated memory:") and ``"memagent"`` (MemAgent's
instruction-first update prompt and its ``\\boxed{}`` final prompt, no plan).

:func:`tokenize_template` wraps each prompt in the tokenizer's chat template (one user turn plus the generation
prompt of ``chat_mode``; ``None`` = no chat wrapping), splits it at the slots and tokenises every literal piece on its
own, once. A turn's prompt is then ``piece_0 ‖ slot_0 ids ‖ piece_1 ‖ ... ‖ piece_n`` (:func:`assemble_ids`), with no
decoding or re-encoding; :func:`render_text` gives the text prompt the same values would give.
"""

from __future__ import annotations

import dataclasses
import re

from qlx.data.tokenizer import render_chat

SLOTS = ("question", "memory", "chunk", "instructions")
_SLOT_RE = re.compile(r"\{(" + "|".join(SLOTS) + r")\}")
_MARK = "\x00slot\x00"

QWENLONG_UPDATE = """<problem>
{question}
</problem>

<previous_memory>
{memory}
</previous_memory>

<section>
{chunk}
</section>

You can remember things: you read a long article one section at a time, in order, and you keep a memory of \
everything in it that helps to solve the problem above. Update the memory with the relevant new information in the \
section above, keeping every relevant detail of the previous memory, then write a brief plan of what to look for in \
the next sections.

[Important Notes]
1. You cannot see the whole article yet, so do not answer the problem now.
2. The memory must be self-contained: it alone must be enough to answer the problem.
3. The previous memory and plan may be wrong; revise them critically so that they serve the problem.
4. Reading goes one way only: copy the relevant content itself into the memory, not a reference to it.
5. Beware of distractors that mention similar entities.

Output format:
Updated memory:
<memory>...</memory>
<plan>...</plan>

Updated memory:"""

QWENLONG_FINAL = """You read a long article section by section and kept the memory below. Answer the problem based \
on that memory.

<problem>
{question}
</problem>

<memory>
{memory}
</memory>

{instructions}

Your answer:"""

MEMAGENT_UPDATE = """You are given a problem, a section of an article that may hold the answer, and a previous \
memory. Read the section carefully and update the memory with the new information that helps to answer the problem, \
keeping all relevant details of the previous memory.

<problem>
{question}
</problem>

<memory>
{memory}
</memory>

<section>
{chunk}
</section>

Updated memory:"""

MEMAGENT_FINAL = """You are given a problem and a previous memory. Answer the problem based on the previous memory \
and put the answer in \\boxed{}.

<problem>
{question}
</problem>

<memory>
{memory}
</memory>

Your answer:"""


@dataclasses.dataclass(frozen=True)
class MemoryTemplate:
    """The update and final prompts of a memory agent (module docstring) and the first turn's memory text.

    update: update-turn prompt with ``{question}``, ``{memory}``, ``{chunk}`` (once each).
    final: final-turn prompt with ``{question}``, ``{memory}`` (once each) and optionally ``{instructions}``.
    no_memory: the memory shown before the first chunk, and in place of an empty carried memory.
    """

    update: str
    final: str
    no_memory: str = "No previous memory"

    def __post_init__(self):
        _check_slots("update", self.update, required=("question", "memory", "chunk"), optional=())
        _check_slots("final", self.final, required=("question", "memory"), optional=("instructions",))
        if not isinstance(self.no_memory, str) or not self.no_memory:
            raise ValueError("template.no_memory must be a non-empty string (the first turn's memory text)")


def _check_slots(name: str, text: str, *, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    if not isinstance(text, str):
        raise ValueError(f"template.{name} must be a string (got {type(text).__name__})")
    found = _SLOT_RE.findall(text)
    for slot in required:
        if found.count(slot) != 1:
            raise ValueError(
                f"template.{name} must contain the slot {{{slot}}} exactly once (found {found.count(slot)}); "
                f"its slots are {required} (required) and {optional} (optional)"
            )
    for slot in set(found) - set(required) - set(optional):
        raise ValueError(f"template.{name} has the slot {{{slot}}}, which a {name} turn does not fill")
    for slot in optional:
        if found.count(slot) > 1:
            raise ValueError(f"template.{name} may contain the slot {{{slot}}} at most once")
    if _MARK in text:
        raise ValueError(f"template.{name} contains the reserved marker {_MARK!r}")


TEMPLATES = {
    "qwenlong": MemoryTemplate(update=QWENLONG_UPDATE, final=QWENLONG_FINAL),
    "memagent": MemoryTemplate(update=MEMAGENT_UPDATE, final=MEMAGENT_FINAL),
}


@dataclasses.dataclass(frozen=True)
class TurnTemplate:
    """One prompt split at its slots: ``texts[0] + value(slots[0]) + texts[1] + ... + texts[-1]`` (chat wrapping
    included), and ``pieces[k]`` = the token ids of ``texts[k]`` tokenised on its own."""

    slots: tuple[str, ...]
    texts: tuple[str, ...]
    pieces: tuple[tuple[int, ...], ...]

    @property
    def literal_tokens(self) -> int:
        """Tokens of the literal pieces (the prompt length with every slot empty)."""
        return sum(len(p) for p in self.pieces)


@dataclasses.dataclass(frozen=True)
class TokenTemplate:
    """A :class:`MemoryTemplate` tokenised once: the update and final turns, and the ids of ``no_memory``."""

    update: TurnTemplate
    final: TurnTemplate
    no_memory: tuple[int, ...]


def _split_turn(tokenizer, text: str, chat_mode: str | None) -> TurnTemplate:
    slots = tuple(_SLOT_RE.findall(text))
    marked = _SLOT_RE.sub(_MARK, text)
    if chat_mode is not None:
        marked = render_chat([{"role": "user", "content": marked}], add_generation_prompt=True, mode=chat_mode)
    texts = tuple(marked.split(_MARK))
    pieces = tuple(tuple(tokenizer.encode(t)) if t else () for t in texts)
    return TurnTemplate(slots=slots, texts=texts, pieces=pieces)


def tokenize_template(tokenizer, template: MemoryTemplate, chat_mode: str | None) -> TokenTemplate:
    """Tokenise the pieces of both prompts and the no-memory text once (module docstring)."""
    return TokenTemplate(
        update=_split_turn(tokenizer, template.update, chat_mode),
        final=_split_turn(tokenizer, template.final, chat_mode),
        no_memory=tuple(tokenizer.encode(template.no_memory)),
    )


def assemble_ids(turn: TurnTemplate, values: dict[str, list[int]]) -> list[int]:
    """The prompt ids ``piece_0 ‖ values[slot_0] ‖ piece_1 ‖ ... ‖ piece_n`` (the plain reference of the on-device
    assembly, ``qlx.memory.assemble.assemble_bs``)."""
    ids = list(turn.pieces[0])
    for slot, piece in zip(turn.slots, turn.pieces[1:], strict=True):
        ids += list(values[slot])
        ids += list(piece)
    return ids


def render_text(turn: TurnTemplate, values: dict[str, str]) -> str:
    """The text prompt: the chat-wrapped template with each slot replaced by its text."""
    text = turn.texts[0]
    for slot, piece in zip(turn.slots, turn.texts[1:], strict=True):
        text += values[slot] + piece
    return text
