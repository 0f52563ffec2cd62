"""qlx.rl: the recipe's objective as pure functions (arrays in, arrays out; jit-able where they touch arrays).

No model code and no I/O here, except the optional judge client in ``qlx.rl.rewards.judge``.
"""

from qlx.rl import rewards
from qlx.rl.advantages import group_advantages, task_advantages
from qlx.rl.aepo import (
    AEPOState,
    aepo_keep_mask,
    aepo_update,
    batch_entropy,
    negative_entropy_clip_mask,
    sequence_entropy,
)
from qlx.rl.logprobs import naive_logprobs_and_entropy, token_logprobs_and_entropy
from qlx.rl.losses import aggregate, canonical_agg, kl_penalty, loss_denominator, loss_numerator, policy_loss
from qlx.rl.sampler import TaskBalancedSampler, balance_by_difficulty, difficulty_bins, pass_at_k, task_counts

__all__ = [
    "AEPOState",
    "TaskBalancedSampler",
    "aepo_keep_mask",
    "aepo_update",
    "aggregate",
    "balance_by_difficulty",
    "batch_entropy",
    "canonical_agg",
    "difficulty_bins",
    "group_advantages",
    "kl_penalty",
    "loss_denominator",
    "loss_numerator",
    "naive_logprobs_and_entropy",
    "negative_entropy_clip_mask",
    "pass_at_k",
    "policy_loss",
    "rewards",
    "sequence_entropy",
    "task_advantages",
    "task_counts",
    "token_logprobs_and_entropy",
]
