"""The memory agent's settings: one validated frozen dataclass; every error names its key."""

from __future__ import annotations

import dataclasses
import math

from qlx.config import ConfigError
from qlx.data.tokenizer import CHAT_MODES
from qlx.memory.carry import CARRY_RULES
from qlx.memory.templates import TEMPLATES, MemoryTemplate


def _positive_int(value, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"must be a positive integer (got {value!r})")


@dataclasses.dataclass(frozen=True)
class MemoryAgentConfig:
    """How the memory agent reads a document (recipe §3.1; defaults are the recipe's Memory-RL sizes).

    chunk_tokens: document tokens per update turn (recipe: 32,768; MemAgent: 5,000). Chunk t is the token slice
        [t·C, (t+1)·C) of the (truncated) document; a document of L tokens takes K = ceil(L / C) update turns.
    memory_tokens: generation cap of one update turn (recipe: 15,360; MemAgent: 1,024).
    max_memory_tokens: cap on the memory carried to the next turn (the first ids of what ``carry`` keeps); None =
        ``memory_tokens``. Kept separate from the generation cap (the recipe's "memory 15K" may be either).
    final_tokens: generation cap of the final-answer turn.
    max_chunks: None reads every chunk; else a document longer than ``max_chunks · chunk_tokens`` tokens is
        centre-truncated to that many (its first ``⌊kept / 2⌋`` and last ``⌈kept / 2⌉`` tokens, as MemAgent).
    max_question_tokens: room for the question (q_core) in every prompt; a longer question is an error.
    max_instruction_tokens: room for the format instructions (q_inst) in the final prompt; a longer one is an error.
    template: "qwenlong" or "memagent" (``qlx.memory.templates.TEMPLATES``), or a ``MemoryTemplate``.
    chat_mode: the chat template each prompt is wrapped in (``qlx.data.tokenizer.render_chat``: "thinking",
        "instruct", "no_think"); None = the bare template text.
    carry: what an update turn carries forward (``qlx.memory.carry``): "blocks" (the ``<memory>``/``<plan>``
        blocks after the last ``</think>``, with the fallbacks documented there), "after_think", or "response".
    temperature, top_p, top_k: sampling of every turn (``qlx.rollout.SamplingSpec``; recipe: 0.7 / 0.95 / off).
        temperature 0 is greedy.
    stop_token_ids: tokens that end a turn; None = the tokenizer's ``<|im_end|>`` and ``<|endoftext|>``.
    window_chunks: chunks per compiled scan call. The document streams from the host one window of
        ``window_chunks`` chunks at a time, so device memory holds [window_chunks, B, chunk_tokens] ids whatever
        the document's length; the same executable runs every window.
    prefill_chunk: prompt positions per prefill step of a turn (as ``qlx.rollout.generate``'s ``prefill_chunk``).
    """

    chunk_tokens: int = 32768
    memory_tokens: int = 15360
    max_memory_tokens: int | None = None
    final_tokens: int = 15360
    max_chunks: int | None = None
    max_question_tokens: int = 1024
    max_instruction_tokens: int = 256
    template: str | MemoryTemplate = "qwenlong"
    chat_mode: str | None = "thinking"
    carry: str = "blocks"
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    stop_token_ids: tuple[int, ...] | None = None
    window_chunks: int = 8
    prefill_chunk: int = 512

    def __post_init__(self):
        for key in (
            "chunk_tokens",
            "memory_tokens",
            "final_tokens",
            "max_question_tokens",
            "max_instruction_tokens",
            "window_chunks",
            "prefill_chunk",
        ):
            _positive_int(getattr(self, key), key)
        if self.max_memory_tokens is None:
            object.__setattr__(self, "max_memory_tokens", self.memory_tokens)
        _positive_int(self.max_memory_tokens, "max_memory_tokens")
        if self.max_chunks is not None:
            _positive_int(self.max_chunks, "max_chunks")
        if isinstance(self.template, str):
            if self.template not in TEMPLATES:
                raise ConfigError("template", f"{self.template!r} is not one of {sorted(TEMPLATES)}")
        elif not isinstance(self.template, MemoryTemplate):
            raise ConfigError("template", f"must be a template name or a MemoryTemplate (got {self.template!r})")
        if self.chat_mode is not None and self.chat_mode not in CHAT_MODES:
            raise ConfigError("chat_mode", f"{self.chat_mode!r} is not one of {CHAT_MODES} or None")
        if self.carry not in CARRY_RULES:
            raise ConfigError("carry", f"{self.carry!r} is not one of {CARRY_RULES}")
        if not (
            isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ConfigError("temperature", f"must be a finite number >= 0 (got {self.temperature!r})")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ConfigError("top_p", f"must be in (0, 1] (got {self.top_p!r})")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError("top_k", f"must be an integer >= 0, 0 meaning off (got {self.top_k!r})")
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            if not ids or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
                raise ConfigError("stop_token_ids", f"must be None or a non-empty list of token ids (got {ids!r})")
            object.__setattr__(self, "stop_token_ids", ids)

    @property
    def memory_template(self) -> MemoryTemplate:
        """The template itself (a name resolved through ``TEMPLATES``)."""
        return TEMPLATES[self.template] if isinstance(self.template, str) else self.template
