"""AEPO hysteresis and keep mask, batch entropy, and the static negative-gradient clipping of §2.5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlx.rl import (
    AEPOState,
    aepo_keep_mask,
    aepo_update,
    batch_entropy,
    loss_denominator,
    negative_entropy_clip_mask,
    policy_loss,
)


def test_hysteresis_sequence():
    # h_low 0.14, h_high 0.25: off above 0.25, stays off until below 0.14
    entropies = [0.20, 0.30, 0.20, 0.15, 0.10, 0.20, 0.26, 0.25]
    want = [True, False, False, False, True, True, False, False]
    state, got = AEPOState(), []
    for h in entropies:
        state = aepo_update(state, h, h_low=0.14, h_high=0.25)
        got.append(bool(state.negatives_on))
    assert got == want


def test_update_scans_under_jit():
    def step(state, h):
        state = aepo_update(state, h, h_low=0.14, h_high=0.25)
        return state, state.negatives_on

    _, ons = jax.jit(lambda hs: jax.lax.scan(step, AEPOState(), hs))(jnp.array([0.3, 0.2, 0.1, 0.2]))
    assert ons.tolist() == [False, False, True, True]


def test_keep_mask_truth_table():
    adv = jnp.array([1.0, 1.0, 0.0, -1.0, 2.0])
    rew = jnp.array([1.0, 0.0, 1.0, 0.0, -0.5])
    assert aepo_keep_mask(adv, rew, False).tolist() == [True, False, False, False, False]
    assert aepo_keep_mask(adv, rew, jnp.asarray(True)).tolist() == [True] * 5


def test_removed_samples_leave_the_denominator():
    k = jax.random.split(jax.random.key(0), 3)
    logp = -jax.random.uniform(k[0], (4, 5))
    mask = jnp.arange(5)[None, :] < jnp.array([5, 2, 4, 3])[:, None]
    adv, rew = jnp.array([0.5, -1.0, 1.0, 0.0]), jnp.array([1.0, 0.0, 1.0, 1.0])
    keep = aepo_keep_mask(adv, rew, False)
    loss_fn = jax.jit(policy_loss)
    loss, metrics = loss_fn(logp, logp, adv, mask & keep[:, None])
    sub = jnp.array([0, 2])
    assert float(loss) == pytest.approx(float(loss_fn(logp[sub], logp[sub], adv[sub], mask[sub])[0]), rel=1e-6)
    assert metrics["token_count"] == 9


def test_batch_entropy_is_token_mean_not_mean_of_sequence_means():
    ent = jnp.array([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]], bool)
    assert float(batch_entropy(ent, mask)) == pytest.approx(7 / 5)  # the mean of means would be 2


def test_negative_clip_mask_and_denominator():
    ent = jnp.array([[0.1, 0.9, 0.2], [0.1, 0.1, 0.1], [0.8, 0.9, 0.0], [0.9, 0.9, 0.9]])
    mask = jnp.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], bool)
    adv = jnp.array([-1.0, -1.0, -2.0, 1.0])
    tok = negative_entropy_clip_mask(ent, adv, mask, tau_token=0.5)
    np.testing.assert_array_equal(tok, [[1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]])  # positive A untouched
    seq = negative_entropy_clip_mask(ent, adv, mask, tau_seq=0.5)  # row means 0.4, 0.1, 0.85 (masked token out)
    np.testing.assert_array_equal(seq, [[1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1]])
    both = negative_entropy_clip_mask(ent, adv, mask, tau_token=0.5, tau_seq=0.5)
    np.testing.assert_array_equal(both, np.minimum(tok, seq))
    # Eq. 8: clipped tokens drop out of the numerator but the normaliser stays Σ mask = 11
    logp = -jnp.ones((4, 3))
    loss, _ = policy_loss(logp, logp, adv, mask * tok, denominator=loss_denominator(mask))
    kept = np.asarray(mask * tok)
    assert float(loss) == pytest.approx(-(np.asarray(adv)[:, None] * kept).sum() / 11, rel=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="h_low < h_high"):
        aepo_update(AEPOState(), 0.2, h_low=0.3, h_high=0.2)
    with pytest.raises(ValueError, match="advantages"):
        aepo_keep_mask(jnp.ones(3), jnp.ones(4), True)
    with pytest.raises(ValueError, match="mask"):
        batch_entropy(jnp.ones((2, 3)), jnp.ones((2, 4)))
