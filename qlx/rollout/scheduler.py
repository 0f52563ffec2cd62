"""Admission policy of the continuous engine (``qlx.rollout.continuous``): which group runs next, and whether its
pages fit the token budget.

Order. A group (the G samples of one prompt) is admitted whole, never split. Groups swapped out by a preemption
come first, in the order they left (they hold generated tokens and their KV waits in host memory); then waiting
groups, longest expected first (Seer's context-aware scheduling: a group's samples have correlated lengths, and
starting the long ones first shortens the tail), by

    expected = prompt tokens + expected new tokens (the caller's estimate; by default the largest max_new_tokens)

ties in submission order.

Budget (in pages of ``page_size`` tokens). Every running sequence keeps a reserve: room for
``r = min(reserve_tokens, its remaining new tokens)`` tokens past what it has written. A new group of G samples
with a P-token prompt, sample g allowed n_g new tokens, is admitted when

    floor(P / page_size) + sum_g [pages(P + min(reserve, n_g)) - floor(P / page_size)] + outstanding <= free pages

where the first term is the prompt's full pages (shared), the bracket the pages sample g holds past them (its copy
of a partial last page included: G - 1 samples copy it, the last keeps the original) and ``outstanding`` the pages
the running sequences still need to hold their reserves. A swapped group needs its
saved pages plus the same reserves. The reserve bounds preemptions (a sequence outgrowing it may still force one);
``reserve_tokens = 0`` admits as soon as the prompt fits.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from qlx.rollout.kv_pages import pages_for


def group_pages(prompt_len: int, max_new: Sequence[int], *, page_size: int, reserve_tokens: int) -> int:
    """Pages a new group needs at admission: its prompt once, plus each sample's reserve past it (module
    docstring)."""
    shared = prompt_len // page_size
    return shared + sum(pages_for(prompt_len + min(reserve_tokens, n), page_size) - shared for n in max_new)


def outstanding_pages(written: int, held: int, remaining: int, *, page_size: int, reserve_tokens: int) -> int:
    """Pages a running sequence that has ``written`` tokens in ``held`` pages still needs for its reserve of
    min(reserve_tokens, remaining) more tokens (0 when it already holds them)."""
    return max(0, pages_for(written + min(reserve_tokens, remaining), page_size) - held)


@dataclasses.dataclass
class _Entry:
    item: object
    expected: int
    order: int


class GroupQueue:
    """Groups waiting for slots: swapped-out ones first (first out, first back), then new ones longest expected
    first. ``item`` is any object (the engine's group); ``expected`` its expected total tokens."""

    def __init__(self):
        self._swapped: list[object] = []
        self._waiting: list[_Entry] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._swapped) + len(self._waiting)

    def push(self, item, expected: int) -> None:
        self._waiting.append(_Entry(item, int(expected), next(self._counter)))
        self._waiting.sort(key=lambda e: (-e.expected, e.order))

    def push_swapped(self, item) -> None:
        self._swapped.append(item)

    def peek(self):
        """The next group to admit (None when empty): the oldest swapped group, else the longest waiting one."""
        if self._swapped:
            return self._swapped[0]
        return self._waiting[0].item if self._waiting else None

    def pop(self):
        return self._swapped.pop(0) if self._swapped else self._waiting.pop(0).item

    def remove(self, item) -> bool:
        """Drop ``item`` wherever it waits (a cancellation); False when it is not queued."""
        for i, swapped in enumerate(self._swapped):
            if swapped is item:
                del self._swapped[i]
                return True
        for i, entry in enumerate(self._waiting):
            if entry.item is item:
                del self._waiting[i]
                return True
        return False
