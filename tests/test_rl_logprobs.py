"""token_logprobs_and_entropy against the full-logits reference, a hand-computed case and its memory bounds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlx.rl import naive_logprobs_and_entropy, token_logprobs_and_entropy


def _inputs(seed, lead, d, v, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k[0], (*lead, d)).astype(dtype)
    w = (jax.random.normal(k[1], (d, v)) * 0.7).astype(dtype)
    y = jax.random.randint(k[2], lead, 0, v)
    m = jax.random.bernoulli(k[3], 0.8, lead)
    a = jax.random.normal(k[4], (2, *lead))
    return h, w, y, m, a


def _outputs_and_grads(fn, h, w, y, m, a, **kw):
    """((logp, entropy), (d hidden, d lm_head)) of Σ a0·logp + Σ a1·entropy, in one compiled call."""

    def objective(h, w):
        logp, ent = fn(h, w, y, m, **kw)
        return jnp.sum(a[0] * logp) + jnp.sum(a[1] * ent), (logp, ent)

    (_, out), grads = jax.jit(jax.value_and_grad(objective, (0, 1), has_aux=True))(h, w)
    return out, grads


def _assert_close(got, want, rtol, atol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=rtol, atol=atol)


def test_hand_computed_two_token_vocab():
    # logits [0, ln 3]: p = [1/4, 3/4]
    logp, ent = token_logprobs_and_entropy(
        jnp.ones((1, 1)), jnp.array([[0.0, math.log(3.0)]]), jnp.array([1]), chunk=1, vocab_chunk=1
    )
    assert logp[0] == pytest.approx(math.log(0.75), abs=1e-6)
    assert ent[0] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)


def test_uniform_distribution_has_entropy_log_v():
    h = jax.random.normal(jax.random.key(1), (5, 3))
    logp, ent = token_logprobs_and_entropy(h, jnp.zeros((3, 37)), jnp.arange(5), chunk=2, vocab_chunk=8)
    np.testing.assert_allclose(ent, math.log(37), rtol=1e-6)
    np.testing.assert_allclose(logp, -math.log(37), rtol=1e-6)


def test_matches_naive_values_and_gradients_with_ragged_tiles_and_temperature():
    args = _inputs(0, (37,), 16, 101)
    ours = _outputs_and_grads(token_logprobs_and_entropy, *args, chunk=8, vocab_chunk=13, temperature=0.7)
    ref = _outputs_and_grads(naive_logprobs_and_entropy, *args, temperature=0.7)
    _assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_batched_layout_and_masked_positions():
    h, w, y, m, a = _inputs(2, (3, 7), 8, 50)
    (logp, ent), (dh, _) = _outputs_and_grads(token_logprobs_and_entropy, h, w, y, m, a, chunk=4, vocab_chunk=16)
    assert logp.shape == ent.shape == (3, 7)
    _assert_close((logp, ent), naive_logprobs_and_entropy(h, w, y, m), rtol=1e-5, atol=1e-5)
    off = ~np.asarray(m)
    assert np.all(np.asarray(logp)[off] == 0) and np.all(np.asarray(ent)[off] == 0)
    assert np.all(np.asarray(dh)[off] == 0) and np.any(np.asarray(dh)[~off] != 0)


@pytest.mark.parametrize(
    ("v", "vocab_chunk"),
    [(300, 64), (1000, 48)],
    ids=["5-vocab-blocks,ragged", "21-vocab-blocks,staged-in-groups-of-3,ragged"],
)
def test_bfloat16_inputs_give_bfloat16_gradients_close_to_naive(v, vocab_chunk):
    args = _inputs(3, (40,), 32, v, dtype=jnp.bfloat16)
    (out, grads) = _outputs_and_grads(token_logprobs_and_entropy, *args, chunk=16, vocab_chunk=vocab_chunk)
    ref_out, ref_grads = _outputs_and_grads(naive_logprobs_and_entropy, *args)
    _assert_close(out, ref_out, rtol=1e-5, atol=1e-4)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    _assert_close(grads, ref_grads, rtol=2e-2, atol=2e-2)


@settings(max_examples=4, deadline=None)
@given(
    n=st.integers(1, 20),
    v=st.integers(2, 40),
    chunk=st.integers(1, 25),
    vocab_chunk=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_property_any_tiling_equals_naive(n, v, chunk, vocab_chunk, seed):
    h, w, y, m, _ = _inputs(seed, (n,), 4, v)
    ours = jax.jit(lambda h, w: token_logprobs_and_entropy(h, w, y, m, chunk=chunk, vocab_chunk=vocab_chunk))(h, w)
    _assert_close(ours, naive_logprobs_and_entropy(h, w, y, m), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(ours[1]) >= -1e-5) and np.all(np.asarray(ours[1]) <= math.log(v) + 1e-5)


def test_no_tokens_by_vocab_buffer_in_forward_and_backward():
    n, d, v = 2048, 64, 8192
    s = jax.ShapeDtypeStruct
    args = (s((n, d), jnp.float32), s((d, v), jnp.float32), s((n,), jnp.int32), s((n,), jnp.bool_))

    def temp_bytes(fn, **kw):
        f = jax.jit(jax.grad(lambda h, w, y, m: sum(x.sum() for x in fn(h, w, y, m, **kw)), (0, 1)))
        return f.lower(*args).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = n * v * 4
    assert temp_bytes(naive_logprobs_and_entropy) >= logits_bytes
    assert temp_bytes(token_logprobs_and_entropy, chunk=256, vocab_chunk=1024) < logits_bytes / 8


def test_bfloat16_lm_head_is_neither_copied_nor_converted():
    """Forward + backward with a bf16 lm_head (ragged vocab blocks): temporaries stay below half a copy of it (XLA's
    CPU backend converts a bf16 array that a loop slices or reads back into a whole float32 or uint16 copy; ∂W is
    staged in eighths)."""
    n, d, v = 256, 64, 65_000
    s = jax.ShapeDtypeStruct
    args = (s((n, d), jnp.bfloat16), s((d, v), jnp.bfloat16), s((n,), jnp.int32), s((n,), jnp.bool_))

    def objective(h, w, y, m):
        return sum(x.sum() for x in token_logprobs_and_entropy(h, w, y, m, chunk=128, vocab_chunk=1024))

    temp = jax.jit(jax.grad(objective, (0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < d * v * 2 / 2, f"{temp / 2**20:.1f} MiB of temporaries for a {d * v * 2 / 2**20:.1f} MiB lm_head"


def test_bad_inputs_are_named():
    h, w, y, m, _ = _inputs(0, (6,), 4, 10)
    with pytest.raises(ValueError, match="lm_head"):
        token_logprobs_and_entropy(h, w.T, y)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs_and_entropy(h, w, y[:5])
    with pytest.raises(ValueError, match="mask"):
        token_logprobs_and_entropy(h, w, y, m[:5])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="integer"):
        token_logprobs_and_entropy(h, w, y.astype(jnp.float32))
