"""Host-side allocator of a paged KV cache: pages with reference counts, shared prompts, copy-on-write.

The device holds K/V in fixed pages of ``page_size`` token slots (``qlx.kernels.paged_attention``: per layer
``[KV, num_pages, page_size, D]``); a sequence's tokens live in the pages of its page table, token ``t`` at slot
``t % page_size`` of page ``pages[t // page_size]``. This module keeps that bookkeeping on the host (as
sglang-jax's ``ReqToTokenPool``): which pages each sequence holds, how many sequences hold each page, and which pages
are free. Page 0 is a dummy that is never handed out: page tables are padded with it, so a padded entry names a valid
page whose contents are never read (attention masks past a sequence's length).

Sharing: :meth:`PagePool.fork` gives a new sequence the pages of an existing one (a group's G samples share the
prompt's pages, prefilled once). Pages are written only at a sequence's end, so a shared page can only need writing
when it is the last, partially filled one: :meth:`PagePool.extend` then moves the writer to a fresh page and returns a
:class:`PageCopy` for the device to copy the page's slots first (copy-on-write). Full shared pages are never copied.

Invariants (:meth:`PagePool.check`): a page's reference count equals the number of page tables naming it; free pages
have count 0 and are not named; ``free + used == num_pages - 1``; every sequence holds exactly
``ceil(length / page_size)`` pages, so its reserved slots are at most its tokens + ``page_size - 1``. Operations that
cannot be satisfied raise :class:`OutOfPages` and change nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np

DUMMY_PAGE = 0
"""The page that pads page tables; never allocated."""


class OutOfPages(RuntimeError):
    """Not enough free pages for the request (nothing was changed)."""


@dataclasses.dataclass(frozen=True)
class PageCopy:
    """Copy page ``src`` to page ``dst`` on the device before writing ``dst`` (copy-on-write of a shared page)."""

    src: int
    dst: int


@dataclasses.dataclass
class _Sequence:
    pages: list[int]
    length: int


def pages_for(num_tokens: int, page_size: int) -> int:
    """ceil(num_tokens / page_size): the pages that hold ``num_tokens`` tokens."""
    return -(-num_tokens // page_size)


class PagePool:
    """Reference-counted KV pages for sequences named by any hashable id.

    Args:
      num_pages: pages on the device, the dummy page 0 included (so ``num_pages - 1`` can be handed out).
      page_size: token slots per page (16-64 suit the GPU kernel, >= 128 the TPU ones).
    """

    def __init__(self, num_pages: int, page_size: int):
        for name, value, least in (("num_pages", num_pages, 2), ("page_size", page_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"PagePool {name} must be an int >= {least}, got {value!r}")
        self.num_pages, self.page_size = num_pages, page_size
        self._refs = np.zeros(num_pages, np.int32)
        self._free = list(range(num_pages - 1, DUMMY_PAGE, -1))  # a stack: page 1 is handed out first
        self._seqs: dict[Hashable, _Sequence] = {}

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        """Pages held by at least one sequence."""
        return int(np.count_nonzero(self._refs))

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def sequences(self) -> list[Hashable]:
        return list(self._seqs)

    def length(self, seq_id: Hashable) -> int:
        """Tokens the sequence has room for (written or about to be)."""
        return self._get(seq_id).length

    def pages(self, seq_id: Hashable) -> tuple[int, ...]:
        """The sequence's page table (token t is in page ``pages[t // page_size]``)."""
        return tuple(self._get(seq_id).pages)

    def refcount(self, page: int) -> int:
        return int(self._refs[page])

    def _get(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id!r} is not in the page pool") from None

    def _take(self, n: int, why: str) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"{why} needs {n} free pages, {len(self._free)} of {self.num_pages - 1} are free")
        taken = [self._free.pop() for _ in range(n)]
        self._refs[taken] = 1
        return taken

    def admit(self, seq_id: Hashable, num_tokens: int) -> tuple[int, ...]:
        """A new sequence with room for ``num_tokens`` tokens (its prompt); returns its pages."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already in the page pool")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        pages = self._take(pages_for(num_tokens, self.page_size), f"admitting {seq_id!r} ({num_tokens} tokens)")
        self._seqs[seq_id] = _Sequence(pages, num_tokens)
        return tuple(pages)

    def fork(self, parent: Hashable, child: Hashable) -> tuple[int, ...]:
        """A new sequence ``child`` sharing every page (and the length) of ``parent``; uses no free page."""
        if child in self._seqs:
            raise ValueError(f"sequence {child!r} is already in the page pool")
        source = self._get(parent)
        self._refs[source.pages] += 1
        self._seqs[child] = _Sequence(list(source.pages), source.length)
        return tuple(source.pages)

    def extend(self, seq_id: Hashable, num_tokens: int) -> list[PageCopy]:
        """Room for ``num_tokens`` more tokens at the sequence's end: a shared, partially filled last page is
        replaced by a fresh one (the returned copy must run on the device before the write), then new pages are
        appended as needed. Raises :class:`OutOfPages` (changing nothing) when the free pages do not suffice."""
        cow, grow = self._extension(seq_id, num_tokens)
        seq = self._seqs[seq_id]
        fresh = self._take(int(cow) + grow, f"extending {seq_id!r} by {num_tokens} tokens")
        copies = []
        if cow:
            shared, seq.pages[-1] = seq.pages[-1], fresh.pop(0)
            self._refs[shared] -= 1
            copies.append(PageCopy(shared, seq.pages[-1]))
        seq.pages += fresh
        seq.length += num_tokens
        return copies

    def _extension(self, seq_id: Hashable, num_tokens: int) -> tuple[bool, int]:
        """(whether the last page must be copied first, how many pages are appended) for ``extend``."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        seq = self._get(seq_id)
        cow = num_tokens > 0 and seq.length % self.page_size != 0 and self._refs[seq.pages[-1]] > 1
        return bool(cow), pages_for(seq.length + num_tokens, self.page_size) - len(seq.pages)

    def extend_cost(self, seq_id: Hashable, num_tokens: int) -> int:
        """Free pages :meth:`extend` would take for ``num_tokens`` more tokens (a scheduler's check before a burst)."""
        cow, grow = self._extension(seq_id, num_tokens)
        return int(cow) + grow

    def release(self, seq_id: Hashable) -> None:
        """Drop a finished or aborted sequence; pages no other sequence holds become free."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"sequence {seq_id!r} is not in the page pool")
        self._refs[seq.pages] -= 1  # a sequence never names a page twice
        self._free += [page for page in reversed(seq.pages) if self._refs[page] == 0]

    def page_table(self, seq_ids: Sequence[Hashable], width: int) -> np.ndarray:
        """int32 [len(seq_ids), width]: each sequence's pages, padded with the dummy page 0."""
        table = np.full((len(seq_ids), width), DUMMY_PAGE, np.int32)
        for row, seq_id in enumerate(seq_ids):
            pages = self._get(seq_id).pages
            if len(pages) > width:
                raise ValueError(f"sequence {seq_id!r} holds {len(pages)} pages, more than the table width {width}")
            table[row, : len(pages)] = pages
        return table

    def shared_prefix_pages(self, seq_ids: Sequence[Hashable]) -> int:
        """How many leading pages all of ``seq_ids`` hold in common and none will write: the shared prompt pages a
        group's decode attention can read once (full pages only; a partial last page is copied before a write)."""
        tables = [self._get(s).pages for s in seq_ids]
        lengths = [self._get(s).length for s in seq_ids]
        common = 0
        for column in zip(*tables, strict=False):
            if len(set(column)) != 1:
                break
            common += 1
        return min(common, min(lengths) // self.page_size)

    def check(self) -> None:
        """Raise AssertionError when the invariants in the module docstring do not hold."""
        named = np.zeros(self.num_pages, np.int32)
        for seq_id, seq in self._seqs.items():
            if len(seq.pages) != pages_for(seq.length, self.page_size) or len(set(seq.pages)) != len(seq.pages):
                raise AssertionError(f"sequence {seq_id!r}: pages {seq.pages} for {seq.length} tokens")
            np.add.at(named, seq.pages, 1)
        if named[DUMMY_PAGE] or not np.array_equal(named, self._refs):
            bad = np.flatnonzero(named != self._refs).tolist()
            raise AssertionError(f"reference counts differ from the page tables at pages {bad[:8]}")
        free = set(self._free)
        if len(free) != len(self._free) or DUMMY_PAGE in free or any(self._refs[p] for p in free):
            raise AssertionError("the free list holds a duplicate, the dummy page or a page in use")
        if len(free) + self.used_pages != self.num_pages - 1:
            raise AssertionError(f"leak: {len(free)} free + {self.used_pages} used != {self.num_pages - 1} pages")
