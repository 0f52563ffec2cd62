"""What an update turn carries forward: the memory rule, in token space, as a plain reference and on device.

Rules (``MemoryAgentConfig.carry``), on the response ids r[0:n) of one turn (n excludes a final stop token):

    s0 = end of the last ``</think>`` in r, or 0 when there is none (a response cut off while thinking keeps it all)
    "response":     carry r[0:n)                                  (MemAgent's training loop: the whole response)
    "after_think":  carry r[s0:n)                                 (MemAgent's evaluation harness)
    "blocks":       m = start of the first ``<memory>`` at or after s0
                    e = end of the first ``</plan>`` at or after m
                    carry r[m:e)      when both tags are found    (the recipe: the <memory> and <plan> blocks)
                    carry r[m:n)      when ``</plan>`` never comes (an unclosed block: its raw tail)
                    carry r[s0:n)     when ``<memory>`` never comes (the text after the thinking)

then keep the first ``max_memory_tokens`` ids; an empty result is replaced by the template's ``no_memory`` ids.

Tags are matched as token sequences (:class:`TagPatterns`): the ids the tokenizer gives the tag alone, preceded by
nothing or a space and followed by nothing, one or two newlines (Qwen's pre-tokenizer glues a space to a leading
``<`` and newlines to a trailing ``>``). A tag the model spells with other tokens (e.g. glued to preceding
punctuation, ``.<memory>``) is not seen, and the rule falls back as above; BUILD_NOTES.md ("Memory agent") says
how this compares with matching the decoded text.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

CARRY_RULES = ("blocks", "after_think", "response")
_PREFIXES, _SUFFIXES = ("", " "), ("", "\n", "\n\n")


@dataclasses.dataclass(frozen=True)
class TagPatterns:
    """Token sequences of the three tags: for each, the alternative spellings (tuples of ids)."""

    think_end: tuple[tuple[int, ...], ...]
    memory_open: tuple[tuple[int, ...], ...]
    plan_close: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, tokenizer, *, think_end: str = "</think>", memory_open: str = "<memory>", plan_close="</plan>"):
        def spellings(tag: str) -> tuple[tuple[int, ...], ...]:
            out = {tuple(tokenizer.encode(p + tag + s)) for p in _PREFIXES for s in _SUFFIXES}
            return tuple(sorted(out, key=lambda ids: (len(ids), ids)))

        return cls(spellings(think_end), spellings(memory_open), spellings(plan_close))


def _matches(ids: list[int], patterns: tuple[tuple[int, ...], ...]) -> list[tuple[int, int]]:
    """(start, end) of every occurrence of any spelling (longest spelling per start)."""
    found = {}
    for pattern in patterns:
        for j in range(len(ids) - len(pattern) + 1):
            if tuple(ids[j : j + len(pattern)]) == pattern:
                found[j] = max(found.get(j, 0), j + len(pattern))
    return sorted(found.items())


def carried_span(ids: list[int], tags: TagPatterns, rule: str) -> tuple[int, int]:
    """[start, end) of ``ids`` (one response, stop token removed) that the rule carries (module docstring)."""
    n = len(ids)
    if rule == "response":
        return 0, n
    think = _matches(ids, tags.think_end)
    s0 = max((e for _, e in think), default=0)
    if rule == "after_think":
        return s0, n
    opens = [s for s, _ in _matches(ids, tags.memory_open) if s >= s0]
    if not opens:
        return s0, n
    m = opens[0]
    closes = [e for s, e in _matches(ids, tags.plan_close) if s >= m]
    return m, (closes[0] if closes else n)


def carried_memory(ids: list[int], tags: TagPatterns, rule: str, max_tokens: int, no_memory: tuple[int, ...]):
    """The memory ids carried after a response (plain reference of :func:`carried_memory_bm`)."""
    start, end = carried_span(list(ids), tags, rule)
    memory = list(ids[start:end])[:max_tokens]
    return memory if memory else list(no_memory)


def _pattern_array(patterns: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in patterns)
    array = np.full((len(patterns), width), -1, np.int32)
    for a, p in enumerate(patterns):
        array[a, : len(p)] = p
    return array, np.array([len(p) for p in patterns], np.int32)


def _match_ends_br(tokens_br: jax.Array, n_b: jax.Array, patterns) -> jax.Array:
    """int32 [B, R]: end of the longest spelling that starts at position j and lies within [0, n), else -1."""
    array, lengths = _pattern_array(patterns)
    b, r = tokens_br.shape
    padded = jnp.pad(tokens_br, ((0, 0), (0, array.shape[1])), constant_values=-1)
    positions = jnp.arange(r, dtype=jnp.int32)[None, :]
    ends_br = jnp.full((b, r), -1, jnp.int32)
    for pattern, length in zip(array, lengths, strict=True):
        hit_br = positions + length <= n_b[:, None]
        for k in range(int(length)):
            hit_br &= padded[:, k : k + r] == int(pattern[k])
        ends_br = jnp.where(hit_br, jnp.maximum(ends_br, positions + length), ends_br)
    return ends_br


def carried_span_b(tokens_br: jax.Array, n_b: jax.Array, tags: TagPatterns, rule: str):
    """Per row, [start_b, end_b) of ``tokens_br[b, :n_b[b]]`` that the rule carries (as :func:`carried_span`)."""
    r = tokens_br.shape[1]
    zero_b = jnp.zeros_like(n_b)
    if rule == "response":
        return zero_b, n_b
    positions = jnp.arange(r, dtype=jnp.int32)[None, :]
    s0_b = jnp.maximum(jnp.max(_match_ends_br(tokens_br, n_b, tags.think_end), axis=1), 0)
    if rule == "after_think":
        return s0_b, n_b
    opens_br = (_match_ends_br(tokens_br, n_b, tags.memory_open) >= 0) & (positions >= s0_b[:, None])
    found_b = jnp.any(opens_br, axis=1)
    m_b = jnp.min(jnp.where(opens_br, positions, r), axis=1)
    close_ends_br = _match_ends_br(tokens_br, n_b, tags.plan_close)
    closes_br = (close_ends_br >= 0) & (positions >= m_b[:, None])
    first_close_b = jnp.min(jnp.where(closes_br, positions, r), axis=1)
    e_b = jnp.where(
        jnp.any(closes_br, axis=1),
        jnp.take_along_axis(close_ends_br, jnp.minimum(first_close_b, r - 1)[:, None], axis=1)[:, 0],
        n_b,
    )
    return jnp.where(found_b, m_b, s0_b), jnp.where(found_b, e_b, n_b)


def carried_memory_bm(
    tokens_br: jax.Array,
    n_b: jax.Array,
    tags: TagPatterns,
    rule: str,
    max_tokens: int,
    width: int,
    no_memory: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """:func:`carried_memory` for every row: ids int32 [B, width] (0 past the length) and lengths [B].

    ``tokens_br`` [B, R] are the responses, ``n_b`` their lengths without a final stop token; at most
    ``max_tokens`` (<= width) ids are kept; ``width`` >= len(no_memory).
    """
    start_b, end_b = carried_span_b(tokens_br, n_b, tags, rule)
    length_b = jnp.clip(end_b - start_b, 0, max_tokens)
    index_bm = start_b[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
    ids_bm = jnp.take_along_axis(tokens_br, jnp.clip(index_bm, 0, tokens_br.shape[1] - 1), axis=1)
    keep_bm = jnp.arange(width)[None, :] < length_b[:, None]
    ids_bm = jnp.where(keep_bm, ids_bm, 0)
    fallback_m = np.zeros(width, np.int32)
    fallback_m[: len(no_memory)] = no_memory
    empty_b = length_b == 0
    ids_bm = jnp.where(empty_b[:, None], jnp.asarray(fallback_m)[None, :], ids_bm)
    return ids_bm.astype(jnp.int32), jnp.where(empty_b, len(no_memory), length_b).astype(jnp.int32)
