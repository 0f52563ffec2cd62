"""TaskBalancedSampler: counts, coverage, determinism, JSON state round trip; pass@k difficulty balancing."""

import collections
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlx.rl import TaskBalancedSampler, balance_by_difficulty, difficulty_bins, pass_at_k, task_counts

TASKS = ["mc", "multihop", "reading", "dialogue", "numerical"]


def _dataset(sizes, seed=0):
    labels = [t for t, n in zip(TASKS, sizes, strict=True) for _ in range(n)]
    return [labels[i] for i in np.random.default_rng(seed).permutation(len(labels))]


def test_recipe_counts_128_over_5():
    assert task_counts(128, 5) == [26, 26, 26, 25, 25]
    assert task_counts(7, 3) == [3, 2, 2]


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    batch=st.integers(1, 30),
    seed=st.integers(0, 1000),
)
def test_property_every_batch_has_the_counts_and_each_task_cycles_its_examples(sizes, batch, seed):
    tasks = TASKS[: len(sizes)]
    labels = [tasks[k] for k in np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))]
    sampler = TaskBalancedSampler(labels, batch, seed=seed, tasks=tasks)
    drawn = collections.Counter()
    for _ in range(6):
        b = next(sampler)
        assert len(b) == batch
        per_task = collections.Counter(labels[i] for i in b)
        assert [per_task[t] for t in tasks] == task_counts(batch, len(sizes))
        drawn.update(b)
    for t in tasks:  # epochs of a task's queue: every example drawn ⌊D/n⌋ or ⌈D/n⌉ times
        counts = [drawn[i] for i, label in enumerate(labels) if label == t]
        assert max(counts) - min(counts) <= 1


def test_same_seed_same_batches_and_different_seed_differs():
    labels = _dataset([30, 30, 30, 30, 30])
    a, b, c = (TaskBalancedSampler(labels, 20, seed=s) for s in (1, 1, 2))
    first = [next(a) for _ in range(10)]
    assert first == [next(b) for _ in range(10)]
    assert first != [next(c) for _ in range(10)]


def test_resume_from_json_state_draws_the_same_next_batches():
    labels = _dataset([7, 9, 13, 5, 11])
    run = TaskBalancedSampler(labels, 10, seed=3, tasks=TASKS)
    for _ in range(5):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))
    expected = [next(run) for _ in range(8)]
    resumed = TaskBalancedSampler(labels, 10, seed=3, tasks=TASKS)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(8)] == expected
    assert len(resumed) == 45 // 10


def test_errors_name_the_problem():
    labels = _dataset([3, 3, 3, 3, 3])
    with pytest.raises(ValueError, match="not in tasks"):
        TaskBalancedSampler(labels, 5, tasks=TASKS[:4])
    with pytest.raises(ValueError, match="without any example"):
        TaskBalancedSampler(labels, 5, tasks=[*TASKS, "niah"])
    other = TaskBalancedSampler(labels, 5, seed=9).state_dict()
    with pytest.raises(ValueError, match="'seed'"):
        TaskBalancedSampler(labels, 5, seed=1).load_state_dict(other)
    with pytest.raises(KeyError, match="step"):
        TaskBalancedSampler(labels, 5).load_state_dict({k: v for k, v in other.items() if k != "step"})


def test_pass_at_k_hand_computed():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(3, 4, 1)


def test_difficulty_balancing_draws_equal_counts_per_bin():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 0.2, 50), rng.uniform(0.4, 0.6, 7), rng.uniform(0.8, 1.0, 20), [1.0]])
    assert difficulty_bins([0.2, 1.0, 0.0, 0.39], 5).tolist() == [1, 4, 0, 1]  # p = 1 joins the last bin
    idx, counts = balance_by_difficulty(p, num_bins=5, seed=1)
    assert counts == [7, 0, 7, 0, 7] and len(set(idx.tolist())) == 21
    assert collections.Counter(difficulty_bins(p[idx], 5).tolist()) == {0: 7, 2: 7, 4: 7}
    assert balance_by_difficulty(p, num_bins=5, seed=1)[0].tolist() == idx.tolist()
    with pytest.raises(ValueError, match="per_bin"):
        balance_by_difficulty(p, num_bins=5, per_bin=8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        difficulty_bins([0.5, 1.5], 5)
