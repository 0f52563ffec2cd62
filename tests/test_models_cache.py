"""Model API: KV-cache prefill/decode vs the full forward, packed segments vs separate sequences,
hidden_states / lm_head_weight, remat, and the attention dispatch."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlx
from qlx.models import build_model
from qlx.models.attention import attention, attention_mask, chunk_bounds, reference_attention
from qlx.models.cache import PagedKVCache

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 11)), jnp.int32)


@pytest.fixture(scope="module")
def moe_model():
    return build_model(qlx.load_config(CONFIGS / "tiny-moe.yaml").model, seed=3)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@nnx.jit
def cached_step(model, tokens, cache, positions):
    return model(tokens, cache=cache, positions_bt=positions)


def test_prefill_and_decode_with_cache_match_full_forward(moe_model):
    """Rows of different prompt lengths (5 and 3, padded), chunked prefill, then decode one token per row."""
    full = np.asarray(forward(moe_model, TOKENS))
    lengths = [5, 3]
    cache = moe_model.init_cache(2, 16)
    for positions in (np.arange(0, 3), np.arange(3, 6)):
        pos = np.stack([np.where(positions < n, positions, -1) for n in lengths])
        chunk = TOKENS[:, positions[0] : positions[-1] + 1]
        logits, cache = cached_step(moe_model, chunk, cache, jnp.asarray(pos, jnp.int32))
        for row, n in enumerate(lengths):
            valid = positions < n
            np.testing.assert_allclose(logits[row][valid], full[row, positions[valid]], atol=1e-4)
    np.testing.assert_array_equal(cache.lengths, lengths)
    _decode_five_as_the_full_forward(moe_model, cache, lengths, full)


def _decode_five_as_the_full_forward(moe_model, cache, lengths, full):
    """Five one-token decode steps after each row's ``lengths`` tokens: every logit equals ``full``'s."""
    for step in range(5):
        next_tokens = jnp.stack([TOKENS[row, n + step] for row, n in enumerate(lengths)])[:, None]
        logits, cache = cached_step(moe_model, next_tokens, cache, cache.default_positions(1))
        for row, n in enumerate(lengths):
            np.testing.assert_allclose(logits[row, 0], full[row, n + step], atol=1e-4)
    np.testing.assert_array_equal(cache.lengths, [n + 5 for n in lengths])


def test_paged_cache_matches_full_forward(moe_model):
    """The same prefill + decode over a PagedKVCache (pages of 4 slots, scattered and out of order, page 0 padding
    the tables): every logit equals the full forward's."""
    full = np.asarray(forward(moe_model, TOKENS))
    c = moe_model.config
    lengths = [5, 3]
    table = jnp.asarray([[7, 2, 9, 0], [4, 8, 1, 0]], jnp.int32)  # row 0 reaches page 9 (tokens 8-9), row 1 page 1
    pages = [jnp.full((c.num_kv_heads, 10, 4, c.head_dim), 3.0, c.dtype) for _ in range(2 * c.num_layers)]
    cache = PagedKVCache(tuple(pages[::2]), tuple(pages[1::2]), table, jnp.zeros(2, jnp.int32))
    positions = np.arange(0, 6)
    pos = np.stack([np.where(positions < n, positions, -1) for n in lengths])
    logits, cache = cached_step(moe_model, TOKENS[:, :6], cache, jnp.asarray(pos, jnp.int32))
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(logits[row][:n], full[row, :n], atol=1e-4)
    _decode_five_as_the_full_forward(moe_model, cache, lengths, full)


def test_init_cache_can_be_donated(moe_model):
    """Without a mesh every K / V array is its own buffer: donating the whole cache to a jitted step works and
    consumes every input buffer (aliased K / V would fail with "Attempt to donate the same buffer twice")."""
    cache = moe_model.init_cache(2, 16)
    buffers = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(cache)]
    assert len(set(buffers)) == len(buffers)
    step = jax.jit(lambda c: jax.tree.map(lambda a: a + 1, c), donate_argnums=0)
    out = step(cache)
    assert all(a.is_deleted() for a in jax.tree.leaves(cache))
    assert all((np.asarray(a) == 1).all() for a in jax.tree.leaves(out))


def test_packed_segments_match_separate_sequences(moe_model):
    """Two sequences (lengths 4 and 7) packed in one row with segment ids equal the rows of the plain forward."""
    full = np.asarray(forward(moe_model, TOKENS))
    packed = jnp.concatenate([TOKENS[0, :4], TOKENS[1, :7]])[None]
    segments = jnp.asarray([[1] * 4 + [2] * 7])
    positions = jnp.asarray([list(range(4)) + list(range(7))])
    logits = nnx.jit(lambda m, t, s, p: m(t, segment_ids_bt=s, positions_bt=p))(moe_model, packed, segments, positions)
    np.testing.assert_allclose(logits[0, :4], full[0, :4], atol=1e-5)
    np.testing.assert_allclose(logits[0, 4:], full[1, :7], atol=1e-5)


def test_hidden_states_and_lm_head_weight(moe_model):
    hidden, w = nnx.jit(lambda m, t: (m.hidden_states(t), m.lm_head_weight()))(moe_model, TOKENS)
    assert hidden.shape == (2, 11, moe_model.config.hidden_size) and w.shape == (64, 512)
    np.testing.assert_allclose(hidden @ w, forward(moe_model, TOKENS), atol=1e-5)


