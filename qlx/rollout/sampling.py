"""The sampling distribution of one decode step, and a draw from it with its log-probability.

Every row of a batch carries its own sampling parameters (``temperature_b``, ``top_p_b``, ``top_k_b``), so requests
with different settings share one compiled decode loop. The distribution a token is drawn from is defined once, here,
and both the rollout engine and any teacher-forced check call :func:`sampling_logprobs`:

    temperature == 0 (greedy):  log p = log_softmax(logits)                      (the model's own distribution)
    temperature  > 0:           z     = logits / temperature
                                keep  = top-k(z) ∩ nucleus_top_p(softmax(z restricted to top-k))
                                log p = log_softmax(where(keep, z, -inf))

``top_k == 0`` and ``top_p == 1`` switch the respective filter off. The nucleus is the smallest prefix of the tokens
sorted by decreasing probability whose mass reaches ``top_p`` (the token that crosses ``top_p`` is kept); both filters
are applied as a value threshold, so tokens tied with the last kept one are kept too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _filter_threshold_b(z_bv: jax.Array, top_p_b: jax.Array, top_k_b: jax.Array) -> jax.Array:
    """Smallest tempered logit still kept by the top-k and top-p filters, per row: [B, V] -> [B]."""
    vocab = z_bv.shape[-1]
    sorted_bv = -jnp.sort(-z_bv, axis=-1)
    k_b = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, vocab), vocab)
    kth_b = jnp.take_along_axis(sorted_bv, (k_b - 1)[:, None], axis=-1)[:, 0]
    in_top_k_bv = jnp.arange(vocab)[None, :] < k_b[:, None]
    probs_bv = jax.nn.softmax(jnp.where(in_top_k_bv, sorted_bv, -jnp.inf), axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    n_keep_b = jnp.sum((mass_before_bv < top_p_b[:, None]) & in_top_k_bv, axis=-1)
    nucleus_b = jnp.take_along_axis(sorted_bv, (jnp.maximum(n_keep_b, 1) - 1)[:, None], axis=-1)[:, 0]
    return jnp.maximum(kth_b, nucleus_b)


def sampling_logprobs(
    logits_bv: jax.Array,
    temperature_b: jax.Array,
    top_p_b: jax.Array,
    top_k_b: jax.Array,
    *,
    filtered: bool = True,
) -> jax.Array:
    """Log-probabilities of the distribution a token is sampled from (module docstring), float32 [B, V].

    Args:
      logits_bv: model logits [B, V].
      temperature_b: [B]; 0 means greedy (the row's log-probs are then log_softmax(logits), unfiltered).
      top_p_b: [B] in (0, 1]; 1 turns the nucleus filter off.
      top_k_b: [B] int; 0 turns the top-k filter off.
      filtered: static; False skips the sort when no row uses top-p or top-k (the result is then the same as with
        every top_p == 1 and top_k == 0).
    """
    logits_bv = logits_bv.astype(jnp.float32)
    greedy_b = temperature_b <= 0
    z_bv = logits_bv / jnp.where(greedy_b, 1.0, temperature_b).astype(jnp.float32)[:, None]
    if filtered:
        top_p_b = jnp.where(greedy_b, 1.0, top_p_b).astype(jnp.float32)
        top_k_b = jnp.where(greedy_b, 0, top_k_b).astype(jnp.int32)
        threshold_b = _filter_threshold_b(z_bv, top_p_b, top_k_b)
        z_bv = jnp.where(z_bv >= threshold_b[:, None], z_bv, -jnp.inf)
    return jax.nn.log_softmax(z_bv, axis=-1)


def sample_tokens(logprobs_bv: jax.Array, temperature_b: jax.Array, keys_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row from ``exp(logprobs_bv)``; greedy rows (temperature 0) take the argmax.

    Args:
      logprobs_bv: output of :func:`sampling_logprobs`, [B, V].
      temperature_b: [B].
      keys_b: one typed PRNG key per row, [B] (each row's draw depends only on its own key).

    Returns:
      tokens_b int32 [B] and their log-probabilities logprob_b float32 [B] under ``logprobs_bv``.
    """
    sampled_b = jax.vmap(jax.random.categorical)(keys_b, logprobs_bv)
    tokens_b = jnp.where(temperature_b <= 0, jnp.argmax(logprobs_bv, axis=-1), sampled_b).astype(jnp.int32)
    logprob_b = jnp.take_along_axis(logprobs_bv, tokens_b[:, None], axis=-1)[:, 0]
    return tokens_b, logprob_b
