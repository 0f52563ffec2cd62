"""The host page allocator against a simulated device memory: every sequence reads back exactly its own tokens.

The simulation writes each new token into ``memory[page, slot]`` through the sequence's page table (after running the
pool's copy-on-write copies), so a page wrongly shared, reused while held, or not copied before a write shows up as a
sequence reading a token that is not its own; leaks show up in the free count once everything is released.
"""

import random

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from qlx.rollout.kv_pages import DUMMY_PAGE, OutOfPages, PagePool, pages_for


class Simulation:
    """A pool, a device memory [num_pages, page_size] of token ids, and each sequence's token history."""

    def __init__(self, num_pages: int, page_size: int):
        self.pool = PagePool(num_pages, page_size)
        self.memory = np.full((num_pages, page_size), -1, np.int64)
        self.history: dict[int, list[int]] = {}
        self.next_id = 0
        self.next_token = 0

    def _write(self, seq: int, tokens: list[int]) -> None:
        pages, size = self.pool.pages(seq), self.pool.page_size
        start = len(self.history[seq])
        for i, token in enumerate(tokens, start):
            self.memory[pages[i // size], i % size] = token
        self.history[seq] += tokens

    def _tokens(self, n: int) -> list[int]:
        self.next_token += n
        return list(range(self.next_token - n, self.next_token))

    def admit(self, n: int) -> int | None:
        seq, self.next_id = self.next_id, self.next_id + 1
        try:
            self.pool.admit(seq, n)
        except OutOfPages:
            return None
        self.history[seq] = []
        self._write(seq, self._tokens(n))
        return seq

    def fork(self, parent: int) -> int:
        child, self.next_id = self.next_id, self.next_id + 1
        free = self.pool.free_pages
        self.pool.fork(parent, child)
        assert self.pool.free_pages == free
        self.history[child] = list(self.history[parent])
        return child

    def extend(self, seq: int, n: int) -> bool:
        cost, free = self.pool.extend_cost(seq, n), self.pool.free_pages
        try:
            copies = self.pool.extend(seq, n)
        except OutOfPages:
            assert cost > free
            return False
        assert self.pool.free_pages == free - cost
        for copy in copies:
            self.memory[copy.dst] = self.memory[copy.src]
        self._write(seq, self._tokens(n))
        return True

    def release(self, seq: int) -> None:
        self.pool.release(seq)
        del self.history[seq]

    def verify(self) -> None:
        self.pool.check()
        size = self.pool.page_size
        for seq, tokens in self.history.items():
            pages = self.pool.pages(seq)
            assert self.pool.length(seq) == len(tokens)
            assert len(pages) * size <= len(tokens) + size - 1 or not tokens
            assert len(pages) == pages_for(len(tokens), size)
            read = [int(self.memory[pages[i // size], i % size]) for i in range(len(tokens))]
            assert read == tokens, f"sequence {seq} reads {read}, wrote {tokens}"


def test_group_shares_prompt_pages_and_copies_only_the_partial_last_page():
    pool = PagePool(num_pages=16, page_size=4)
    prompt = pool.admit("p", 10)  # pages for tokens 0-3, 4-7, 8-9 (partial)
    assert len(prompt) == 3 and DUMMY_PAGE not in prompt
    for g in range(3):
        assert pool.fork("p", g) == prompt
    assert [pool.refcount(p) for p in prompt] == [4, 4, 4]
    assert pool.shared_prefix_pages(["p", 0, 1, 2]) == 2  # the full pages
    copies = pool.extend(0, 1)  # writes slot 2 of the shared partial page: copy it first
    assert len(copies) == 1 and copies[0].src == prompt[2] and copies[0].dst not in prompt
    assert pool.pages(0)[:2] == prompt[:2] and pool.refcount(prompt[2]) == 3
    assert pool.extend(0, 4) == []  # its own page now: no copy; one new page
    assert len(pool.pages(0)) == 4
    pool.release("p")
    for g in (1, 2):
        assert len(pool.extend(g, 2)) == (1 if g == 1 else 0)  # the last holder of the partial page writes in place
    pool.check()
    for seq in pool.sequences():
        pool.release(seq)
    pool.check()
    assert pool.free_pages == 15 and pool.used_pages == 0


def test_out_of_pages_changes_nothing_and_tables_pad_with_the_dummy():
    pool = PagePool(num_pages=4, page_size=8)
    pool.admit("a", 17)
    with pytest.raises(OutOfPages, match="needs 1 free pages, 0 of 3"):
        pool.extend("a", 8)
    assert pool.length("a") == 17 and len(pool.pages("a")) == 3
    pool.fork("a", "b")
    with pytest.raises(OutOfPages):
        pool.extend("b", 1)  # the shared partial page needs a copy and none is free
    assert pool.pages("b") == pool.pages("a")
    pool.check()
    table = pool.page_table(["a", "b"], 5)
    assert table.dtype == np.int32 and table[:, 3:].tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="more than the table width 2"):
        pool.page_table(["a"], 2)
    with pytest.raises(KeyError, match="'c' is not in the page pool"):
        pool.release("c")
    with pytest.raises(ValueError, match="num_pages must be an int >= 2"):
        PagePool(1, 8)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_ten_thousand_random_operations_leak_nothing(page_size):
    """10^4 random admit / fork / extend / finish / abort operations, verified every 97 operations and at the end."""
    rng = random.Random(page_size)
    sim = Simulation(num_pages=96, page_size=page_size)
    for step in range(10_000):
        op = rng.random()
        live = list(sim.history)
        if op < 0.2 or not live:
            sim.admit(rng.randrange(0, 3 * page_size + 2))
        elif op < 0.35:
            sim.fork(rng.choice(live))
        elif op < 0.75:
            sim.extend(rng.choice(live), rng.choice([1, 1, 1, 2, page_size, 2 * page_size + 1]))
        else:
            sim.release(rng.choice(live))  # finish and abort both release the sequence's pages
        if step % 97 == 0:
            sim.verify()
    sim.verify()
    for seq in list(sim.history):
        sim.release(seq)
    sim.pool.check()
    assert sim.pool.free_pages == 95 and sim.pool.used_pages == 0


class PoolMachine(RuleBasedStateMachine):
    """Hypothesis drives the same operations; the invariant runs after every one."""

    def __init__(self):
        super().__init__()
        self.sim = Simulation(num_pages=24, page_size=3)

    @rule(n=st.integers(0, 10))
    def admit(self, n):
        self.sim.admit(n)

    @precondition(lambda self: self.sim.history)
    @rule(data=st.data())
    def fork(self, data):
        self.sim.fork(data.draw(st.sampled_from(sorted(self.sim.history))))

    @precondition(lambda self: self.sim.history)
    @rule(data=st.data(), n=st.integers(1, 7))
    def extend(self, data, n):
        self.sim.extend(data.draw(st.sampled_from(sorted(self.sim.history))), n)

    @precondition(lambda self: self.sim.history)
    @rule(data=st.data())
    def release(self, data):
        self.sim.release(data.draw(st.sampled_from(sorted(self.sim.history))))

    @invariant()
    def consistent(self):
        self.sim.verify()

    def teardown(self):
        for seq in list(self.sim.history):
            self.sim.release(seq)
        self.sim.pool.check()
        assert self.sim.pool.free_pages == 23


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)