def test_precomputed_expert_weights_match_per_call_split(moe_model):
    """hidden_states with expert_weights() split once (as the decode loop does) equals splitting inside each call;
    the split arrays are the stacked experts; dense models and the ragged backend need none."""
    per_layer = moe_model.expert_weights()
    moe_layer = moe_model.layer_modules()[0].mlp
    gate_up, down = np.asarray(moe_layer.gate_up[...]), np.asarray(moe_layer.down[...])
    np.testing.assert_array_equal(per_layer[0].gate_up[5], gate_up[5].reshape(gate_up.shape[1], -1))
    np.testing.assert_array_equal(per_layer[0].down[5], down[5])
    run = nnx.jit(lambda m, t, w: m.hidden_states(t, expert_weights=w))
    np.testing.assert_allclose(run(moe_model, TOKENS, per_layer), run(moe_model, TOKENS, None), rtol=1e-6, atol=1e-6)
    dense = build_model(qlx.load_config(CONFIGS / "tiny-dense.yaml").model, seed=0)
    assert dense.expert_weights() is None
    ragged = build_model(dataclasses.replace(moe_model.config, moe_backend="ragged"), seed=0)
    assert ragged.expert_weights() is None


def test_tied_lm_head_and_remat_gradients():
    """Tied models project with the embedding; remat=True gives the same gradients as remat=False."""
    config = qlx.load_config(CONFIGS / "tiny-dense.yaml", overrides=["model.num_layers=1"]).model
    model = build_model(config, seed=0)
    np.testing.assert_array_equal(model.lm_head_weight(), model.embed[...].T)
    graphdef, state = nnx.split(model)

    def grads(remat):
        twin = nnx.merge(graphdef, state)
        twin.config = dataclasses.replace(config, remat=remat)
        twin_graphdef, twin_state = nnx.split(twin)
        loss = lambda s: jnp.mean(jax.nn.log_softmax(nnx.merge(twin_graphdef, s)(TOKENS))[..., 0])  # noqa: E731
        return jax.jit(jax.grad(loss))(twin_state)

    for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_attention_dispatch_errors_name_the_config_key():
    q = jnp.asarray(np.random.default_rng(5).normal(size=(1, 16, 2, 8)), jnp.float32)
    with pytest.raises(ValueError, match="model.attention='ring'.*no mesh"):
        attention(q, q, q, backend="ring")
    with pytest.raises(ValueError, match="model.attention.*'fast'"):
        attention(q, q, q, backend="fast")


def test_chunked_causal_attention_equals_dense_reference():
    r = np.random.default_rng(5)
    q = jnp.asarray(r.normal(size=(2, 300, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(2, 300, 2, 8)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.sort(r.integers(0, 3, (2, 300)), axis=1))
    assert len(chunk_bounds(300)) == 2
    got = jax.jit(lambda q, k, v, s: attention(q, k, v, segment_ids_bt=s))(q, k, v, segments)
    want = reference_attention(q, k, v, attention_mask(300, 300, segment_ids_bt=segments), 8**-0.5)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 8])
def test_length_split_cache_step_equals_the_global_write_and_attention_without_gathering_the_cache(chunk):
    """A cache split over seq=4 (and batch over data=2): each shard writes and attends over its own slots, merged by
    log-sum-exp; against the global scatter + attention on one device. Chunks straddle shard boundaries and end in
    padding (position -1); the compiled step gathers nothing the size of the cache."""
    from qlx.hlo import collective_bytes
    from qlx.mesh import make_mesh
    from qlx.models.cache import CACHE_AXES, length_axes, write_and_attend
    from qlx.models.sharding import Layout

    b, s, kv, h, d = 2, 64, 2, 4, 8
    keys = jax.random.split(jax.random.key(0), 5)
    cache = tuple(jax.random.normal(k, (b, s, kv, d), jnp.float32) for k in keys[:2])
    q = jax.random.normal(keys[2], (b, chunk, h, d), jnp.float32)
    k_new, v_new = (jax.random.normal(k, (b, chunk, kv, d), jnp.float32) for k in keys[3:])
    starts = np.array([[12], [30]]) if chunk > 1 else np.array([[15], [47]])
    positions = starts + np.arange(chunk)[None, :]
    positions[1, chunk - 2 :] = -1 if chunk > 1 else positions[1, chunk - 2 :]  # padding at row 1's end
    positions = jnp.asarray(positions, jnp.int32)
    expected_o, expected_kv = write_and_attend(cache, q, k_new, v_new, positions, backend="reference", layout=None)

    layout = Layout.create(make_mesh({"data": 2, "seq": 4}))
    assert length_axes(layout, cache[0].shape) == ("seq",)
    sharded = tuple(jax.device_put(x, layout.sharding(x.shape, CACHE_AXES)) for x in cache)
    step = jax.jit(lambda c, *a: write_and_attend(c, *a, backend="reference", layout=layout))
    o, written = step(sharded, q, k_new, v_new, positions)
    real = np.asarray(positions >= 0)
    np.testing.assert_allclose(np.asarray(o)[real], np.asarray(expected_o)[real], rtol=1e-5, atol=1e-5)
    for got, want in zip(written, expected_kv, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.spec == layout.sharding(got.shape, CACHE_AXES).spec
    moved = collective_bytes(step.lower(sharded, q, k_new, v_new, positions).compile().as_text())
    cache_bytes = b * s * kv * d * 4
    assert moved["all-gather"] < cache_bytes // 4, moved  # at most the chunk's own tokens, never the cache
    assert max(moved.values()) < cache_bytes // 4, moved
