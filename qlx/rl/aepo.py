"""Entropy control of negative gradients (QwenLong-L1.5 §4.3–4.4): AEPO's hysteresis and static entropy clipping.

AEPO keeps the batch entropy in [h_low, h_high]: once the token-mean entropy of the current rollout batch rises above
h_high, every sample with non-positive advantage (or reward) is removed from the batch, so the update is positive
only and entropy falls; once it drops below h_low, negatives come back. Removed samples leave the token-mean
denominator (multiply the loss mask by the keep mask). Static clipping instead zeroes the loss of high-entropy tokens
(or whole sequences) of negative-advantage samples while keeping them in the denominator.
"""

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AEPOState:
    """negatives_on: bool scalar array, whether negative-advantage samples are trained on (True at the start)."""

    negatives_on: jax.Array = dataclasses.field(default_factory=lambda: jnp.asarray(True))


def batch_entropy(entropy, mask):
    """H_B = Σ_{i,t} m_{i,t} H_{i,t} / Σ_{i,t} m_{i,t}: the token mean over the batch (verl's logged entropy).

    entropy [B, T] float, mask [B, T] bool/0-1. Returns a float32 scalar (0 when no token is unmasked).
    """
    if jnp.shape(entropy) != jnp.shape(mask):
        raise ValueError(f"entropy shape {jnp.shape(entropy)} must equal mask shape {jnp.shape(mask)}")
    m = jnp.asarray(mask, jnp.float32)
    return jnp.sum(jnp.asarray(entropy, jnp.float32) * m) / jnp.maximum(m.sum(), 1.0)


def aepo_update(state, batch_entropy, *, h_low, h_high):
    """Hysteresis: negatives_on' = False if H_B > h_high; True if H_B < h_low; else unchanged.

    ``batch_entropy`` is the token-mean entropy of the current rollout batch under the current parameters (before
    the update), from ``batch_entropy``. Requires h_low < h_high.
    """
    if not h_low < h_high:
        raise ValueError(f"AEPO needs h_low < h_high, got h_low={h_low}, h_high={h_high}")
    on = jnp.asarray(state.negatives_on, bool)
    on = jnp.where(batch_entropy > h_high, False, jnp.where(batch_entropy < h_low, True, on))
    return AEPOState(negatives_on=on)


def aepo_keep_mask(advantages, rewards, negatives_on):
    """keep_i = negatives_on or (A_i > 0 and r_i > 0). advantages [B], rewards [B] → bool [B].

    While negatives are off, samples with A ≤ 0 or r ≤ 0 are removed (the recipe's README rule); multiply the loss
    mask by ``keep[:, None]`` so they leave the token-mean denominator too.
    """
    if jnp.shape(advantages) != jnp.shape(rewards):
        raise ValueError(f"advantages shape {jnp.shape(advantages)} must equal rewards shape {jnp.shape(rewards)}")
    return jnp.asarray(negatives_on, bool) | ((jnp.asarray(advantages) > 0) & (jnp.asarray(rewards) > 0))


def sequence_entropy(entropy, mask):
    """H̄(i): mean entropy of each sequence over its unmasked tokens. [B, T] → [B] (0 for an empty row)."""
    m = jnp.asarray(mask, jnp.float32)
    return jnp.sum(jnp.asarray(entropy, jnp.float32) * m, axis=1) / jnp.maximum(m.sum(axis=1), 1.0)


def negative_entropy_clip_mask(entropy, advantages, mask, *, tau_token=None, tau_seq=None):
    """Static negative-gradient clipping (Eq. 8–9): the indicator I(i, t) that multiplies each token's loss.

        I(i,t) = 0  if A_i < 0 and ( H(t|i) > τ_token  or  H̄(i) > τ_seq ),  else 1
        H̄(i)   = Σ_t m_{i,t} H(t|i) / Σ_t m_{i,t}

    A threshold left as None disables that test. Use the result as ``mask * I`` for the loss numerator while the
    denominator stays that of ``mask`` (``policy_loss(..., denominator=loss_denominator(mask, agg))``).

    Args: entropy [B, T], advantages [B] (or [B, T], sequence-constant), mask [B, T]. Returns float32 [B, T].
    """
    entropy = jnp.asarray(entropy, jnp.float32)
    if entropy.ndim != 2 or jnp.shape(mask) != entropy.shape:
        raise ValueError(f"entropy and mask must both be [B, T], got {entropy.shape} and {jnp.shape(mask)}")
    adv = jnp.asarray(advantages, jnp.float32)
    adv_b = adv if adv.ndim == 1 else adv[:, 0]
    if adv_b.shape != entropy.shape[:1]:
        raise ValueError(f"advantages shape {adv.shape} does not match entropy batch size {entropy.shape[0]}")
    clip = jnp.zeros(entropy.shape, bool)
    if tau_token is not None:
        clip = clip | (entropy > tau_token)
    if tau_seq is not None:
        clip = clip | (sequence_entropy(entropy, mask) > tau_seq)[:, None]
    return jnp.where((adv_b < 0)[:, None] & clip, 0.0, 1.0)
