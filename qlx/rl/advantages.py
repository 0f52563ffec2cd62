"""Sequence-level advantages from scalar rewards: GRPO / Dr.GRPO group baselines and the recipe's task-level scale.

Groups (the G rollouts of one prompt) and tasks (task types) are given as integer ids per sample, in any order and
with any values; membership is an [B, B] equality matrix, so everything is jit-able for a fixed batch size B.
"""

import jax.numpy as jnp


def _same(ids_b):
    ids_b = jnp.asarray(ids_b)
    if ids_b.ndim != 1:
        raise ValueError(f"ids must be a 1-D integer array [B], got shape {ids_b.shape}")
    if not jnp.issubdtype(ids_b.dtype, jnp.integer):
        raise ValueError(f"ids must be integers, got dtype {ids_b.dtype}")
    return (ids_b[:, None] == ids_b[None, :]).astype(jnp.float32)


def _check(rewards_b, *ids):
    rewards_b = jnp.asarray(rewards_b, jnp.float32)
    if rewards_b.ndim != 1:
        raise ValueError(f"rewards must be a 1-D array [B], got shape {rewards_b.shape}")
    for name, x in ids:
        if jnp.shape(x) != rewards_b.shape:
            raise ValueError(f"{name} shape {jnp.shape(x)} must equal rewards shape {rewards_b.shape}")
    return rewards_b


def _mean_std(rewards_b, same_bb):
    """Mean and unbiased (Bessel) std of each sample's set; a singleton set has std 0."""
    count_b = same_bb.sum(axis=1)
    mean_b = jnp.sum(same_bb * rewards_b[None, :], axis=1) / count_b  # sums, not matmuls: exact f32 on TPU too
    sq_dev_b = jnp.sum(same_bb * ((rewards_b - mean_b) ** 2)[None, :], axis=1)  # members of a set share its mean
    var_b = jnp.where(count_b > 1, sq_dev_b / jnp.maximum(count_b - 1, 1), 0.0)
    return mean_b, count_b, jnp.sqrt(var_b)


def group_advantages(rewards, group_ids, *, scale="std", eps=1e-6):
    """GRPO advantage A_i = (r_i − mean_{g(i)} r) / (std_{g(i)} r + eps), as verl's ``compute_grpo_outcome_advantage``.

    - ``scale="std"``: std is the unbiased std over the group (torch.std); a singleton group has mean 0 and std 1.
    - ``scale="none"``: Dr.GRPO / MemAgent, A_i = r_i − mean_{g(i)} r (singleton group: mean 0, so A_i = r_i).

    Args: rewards [B] float, group_ids [B] int (same id = same prompt). Returns [B] float32.
    """
    rewards_b = _check(rewards, ("group_ids", group_ids))
    mean_b, count_b, std_b = _mean_std(rewards_b, _same(group_ids))
    singleton = count_b < 2
    mean_b = jnp.where(singleton, 0.0, mean_b)
    if scale == "none":
        return rewards_b - mean_b
    if scale != "std":
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    return (rewards_b - mean_b) / (jnp.where(singleton, 1.0, std_b) + eps)


def task_advantages(rewards, group_ids, task_ids, eps=1e-6):
    """Task-specific advantage of QwenLong-L1.5 (Eq. 7):

        A_i = (r_i − mean_{k ∈ group(i)} r_k) / (std{ r_k : task_k = task_i, k in the batch } + eps)

    The std is the unbiased (Bessel) std over every sample of the batch with the same task id; a singleton group has
    mean 0 and a singleton task has std 0 (so its advantage is (r_i − mean) / eps, as in the reference code).

    Args: rewards [B] float, group_ids [B] int, task_ids [B] int. Returns [B] float32.
    """
    rewards_b = _check(rewards, ("group_ids", group_ids), ("task_ids", task_ids))
    g_mean_b, g_count_b, _ = _mean_std(rewards_b, _same(group_ids))
    _, _, t_std_b = _mean_std(rewards_b, _same(task_ids))
    return (rewards_b - jnp.where(g_count_b < 2, 0.0, g_mean_b)) / (t_std_b + eps)
