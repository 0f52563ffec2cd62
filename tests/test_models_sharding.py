"""Sharded forward on 8 fake CPU devices: (data=2, expert=2, tensor=2) and fsdp=8 meshes equal the single-device
forward, parameters are sharded as the logical-axis rules say, and build_model creates them sharded. tiny-moe's
layers are uniform, so the model is scanned: layer parameters are stacked [L, ...] on the unsharded axis "layers"."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import qlx
from qlx.mesh import make_mesh
from qlx.models import build_model, shard_model, state_shardings

CONFIG = qlx.load_config(Path(__file__).resolve().parents[1] / "configs/models/tiny-moe.yaml").model
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 12)), jnp.int32)
# tiny-moe: vocab 512, hidden 64, 4 heads / 2 kv heads of 16, 8 experts of width 32.
EXPECTED = {
    "data=2,expert=2,tensor=2": (
        {"data": 2, "expert": 2, "tensor": 2, "fsdp": 1},
        {
            ("stacks", 0, "mlp", "gate_up"): (P(None, "expert", "fsdp", None, "tensor"), (2, 4, 64, 2, 16)),
            ("stacks", 0, "attn", "q"): (P(None, "fsdp", "tensor", None), (2, 64, 2, 16)),
            ("stacks", 0, "attn", "k"): (P(None, "fsdp", "tensor", None), (2, 64, 1, 16)),
            ("embed",): (P("tensor", "fsdp"), (256, 64)),
            ("lm_head",): (P("fsdp", "tensor"), (64, 256)),
        },
    ),
    "fsdp=8": (
        {"fsdp": 8},
        {
            ("stacks", 0, "mlp", "gate_up"): (P(None, "expert", "fsdp", None, "tensor"), (2, 8, 8, 2, 32)),
            ("stacks", 0, "mlp", "down"): (P(None, "expert", "tensor", "fsdp"), (2, 8, 32, 8)),
            ("embed",): (P("tensor", "fsdp"), (512, 8)),
        },
    ),
}


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG, seed=0)


def loss_and_grads(model):
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = nnx.merge(graphdef, state)(TOKENS)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), TOKENS[:, 1:, None], axis=-1))

    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.parametrize("mesh_name", list(EXPECTED))
def test_sharded_forward_matches_single_device(model, mesh_name):
    sizes, expected = EXPECTED[mesh_name]
    mesh = make_mesh(sizes)
    sharded = shard_model(model, mesh)
    flat = dict(nnx.to_flat_state(nnx.state(sharded)))
    for path, (spec, shard_shape) in expected.items():
        array = flat[path].get_value()
        assert array.sharding.spec == spec, path
        assert array.addressable_shards[0].data.shape == shard_shape, path
    forward = nnx.jit(lambda m, t: m(t))
    logits = forward(sharded, TOKENS)
    if sizes.get("data", 1) > 1:
        assert logits.sharding.spec[0] == ("data", "expert")  # the batch rule: data, fsdp, expert
    np.testing.assert_allclose(logits, forward(model, TOKENS), atol=1e-5)


def test_sharded_gradients_match_single_device(model):
    loss, grads = loss_and_grads(model)
    sharded_loss, sharded_grads = loss_and_grads(shard_model(model, make_mesh({"data": 2, "expert": 2, "tensor": 2})))
    assert float(sharded_loss) == pytest.approx(float(loss), abs=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(sharded_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_build_model_creates_parameters_sharded(model):
    mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    sharded = build_model(CONFIG, seed=0, mesh=mesh)
    want = state_shardings(nnx.state(sharded), mesh)
    for (path, var), (_, sharding) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(want), strict=True):
        assert var.get_value().sharding == sharding.get_value(), path
    gate_up = sharded.stacks[0].mlp.gate_up[...]
    assert gate_up.addressable_shards[0].data.shape == (2, 4, 32, 2, 16)
    np.testing.assert_array_equal(gate_up, model.stacks[0].mlp.gate_up[...])
