"""The sampling distribution (temperature, top-k, top-p) against transformers' logits warpers, and the sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from qlx.rollout.buckets import batch_bucket, length_bucket
from qlx.rollout.sampling import first_argmax, sample_tokens, sampling_logprobs


def _hf_logprobs(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """transformers' sampling pipeline (temperature -> top-k -> top-p), as log-softmax of the warped scores."""
    scores = torch.from_numpy(logits[None].astype(np.float64))
    if temperature == 0:
        return torch.log_softmax(scores, -1)[0].numpy()
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.log_softmax(scores, -1)[0].numpy()


# (temperature, top_p, top_k, logit scale): peaked rows keep few tokens (found among the top 64 candidates), flat
# rows keep hundreds (found by bisection), top_k above 64 needs the counting bisection.
ROWS = [
    (1.0, 1.0, 0, 3.0),
    (0.7, 0.95, 0, 3.0),
    (1.3, 0.5, 0, 3.0),
    (0.7, 1.0, 5, 3.0),
    (0.9, 0.8, 20, 3.0),
    (0.0, 0.3, 3, 3.0),
    (2.0, 0.05, 0, 3.0),
    (1.0, 0.95, 0, 0.3),
    (0.7, 0.9, 100, 0.3),
    (1.0, 1.0, 250, 1.0),
    (0.5, 0.99, 0, 1.0),
]


def test_sampling_logprobs_match_transformers_warpers():
    rng = np.random.default_rng(0)
    temperature_b, top_p_b, top_k_b, scale_b = (np.array(col) for col in zip(*ROWS, strict=True))
    logits_bv = (rng.standard_normal((len(ROWS), 300)) * scale_b[:, None]).astype(np.float32)
    ours = np.asarray(
        sampling_logprobs(
            jnp.asarray(logits_bv),
            jnp.asarray(temperature_b, jnp.float32),
            jnp.asarray(top_p_b, jnp.float32),
            jnp.asarray(top_k_b, jnp.int32),
        )
    )
    kept_counts = []
    for b, (temperature, top_p, top_k, _) in enumerate(ROWS):
        expected = _hf_logprobs(logits_bv[b], temperature, top_p, top_k)
        kept = np.isfinite(expected)
        kept_counts.append(kept.sum())
        np.testing.assert_array_equal(np.isfinite(ours[b]), kept, err_msg=f"row {b}: kept set differs")
        np.testing.assert_allclose(ours[b][kept], expected[kept], atol=1e-5, err_msg=f"row {b}")
    assert min(kept_counts[1:7]) < 64 < min(kept_counts[7:])  # both search paths were exercised


def test_sample_tokens_follows_the_distribution_and_is_reproducible():
    rng = np.random.default_rng(1)
    logits_v = jnp.asarray(rng.standard_normal(6).astype(np.float32))
    n = 20000
    logp_nv = sampling_logprobs(
        jnp.broadcast_to(logits_v, (n, 6)), jnp.full(n, 0.8), jnp.full(n, 0.9), jnp.zeros(n, jnp.int32)
    )
    keys_n = jax.random.split(jax.random.key(3), n)
    tokens, logprob = sample_tokens(logp_nv, jnp.full(n, 0.8), keys_n)
    probs_v = np.exp(np.asarray(logp_nv[0]))
    freq_v = np.bincount(np.asarray(tokens), minlength=6) / n
    np.testing.assert_allclose(freq_v, probs_v, atol=4 * np.sqrt(0.25 / n))
    assert (freq_v[probs_v == 0] == 0).all() and (probs_v == 0).any()  # top-p removed something, never drawn
    np.testing.assert_allclose(np.asarray(logprob), np.asarray(logp_nv[0])[np.asarray(tokens)], rtol=1e-6)
    again, _ = sample_tokens(logp_nv, jnp.full(n, 0.8), keys_n)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(tokens))
    other, _ = sample_tokens(logp_nv, jnp.full(n, 0.8), jax.random.split(jax.random.key(4), n))
    assert (np.asarray(other) != np.asarray(tokens)).mean() > 0.3


def test_greedy_rows_take_the_argmax_with_the_models_logprob():
    rng = np.random.default_rng(2)
    logits_bv = jnp.asarray(rng.standard_normal((3, 50)).astype(np.float32))
    temperature_b = jnp.asarray([0.0, 0.0, 0.0])
    logp_bv = sampling_logprobs(logits_bv, temperature_b, jnp.asarray([1.0, 0.2, 0.9]), jnp.asarray([0, 1, 7]))
    tokens, logprob = sample_tokens(logp_bv, temperature_b, jax.random.split(jax.random.key(0), 3))
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits_bv), -1))
    expected = np.asarray(jax.nn.log_softmax(logits_bv))[np.arange(3), np.asarray(tokens)]
    np.testing.assert_allclose(np.asarray(logprob), expected, atol=1e-6)


def test_first_argmax_equals_jnp_argmax_with_ties_and_nans():
    rng = np.random.default_rng(6)
    x_bv = rng.integers(-3, 4, (64, 40)).astype(np.float32)  # many ties
    x_bv[5, [7, 20]] = np.nan
    x_bv[6, 0] = np.nan
    x_bv[7] = -np.inf
    got = first_argmax(jnp.asarray(x_bv))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(jnp.asarray(x_bv), axis=-1)))


@pytest.mark.parametrize(("n", "expected"), [(1, 16), (16, 16), (17, 20), (33, 40), (129, 160), (8193, 10240)])
def test_length_bucket_pads_at_most_a_quarter(n, expected):
    assert length_bucket(n) == expected


def test_batch_bucket_powers_of_two_and_mesh_multiples():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert batch_bucket(1, 4) == 4 and batch_bucket(5, 4) == 8
    with pytest.raises(ValueError, match="n >= 1"):
        batch_bucket(0)
