"""The train step's layout on a mesh: optimizer moments sharded like their parameters, and gradient accumulation
over micro-batches under remat (each against an independent reference: the parameters' own shardings, the
one-batch gradient)."""

from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import qlx
from qlx.mesh import axis_rules, make_mesh
from qlx.models import build_model
from qlx.train.batches import micro_batches, pad_rows, put_micro_batches
from qlx.train.optim import make_optimizer
from qlx.train.step import Policy, accumulate_gradients, make_train_step, sft_loss_sum
from qlx.train.trainer import _abstract_model, _initial_params, _opt_state_shardings

TINY = Path(__file__).resolve().parents[1] / "configs/models/tiny-moe.yaml"


def _rows(seed: int, n: int, vocab: int = 96) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, rng.integers(4, 10)).tolist() for _ in range(n)]
    responses = [rng.integers(3, vocab, rng.integers(2, 7)).tolist() for _ in range(n)]
    return pad_rows(prompts, responses, pad_id=0)


def _moments(opt_state):
    """The (mu, nu) states of the Adam inside the optax chain."""
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert len(adam) == 1
    return adam[0].mu, adam[0].nu


def test_adam_moments_sharded_like_parameters_on_fsdp_tensor_mesh():
    config = qlx.load_config(TINY, ["model.vocab_size=96", "model.num_layers=1", "mesh.fsdp=4", "mesh.tensor=2"])
    mesh, rules = make_mesh(config.mesh), axis_rules(config.mesh.rules)
    policy, abstract, rest = _abstract_model(config, mesh, rules)
    optimizer = make_optimizer(config.train.optimizer)
    shardings = _opt_state_shardings(optimizer, abstract, mesh)
    param_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    assert any(s.spec != PartitionSpec() for s in jax.tree.leaves(param_shardings))  # the mesh shards something
    for moment in _moments(shardings):
        assert jax.tree.structure(moment) == jax.tree.structure(param_shardings)
        for got, want in zip(jax.tree.leaves(moment), jax.tree.leaves(param_shardings), strict=True):
            assert got == want
    scalars = [s for s in jax.tree.leaves(shardings) if all(s is not m for m in jax.tree.leaves(_moments(shardings)))]
    assert scalars and all(s.spec == PartitionSpec() for s in scalars)  # the step count: replicated

    params = _initial_params(config, mesh, rules, abstract)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings)(params)
    layout = policy.model(params, rest).layout
    rows = _rows(0, 8)
    micro = put_micro_batches(micro_batches(rows, 4, pad_id=0, packing=False).arrays, layout)
    step = make_train_step(
        policy,
        optimizer,
        sft_loss_sum,
        temperature=1.0,
        chunk=16,
        shardings=(param_shardings, shardings, NamedSharding(mesh, PartitionSpec())),
    )
    new_params, new_state, metrics = step(params, opt_state, rest, micro, np.float32(rows["mask_br"].sum()))
    assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite_grad"])
    for moment in _moments(new_state):
        for got, want in zip(jax.tree.leaves(moment), jax.tree.leaves(new_params), strict=True):
            assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
            assert got.sharding.spec == want.sharding.spec
    assert float(optax.tree.norm(_moments(new_state)[0])) > 0  # the moments moved


def test_accumulated_gradient_under_remat_equals_one_batch():
    """remat "full" over scanned layers with 2 micro-batches (the 30B configs' shape of step) against the same rows
    in one batch."""
    overrides = ["model.vocab_size=96", "model.remat=full", "model.scan_layers=true"]
    model = build_model(qlx.load_config(TINY, overrides).model, seed=0)
    policy, params, rest = Policy.split(model)
    rows = _rows(1, 6)
    denominator = np.float32(rows["mask_br"].sum())

    @jax.jit
    def grads(params, micro):
        return accumulate_gradients(policy, params, rest, micro, denominator, sft_loss_sum, temperature=1.0, chunk=16)

    one = grads(params, put_micro_batches(micro_batches(rows, 0, pad_id=0, packing=False).arrays, model.layout))
    two = grads(params, put_micro_batches(micro_batches(rows, 3, pad_id=0, packing=False).arrays, model.layout))
    np.testing.assert_allclose(float(two[0]), float(one[0]), rtol=1e-5)
    np.testing.assert_allclose(float(two[2]["entropy_sum"]), float(one[2]["entropy_sum"]), rtol=1e-5)
    assert float(optax.tree.norm(one[1])) > 0
    for a, b in zip(jax.tree.leaves(two[1]), jax.tree.leaves(one[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("packing", [False, True])
def test_logprobs_split_over_the_mesh_equal_one_device(packing):
    """On an fsdp 4 x tensor 2 mesh the vocabulary projection runs on each device's N / 8 response tokens (the
    float32 ∂h buffer is [N / 8, D], never [N, D]: left to XLA the window gather came back replicated and every
    device projected all N tokens), no device holds a whole [V, D] float32 embedding gradient (XLA's scatter-add
    for ``jnp.take``'s gradient, all-reduced whole), and loss, entropy and gradients equal the one-device model's."""
    overrides = ["model.vocab_size=96", "model.num_layers=1", "mesh.fsdp=4", "mesh.tensor=2"]
    config = qlx.load_config(TINY, overrides)
    mesh_model = build_model(config.model, seed=0, mesh=make_mesh(config.mesh))
    one_model = build_model(config.model, seed=0)
    rows = _rows(2, 8)
    denominator = np.float32(rows["mask_br"].sum())
    results, texts = [], []
    for model in (one_model, mesh_model):
        policy, params, rest = Policy.split(model)
        micro = put_micro_batches(micro_batches(rows, 0, pad_id=0, packing=packing).arrays, model.layout)

        def grads(params, micro, policy=policy, rest=rest):
            return accumulate_gradients(
                policy, params, rest, micro, denominator, sft_loss_sum, temperature=0.7, chunk=16
            )

        compiled = jax.jit(grads).lower(params, micro).compile()
        results.append(compiled(params, micro))
        texts.append(compiled.as_text())
        n = micro["mask_br"].shape[1] * micro["mask_br"].shape[2]
    (want_loss, want_grads, want_aux), (loss, grads, aux) = results
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(float(aux["entropy_sum"]), float(want_aux["entropy_sum"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    d, v = config.model.hidden_size, config.model.vocab_size
    assert f"f32[{n},{d}]" in texts[0]  # the check sees the one-device ∂h
    assert f"f32[{n},{d}]" not in texts[1] and f"f32[{n // 8},{d}]" in texts[1]
    assert f"f32[{v},{d}]" in texts[0]  # the one-device embedding gradient
    assert f"f32[{v},{d}]" not in texts[1]  # no device holds the whole [V, D] float32 embedding gradient
