"""PPO / GRPO clipped policy loss with verl's aggregation modes, exact across micro-batches.

Shapes: logp, old_logp, ref_logp, mask [B, T]; advantages [B] (broadcast over tokens) or [B, T].

    ρ        = exp(clip(logp − old_logp, −20, 20))
    L_pg     = max(−A ρ, −A clip(ρ, 1 − clip_low, 1 + clip_high))
    dual clip (c = dual_clip > 1, negative A only): L_pg = min(L_pg, −c A)
    L        = L_pg + kl_coef · KL(logp, ref_logp)            (per token, then aggregated)

Aggregation (verl names; tunix's names are aliases), with m the mask and n_i = Σ_t m_{i,t}:

    token-mean               Σ_{i,t} m L / Σ_{i,t} m
    seq-mean-token-mean      Σ_{i: n_i>0} (Σ_t m L / n_i) / #{i: n_i > 0}
    seq-mean-token-sum       Σ_{i,t} m L / #{i: n_i > 0}
    seq-mean-token-sum-norm  Σ_{i,t} m L / T                   (T = mask.shape[-1], Dr.GRPO's constant)

Every mode is numerator / denominator where the numerator is a sum over samples. For a step split into
micro-batches, compute ``D = loss_denominator(step_mask, agg)`` once from the whole step's mask (it does not depend
on parameters) and pass ``denominator=D`` to each micro-batch: the micro-batch losses (and their gradients) then sum
exactly to the whole step's loss — never a mean of means.
"""

import jax.numpy as jnp

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
AGG_ALIASES = {  # tunix.rl.common.aggregate_loss names
    "sequence-mean-token-mean": "seq-mean-token-mean",
    "sequence-mean-token-sum-norm": "seq-mean-token-sum-norm",
}
KL_ALIASES = {
    "kl": "kl",
    "k1": "kl",
    "abs": "abs",
    "mse": "mse",
    "k2": "mse",
    "mse_kl": "mse",
    "low_var_kl": "low_var_kl",
    "k3": "low_var_kl",
}


def canonical_agg(agg):
    """verl's name of an aggregation mode (tunix's accepted); raises naming the valid modes."""
    name = AGG_ALIASES.get(agg, agg)
    if name not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES} (or tunix's {tuple(AGG_ALIASES)}), got {agg!r}")
    return name


def _mask2(mask):
    m = jnp.asarray(mask, jnp.float32)
    if m.ndim != 2:
        raise ValueError(f"mask must be [B, T], got shape {m.shape}")
    return m


def loss_denominator(mask, agg="token-mean"):
    """The denominator of ``agg`` for this mask: token count, non-empty sequence count, or T. Float32 scalar."""
    agg, m = canonical_agg(agg), _mask2(mask)
    if agg == "token-mean":
        return m.sum()
    if agg == "seq-mean-token-sum-norm":
        return jnp.float32(m.shape[1])
    return jnp.sum(m.sum(axis=1) > 0).astype(jnp.float32)


def loss_numerator(loss_bt, mask, agg="token-mean"):
    """Σ over samples of the per-sample loss of ``agg`` (see module docstring). loss_bt, mask [B, T] → scalar."""
    agg, m = canonical_agg(agg), _mask2(mask)
    masked = jnp.asarray(loss_bt, jnp.float32) * m
    if agg == "seq-mean-token-mean":
        n_b = m.sum(axis=1)
        return jnp.sum(jnp.where(n_b > 0, masked.sum(axis=1) / jnp.maximum(n_b, 1.0), 0.0))
    return masked.sum()


def aggregate(loss_bt, mask, agg="token-mean", denominator=None):
    """loss_numerator / denominator (default: this batch's ``loss_denominator``, floored at 1)."""
    if denominator is None:
        denominator = loss_denominator(mask, agg)
    return loss_numerator(loss_bt, mask, agg) / jnp.maximum(denominator, 1.0)


def kl_penalty(logp, ref_logp, kind="low_var_kl"):
    """Per-token KL estimate of π_θ from π_ref, as verl's ``kl_penalty``; d = logp − ref_logp:

    kl (k1): d      abs: |d|      mse (k2, tunix mse_kl): d² / 2
    low_var_kl (k3): clip(exp(−d') + d' − 1, −10, 10) with d' = clip(d, −20, 20)
    """
    name = KL_ALIASES.get(kind)
    if name is None:
        raise ValueError(f"kl must be one of {tuple(KL_ALIASES)}, got {kind!r}")
    d = jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)
    if name == "kl":
        return d
    if name == "abs":
        return jnp.abs(d)
    if name == "mse":
        return 0.5 * d**2
    neg = jnp.clip(-d, -20.0, 20.0)
    return jnp.clip(jnp.exp(neg) - neg - 1.0, -10.0, 10.0)


