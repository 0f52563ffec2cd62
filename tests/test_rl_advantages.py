"""group_advantages / task_advantages: hand-computed cases and a loop reference of the recipe's README algorithm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlx.rl import group_advantages, task_advantages


def _reference_task_advantages(rewards, groups, tasks, eps=1e-6):
    """The README loop: group mean over the uid (singleton → 0), unbiased std over the task (singleton → 0)."""
    out = []
    for r, g, t in zip(rewards, groups, tasks, strict=True):
        members = [x for x, gg in zip(rewards, groups, strict=True) if gg == g]
        mean = np.mean(members) if len(members) > 1 else 0.0
        task = [x for x, tt in zip(rewards, tasks, strict=True) if tt == t]
        std = np.std(task, ddof=1) if len(task) > 1 else 0.0
        out.append((r - mean) / (std + eps))
    return np.array(out)


def test_task_advantages_hand_computed():
    # task 7: rewards 1, 0, 1, 1 in groups 3 (1, 0) and 5 (1, 1); task 9: one sample (singleton group and task)
    r = jnp.array([1.0, 0.0, 1.0, 1.0, 0.5])
    groups = jnp.array([3, 3, 5, 5, 8])
    tasks = jnp.array([7, 7, 7, 7, 9])
    std7 = np.sqrt(((1 - 0.75) ** 2 * 3 + 0.75**2) / 3)  # unbiased std of [1, 0, 1, 1] = 0.5
    want = [0.5 / (std7 + 1e-6), -0.5 / (std7 + 1e-6), 0.0, 0.0, 0.5 / 1e-6]
    np.testing.assert_allclose(task_advantages(r, groups, tasks), want, rtol=1e-6)
    assert std7 == pytest.approx(0.5)


def test_group_advantages_hand_computed():
    r = jnp.array([1.0, 0.0, 0.0, 2.0, 4.0])
    groups = jnp.array([0, 0, 0, 1, 2])
    std0 = np.std([1.0, 0.0, 0.0], ddof=1)
    np.testing.assert_allclose(
        group_advantages(r, groups),
        [
            (1 - 1 / 3) / (std0 + 1e-6),
            (-1 / 3) / (std0 + 1e-6),
            (-1 / 3) / (std0 + 1e-6),
            2.0 / (1 + 1e-6),
            4.0 / (1 + 1e-6),
        ],
        rtol=1e-6,
    )
    np.testing.assert_allclose(group_advantages(r, groups, scale="none"), [2 / 3, -1 / 3, -1 / 3, 2.0, 4.0], rtol=1e-6)


_task_advantages_jit = jax.jit(task_advantages)


@settings(max_examples=40, deadline=None)
@given(
    rewards=st.lists(st.sampled_from([0.0, 0.25, 1.0, -0.5, 0.8]), min_size=12, max_size=12),
    groups=st.lists(st.integers(-5, 5), min_size=12, max_size=12),
    tasks=st.lists(st.integers(100, 103), min_size=12, max_size=12),
)
def test_property_matches_reference_for_any_ids(rewards, groups, tasks):
    got = _task_advantages_jit(jnp.array(rewards), jnp.array(groups), jnp.array(tasks))
    np.testing.assert_allclose(got, _reference_task_advantages(rewards, groups, tasks), rtol=1e-5, atol=1e-5)


def test_permutation_equivariant_and_jittable():
    k = jax.random.split(jax.random.key(0), 4)
    r = jax.random.uniform(k[0], (32,))
    groups = jax.random.randint(k[1], (32,), 0, 6)
    tasks = jax.random.randint(k[2], (32,), 0, 3)
    perm = jax.random.permutation(k[3], 32)
    full = jax.jit(task_advantages)(r, groups, tasks)
    np.testing.assert_allclose(task_advantages(r[perm], groups[perm], tasks[perm]), full[perm], rtol=1e-5, atol=1e-6)
    full_g = jax.jit(group_advantages, static_argnames="scale")(r, groups, scale="std")
    np.testing.assert_allclose(group_advantages(r[perm], groups[perm]), full_g[perm], rtol=1e-5, atol=1e-6)


def test_task_std_is_over_the_whole_task_not_the_group():
    # two groups of one task with different spreads: both divided by the same task std
    r = jnp.array([0.0, 1.0, 0.0, 0.2])
    adv = task_advantages(r, jnp.array([0, 0, 1, 1]), jnp.array([4, 4, 4, 4]))
    std = np.std([0.0, 1.0, 0.0, 0.2], ddof=1)
    np.testing.assert_allclose(adv, [-0.5 / std, 0.5 / std, -0.1 / std, 0.1 / std], rtol=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="group_ids"):
        task_advantages(jnp.ones(4), jnp.zeros(3, int), jnp.zeros(4, int))
    with pytest.raises(ValueError, match="integers"):
        group_advantages(jnp.ones(4), jnp.zeros(4))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(jnp.ones(4), jnp.zeros(4, int), scale="mean")
