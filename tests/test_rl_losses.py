"""policy_loss: hand-computed surrogate, numpy references for every aggregation mode, exact micro-batching, KL."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlx.rl import aggregate, canonical_agg, kl_penalty, loss_denominator, policy_loss
from qlx.rl.losses import AGG_MODES

_policy_loss = jax.jit(policy_loss, static_argnames=("dual_clip", "agg", "kl"))


def _batch(seed, b=6, t=9, spread=0.5):
    k = jax.random.split(jax.random.key(seed), 4)
    logp = -jax.random.uniform(k[0], (b, t), minval=0.1, maxval=3.0)
    old = logp + spread * jax.random.normal(k[1], (b, t))
    adv = jax.random.normal(k[2], (b,))
    lengths = jax.random.randint(k[3], (b,), 0, t + 1).at[0].set(t).at[1].set(0)  # a full and an empty row
    mask = jnp.arange(t)[None, :] < lengths[:, None]
    return logp, old, adv, mask


def _np_aggregate(loss, mask, agg):
    loss, m = np.asarray(loss, np.float64), np.asarray(mask, np.float64)
    rows = [i for i in range(m.shape[0]) if m[i].sum() > 0]
    if agg == "token-mean":
        return (loss * m).sum() / m.sum()
    if agg == "seq-mean-token-mean":
        return np.mean([(loss[i] * m[i]).sum() / m[i].sum() for i in rows])
    if agg == "seq-mean-token-sum":
        return np.mean([(loss[i] * m[i]).sum() for i in rows])
    return (loss * m).sum() / m.shape[1]


def _np_surrogate(logp, old, adv, lo, hi, c):
    ratio = np.exp(np.clip(np.asarray(logp, np.float64) - np.asarray(old, np.float64), -20, 20))
    a = np.asarray(adv, np.float64)[:, None]
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - lo, 1 + hi))
    if c is not None:
        pg = np.where(a < 0, np.minimum(pg, -c * a), pg)
    return pg


def test_on_policy_token_mean_is_eq4_with_its_gradient():
    # ρ ≡ 1: loss = −Σ m A / Σ m, ∂loss/∂logp = −m A / Σ m
    logp = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -0.1, -4.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
    adv = jnp.array([2.0, -1.0])

    def loss_fn(lp):
        return policy_loss(lp, jax.lax.stop_gradient(lp), adv, mask)[0]

    loss, grad = jax.value_and_grad(loss_fn)(logp)
    assert loss == pytest.approx(-(2 * 2 - 1 * 3) / 5)
    np.testing.assert_allclose(grad, [[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]], rtol=1e-6)


def test_clip_and_dual_clip_hand_computed():
    # one token per row: (ratio, A) = (1.5, 1) clipped to 1.2; (0.5, 1) unclipped (min side); (4, −1) dual-clipped at 3
    logp = jnp.log(jnp.array([[1.5], [0.5], [4.0], [0.5]]))
    old = jnp.zeros((4, 1))
    adv = jnp.array([1.0, 1.0, -1.0, -1.0])
    mask = jnp.ones((4, 1), bool)
    loss, metrics = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    # per token: −1.2, −0.5, min(max(4, 1.2), 3) = 3, max(0.5, 0.8) = 0.8
    assert loss == pytest.approx((-1.2 - 0.5 + 3.0 + 0.8) / 4, rel=1e-6)
    assert metrics["pg_clipfrac"] == pytest.approx(2 / 4)  # rows 0 and 3 take the clipped branch
    assert metrics["pg_clipfrac_lower"] == pytest.approx(1 / 4)
    assert metrics["ppo_kl"] == pytest.approx(-np.mean(np.log([1.5, 0.5, 4.0, 0.5])), rel=1e-6)
    assert metrics["token_count"] == 4


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    agg=st.sampled_from(AGG_MODES),
    clip_high=st.sampled_from([0.2, 0.28]),
    dual_clip=st.sampled_from([None, 3.0]),
)
def test_property_every_mode_matches_numpy(seed, agg, clip_high, dual_clip):
    logp, old, adv, mask = _batch(seed)
    loss, metrics = _policy_loss(logp, old, adv, mask, clip_high=clip_high, dual_clip=dual_clip, agg=agg)
    want = _np_aggregate(_np_surrogate(logp, old, adv, 0.2, clip_high, dual_clip), mask, agg)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(metrics["loss_numerator"] / metrics["loss_denominator"]) == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_sum_exactly_to_the_step(agg):
    logp, old, adv, mask = _batch(3, b=8, t=7, spread=0.3)
    mask = mask.at[2].set(jnp.arange(7) < 1)  # very unequal token counts across micro-batches

    def step_loss(lp, rows, denominator):
        return policy_loss(lp[rows], old[rows], adv[rows], mask[rows], agg=agg, denominator=denominator)[0]

    loss_and_grad = jax.jit(jax.value_and_grad(step_loss))
    full, full_grad = loss_and_grad(logp, jnp.arange(8), loss_denominator(mask, agg))
    assert float(full) == pytest.approx(float(step_loss(logp, jnp.arange(8), None)), rel=1e-6)
    micro = [jnp.arange(0, 3), jnp.arange(3, 4), jnp.arange(4, 8)]
    parts = [loss_and_grad(logp, rows, loss_denominator(mask, agg)) for rows in micro]
    assert float(sum(p[0] for p in parts)) == pytest.approx(float(full), rel=1e-6)
    np.testing.assert_allclose(sum(p[1] for p in parts), full_grad, rtol=1e-6, atol=1e-8)
    if agg == "token-mean":  # the mean of per-micro-batch means is a different number
        mean_of_means = np.mean([float(_policy_loss(logp[r], old[r], adv[r], mask[r])[0]) for r in micro])
        assert abs(mean_of_means - float(full)) > 1e-3


def test_kl_variants_hand_computed_and_added_to_the_loss():
    logp, ref = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -1.0]])
    d = np.array([0.5, -1.0])
    np.testing.assert_allclose(kl_penalty(logp, ref, "kl"), [d], rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "abs"), [np.abs(d)], rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2"), [0.5 * d**2], rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "low_var_kl"), [np.exp(-d) + d - 1], rtol=1e-6)
    mask = jnp.ones((1, 2), bool)
    base, _ = policy_loss(logp, logp, jnp.array([1.0]), mask)
    with_kl, metrics = policy_loss(logp, logp, jnp.array([1.0]), mask, ref_logp=ref, kl_coef=0.1, kl="k3")
    assert float(metrics["kl_loss"]) == pytest.approx(np.mean(np.exp(-d) + d - 1), rel=1e-6)
    assert float(with_kl) == pytest.approx(float(base) + 0.1 * float(metrics["kl_loss"]), rel=1e-6)
    assert float(kl_penalty(jnp.zeros((1, 1)), jnp.full((1, 1), 50.0))[0, 0]) == pytest.approx(10.0)  # verl's clamp


def test_jit_and_aliases():
    logp, old, adv, mask = _batch(5)
    fn = _policy_loss
    for tunix_name, verl_name in [("sequence-mean-token-mean", "seq-mean-token-mean"), ("token-mean", "token-mean")]:
        assert float(fn(logp, old, adv, mask, agg=tunix_name)[0]) == pytest.approx(
            float(fn(logp, old, adv, mask, agg=verl_name)[0]), rel=1e-7
        )
    assert canonical_agg("sequence-mean-token-sum-norm") == "seq-mean-token-sum-norm"
    assert float(aggregate(jnp.ones((2, 4)), jnp.ones((2, 4)), "seq-mean-token-sum-norm")) == 2.0
    assert loss_denominator(jnp.zeros((3, 4)), "token-mean") == 0 and math.isfinite(
        float(policy_loss(logp, old, adv, jnp.zeros_like(mask))[0])
    )


def test_bad_inputs_are_named():
    logp, old, adv, mask = _batch(0)
    with pytest.raises(ValueError, match="agg"):
        policy_loss(logp, old, adv, mask, agg="sequence-mean-token-scale")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="kl must be"):
        kl_penalty(logp, old, "k4")