def _masked_mean(x, m):
    return jnp.sum(x * m) / jnp.maximum(m.sum(), 1.0)


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    agg="token-mean",
    ref_logp=None,
    kl_coef=0.0,
    kl="low_var_kl",
    denominator=None,
):
    """Clipped surrogate (+ optional KL) aggregated by ``agg``; see the module docstring for the formulas.

    Args:
      logp: [B, T] log π_θ of the sampled tokens (differentiable). old_logp: [B, T] under the sampling policy
        (for strictly on-policy training pass ``jax.lax.stop_gradient(logp)``: ρ = 1, gradient A ∇log π).
      advantages: [B] or [B, T]. mask: [B, T] bool/0-1 (response tokens; AEPO's keep mask already applied).
      dual_clip: c > 1 for dual-clip PPO (verl's clip_ratio_c), or None.
      ref_logp, kl_coef, kl: KL-to-reference term added per token (kl one of kl/k1, abs, mse/k2/mse_kl,
        low_var_kl/k3); skipped when ref_logp is None.
      denominator: the step's ``loss_denominator`` for exact micro-batching (default: this batch's).

    Returns:
      (loss, metrics): metrics hold pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl (token means over the mask),
      kl_loss (when ref_logp is given), token_count, loss_numerator, loss_denominator.
    """
    agg = canonical_agg(agg)
    m = _mask2(mask)
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jnp.asarray(old_logp, jnp.float32)
    if logp.shape != m.shape or old_logp.shape != m.shape:
        raise ValueError(f"logp {logp.shape} and old_logp {old_logp.shape} must match mask {m.shape}")
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.shape == m.shape[:1]:
        adv = adv[:, None]
    elif adv.shape != m.shape:
        raise ValueError(f"advantages must be [B] or [B, T] = {m.shape}, got {adv.shape}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if denominator is None:
        denominator = loss_denominator(m, agg)

    log_ratio = jnp.clip(logp - old_logp, -20.0, 20.0)
    ratio = jnp.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = jnp.maximum(pg1, pg2)
    metrics = {"pg_clipfrac": _masked_mean((pg2 > pg1).astype(jnp.float32), m), "ppo_kl": _masked_mean(-log_ratio, m)}
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        metrics["pg_clipfrac_lower"] = _masked_mean(((pg > pg3) & (adv < 0)).astype(jnp.float32), m)
        pg = jnp.where(adv < 0, jnp.minimum(pg, pg3), pg)
    else:
        metrics["pg_clipfrac_lower"] = jnp.float32(0.0)
    metrics["pg_loss"] = aggregate(pg, m, agg, denominator)
    per_token = pg
    if ref_logp is not None:
        kl_bt = kl_penalty(logp, ref_logp, kl)
        metrics["kl_loss"] = aggregate(kl_bt, m, agg, denominator)
        per_token = pg + kl_coef * kl_bt
    numerator = loss_numerator(per_token, m, agg)
    loss = numerator / jnp.maximum(denominator, 1.0)
    metrics.update(
        token_count=m.sum(), loss_numerator=numerator, loss_denominator=jnp.asarray(denominator, jnp.float32)
    )
    return loss, metrics
