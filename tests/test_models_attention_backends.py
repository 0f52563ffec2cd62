"""model.attention = flash | ring against the dense reference backend on the tiny Qwen3-MoE (float32, 8 fake CPU
devices): logits and parameter gradients, with and without packed segment ids; ring on seq=4 and data=2/seq=2/tensor=2
meshes against the single-device reference, ring's cache path (generation), and the error when ring has no seq axis.

Every backend runs the same parameters (the reference model's state merged into each backend's graph)."""

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


@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "segment-ids"])
def test_flash_backend_matches_reference(state, packed):
    tokens, labels, segments = random_batch(1 + packed)
    segments = segments if packed else None
    want = logits_and_grads(graph_with("reference"), state, tokens, labels, segments)
    assert_matches(logits_and_grads(graph_with("flash"), state, tokens, labels, segments), want)


@pytest.mark.parametrize(
    ("sizes", "packed"),
    [({"seq": 4, "fsdp": -1}, True), ({"data": 2, "seq": 2, "tensor": 2}, False)],
    ids=["seq=4,fsdp=2,segment-ids", "data=2,seq=2,tensor=2"],
)
def test_ring_backend_on_mesh_matches_single_device_reference(state, sizes, packed):
    tokens, labels, segments = random_batch(10 + len(sizes))
    segments = segments if packed else None
    want = logits_and_grads(graph_with("reference"), state, tokens, labels, segments)
    ring = graph_with("ring", make_mesh(sizes))
    assert_matches(logits_and_grads(ring, state, tokens, labels, segments), want)


def test_ring_generation_takes_the_dense_cache_path(state):
    """Prefill into a KV cache with model.attention='ring' stays in natural order: equal to the reference forward."""
    tokens, labels, _ = random_batch(20)
    want, _ = logits_and_grads(graph_with("reference"), state, tokens, labels, None)
    ring = nnx.merge(graph_with("ring", make_mesh({"seq": 2, "fsdp": -1})), state)
    got, _ = nnx.jit(lambda model, tokens: model(tokens, cache=model.init_cache(2, SEQ)))(ring, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_ring_without_a_seq_axis_is_a_clear_error(state):
    tokens, _, _ = random_batch(21)
    with pytest.raises(ValueError, match="model.attention='ring'.*no mesh"):
        nnx.merge(graph_with("ring"), state)(tokens)
    with pytest.raises(ValueError, match="model.attention='ring'.*seq=1"):
        nnx.merge(graph_with("ring", make_mesh({"fsdp": -1})), state)(tokens)
