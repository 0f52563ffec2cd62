"""model.attention = flash | ring against the dense reference backend on the tiny Qwen3-MoE (float32, 8 fake CPU
devices): logits and parameter gradients, with and without packed segment ids; flash on one device and on
data=2/fsdp=2/tensor=2 and fsdp=2/tensor=4 meshes, ring on seq=4 and data=2/seq=2/tensor=2 meshes, all against the
single-device reference; that flash on a mesh calls its kernel inside a shard_map on per-shard shapes; chunked
prefill over the KV cache (the blockwise kernel with query positions), and the error when ring has no seq axis.

Every backend runs the same parameters (the reference model's state merged into each backend's graph) on the same
two batches, whose reference results are computed once."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlx
from qlx.mesh import make_mesh
from qlx.models import Layout, Qwen3ForCausalLM, build_model
from qlx.models.attention import attention

CONFIG = qlx.load_config(Path(__file__).resolve().parents[1] / "configs/models/tiny-moe.yaml").model
SEQ = 64  # divisible by 2 x ring size (8), with half-shards of 8 tokens the kernels tile


def random_batch(seed: int, batch: int = 2):
    """Fresh tokens, next-token labels, and packed segment ids (2-4 segments per row, random boundaries)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (batch, SEQ + 1))
    starts = np.zeros((batch, SEQ), np.int32)
    for row in range(batch):
        starts[row, rng.choice(np.arange(1, SEQ), size=rng.integers(1, 4), replace=False)] = 1
    segments = np.cumsum(starts, axis=1) + 1
    return jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32), jnp.asarray(segments)


def graph_with(backend: str, mesh=None) -> nnx.GraphDef:
    """The model graph for ``model.attention=backend`` on ``mesh`` (abstract: no parameters are computed)."""
    config = dataclasses.replace(CONFIG, attention=backend)
    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0), layout=Layout.create(mesh)))
    return nnx.split(abstract)[0]


@functools.partial(jax.jit, static_argnums=0)
def logits_and_grads(graphdef, state, tokens, labels, segments):
    """(logits [B, T, V], d mean next-token NLL / d params)."""

    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens, segment_ids_bt=segments)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)
        return jnp.mean(nll), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return logits, grads


def assert_matches(got, want):
    logits, grads = got
    want_logits, want_grads = want
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-5, rtol=0)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        w = np.asarray(flat_want[path])
        err = np.max(np.abs(np.asarray(g) - w)) / np.max(np.abs(w))
        assert err < 1e-4, f"gradient {jax.tree_util.keystr(path)}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def state():
    return nnx.state(build_model(CONFIG, seed=0))


@pytest.fixture(scope="module")
def reference(state):
    """{packed: (batch, reference logits and gradients)} for one batch without and one with segment ids."""
    results = {}
    for packed in (False, True):
        tokens, labels, segments = random_batch(1)
        batch = (tokens, labels, segments if packed else None)
        results[packed] = batch, logits_and_grads(graph_with("reference"), state, *batch)
    return results


@pytest.mark.parametrize(
    ("sizes", "packed"),
    [(None, True), ({"data": 2, "tensor": 2, "fsdp": -1}, False), ({"fsdp": 2, "tensor": 4}, True)],
    ids=["one-device,segment-ids", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4(kv-repeated),segment-ids"],
)
def test_flash_backend_matches_reference(state, reference, sizes, packed):
    batch, want = reference[packed]
    flash = graph_with("flash", None if sizes is None else make_mesh(sizes))
    assert_matches(logits_and_grads(flash, state, *batch), want)


def test_flash_on_a_mesh_runs_the_kernel_per_shard():
    """The kernel (a custom_vjp call) sits inside a shard_map whose operands are per-device shards: batch over fsdp,
    4 query heads over tensor=4, the 2 kv heads repeated to 4 (never all inside the shard_map)."""
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    q = jax.random.normal(jax.random.key(0), (2, SEQ, 4, 16))
    k, v = jax.random.normal(jax.random.key(1), (2, 2, SEQ, 2, 16))
    _, _, segments = random_batch(3)

    def flash(q, k, v, segments):
        return attention(q, k, v, backend="flash", segment_ids_bt=segments, layout=Layout.create(mesh))

    top = jax.make_jaxpr(flash)(q, k, v, segments).jaxpr
    assert "custom_vjp_call" not in {eqn.primitive.name for eqn in top.eqns}
    (shard_map,) = [eqn for eqn in top.eqns if eqn.primitive.name == "shard_map"]
    inner = shard_map.params["jaxpr"]
    assert [tuple(x.aval.shape) for x in inner.invars] == [(1, SEQ, 1, 16)] * 3 + [(1, SEQ)]
    assert "custom_vjp_call" in {eqn.primitive.name for eqn in inner.eqns}


@pytest.mark.parametrize(
    ("sizes", "packed"),
    [({"seq": 4, "fsdp": -1}, True), ({"data": 2, "seq": 2, "tensor": 2}, False)],
    ids=["seq=4,fsdp=2,segment-ids", "data=2,seq=2,tensor=2"],
)
def test_ring_backend_on_mesh_matches_single_device_reference(state, reference, sizes, packed):
    batch, want = reference[packed]
    ring = graph_with("ring", make_mesh(sizes))
    assert_matches(logits_and_grads(ring, state, *batch), want)


def test_chunked_prefill_over_the_cache_with_ring(state, reference):
    """Prefill in chunks of 24 over a 72-slot cache with model.attention='ring' (the cache path stays in natural
    order and runs the blockwise kernel with query positions; T and S are padded to its tiles; the last chunk ends
    in 8 padding queries): the logits equal the reference forward."""
    (tokens, _, _), (want, _) = reference[False]
    ring = nnx.merge(graph_with("ring", make_mesh({"seq": 2, "fsdp": -1})), state)
    step = nnx.jit(lambda model, tokens, cache, pos: model(tokens, cache=cache, positions_bt=pos))
    cache, got = ring.init_cache(2, 72), []
    for start in range(0, SEQ, 24):
        pos = jnp.arange(start, start + 24)
        chunk = jnp.pad(tokens[:, start : start + 24], ((0, 0), (0, start + 24 - min(SEQ, start + 24))))
        logits, cache = step(ring, chunk, cache, jnp.broadcast_to(jnp.where(pos < SEQ, pos, -1), (2, 24)))
        got.append(logits[:, : SEQ - start])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1)), np.asarray(want), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache.lengths, [SEQ, SEQ])


def test_ring_without_a_seq_axis_is_a_clear_error(state):
    tokens, _, _ = random_batch(21)
    with pytest.raises(ValueError, match="model.attention='ring'.*no mesh"):
        nnx.merge(graph_with("ring"), state)(tokens)
    with pytest.raises(ValueError, match="model.attention='ring'.*seq=1"):
        nnx.merge(graph_with("ring", make_mesh({"fsdp": -1})), state)(tokens)
