"""The optimizer of a run: optax AdamW behind global-norm clipping, with an optional linear warm-up and cosine decay."""

from __future__ import annotations

import optax

from qlx.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """``learning_rate``, reached linearly over ``warmup_steps`` when that is positive; with ``decay_steps`` > 0 it
    then follows a cosine from ``learning_rate`` down to ``learning_rate × final_lr_fraction`` over ``decay_steps``:

        lr(w + s) = lr_end + (lr − lr_end) · (1 + cos(π · min(s, decay_steps) / decay_steps)) / 2,   w = warmup_steps
    """
    if config.decay_steps > 0:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=config.learning_rate,
            warmup_steps=config.warmup_steps,
            decay_steps=config.warmup_steps + config.decay_steps,
            end_value=config.learning_rate * config.final_lr_fraction,
        )
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
