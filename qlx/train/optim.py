"""The optimizer of a run: optax AdamW behind global-norm clipping, with an optional linear warm-up."""

from __future__ import annotations

import optax

from qlx.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Constant ``learning_rate``, reached linearly over ``warmup_steps`` when that is positive."""
    if config.warmup_steps == 0:
        return optax.constant_schedule(config.learning_rate)
    return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) (when grad_clip > 0) followed by AdamW(b1, b2, eps, weight_decay)."""
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
