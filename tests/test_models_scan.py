"""Scanned layers (``model.scan_layers``): logits, load-balancing loss and gradients equal the unrolled model for
dense and MoE stacks (uniform, and non-uniform scanned per run) under every remat policy; remat policies keep what
their names say; layout conversion between unrolled and stacked state trees; greedy generation is identical."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

import qlx
from qlx.config import REMAT_POLICIES, ConfigError, ModelConfig
from qlx.models import build_model
from qlx.models.remat import remat_policy
from qlx.models.stacking import convert_layers, match_layout, tree_is_scanned
from qlx.rollout import generate

CONFIGS = Path(__file__).resolve().parents[1] / "configs/models"
SMALL = dict(num_layers=3, vocab_size=64, hidden_size=32, head_dim=8, intermediate_size=32)
DENSE = dataclasses.replace(qlx.load_config(CONFIGS / "tiny-dense.yaml").model, **SMALL)
MOE = dataclasses.replace(qlx.load_config(CONFIGS / "tiny-moe.yaml").model, **SMALL, moe_intermediate_size=16)
MIXED = dataclasses.replace(MOE, mlp_only_layers=(1,))  # dense layer between two MoE layers: three runs
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)


def loss_and_grads(model):
    graphdef, state = nnx.split(model)

    def loss(s):
        logits, aux = nnx.merge(graphdef, s)(TOKENS, return_aux=True)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 1]) + 0.1 * aux["load_balancing_loss"], logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return value, logits, grads


@pytest.fixture(scope="module")
def unrolled():
    """{name: (config, loss, logits, grads)} of the unrolled float32 reference models (seed 0)."""
    out = {}
    for name, config in (("dense", DENSE), ("moe", MOE), ("mixed", MIXED)):
        config = dataclasses.replace(config, scan_layers=False)
        out[name] = (config, *loss_and_grads(build_model(config, seed=0)))
    return out


def test_scan_layers_config():
    assert DENSE.scanned and MOE.scanned and not MIXED.scanned  # auto: uniform stacks only
    assert dataclasses.replace(MIXED, scan_layers=True).scanned
    assert MIXED.layer_runs == ((0, 1), (1, 2), (2, 3))
    assert ModelConfig(decoder_sparse_step=2, num_layers=4).layer_runs == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert ModelConfig(remat=True).remat == "full" and ModelConfig(remat=False).remat == "none"
    with pytest.raises(ConfigError, match="model.remat: unknown policy 'save_all'"):
        qlx.load_config(CONFIGS / "tiny-dense.yaml", overrides=["model.remat=save_all"])
    with pytest.raises(ConfigError, match="model.scan_layers"):
        qlx.load_config(CONFIGS / "tiny-dense.yaml", overrides=["model.scan_layers=sometimes"])


@pytest.mark.parametrize(
    ("name", "remat"),
    [("dense", p) for p in ("none", "full", "minimal", "save_dot_except_mlp", "qkv_proj_offloaded")]
    + [("moe", "none"), ("moe", "full"), ("mixed", "minimal")],
)
def test_scanned_equals_unrolled(unrolled, name, remat):
    """Same seed -> same weights in either layout; loss, logits and every gradient equal the unrolled model's."""
    config, loss, logits, grads = unrolled[name]
    model = build_model(dataclasses.replace(config, scan_layers=True, remat=remat), seed=0)
    assert model.config.scanned and tree_is_scanned(nnx.state(model))
    got_loss, got_logits, got_grads = loss_and_grads(model)
    np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5)
    assert float(got_loss) == pytest.approx(float(loss), abs=1e-6)
    got = dict(nnx.to_flat_state(convert_layers(got_grads, config, scanned=False)))
    want = dict(nnx.to_flat_state(grads))
    assert got.keys() == want.keys()
    for path, g in want.items():
        np.testing.assert_allclose(got[path].get_value(), g.get_value(), rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_orbax_checkpoint_restores_into_the_other_layout(tmp_path):
    """The restore hook: ask orbax for the target in the saved layout (``match_layout(target, saved metadata)``),
    then convert what it read (``match_layout(restored, target)``); both directions."""
    config = dataclasses.replace(DENSE, mlp_only_layers=(), scan_layers=True)
    states = {scan: nnx.state(build_model(dataclasses.replace(config, scan_layers=scan), seed=0)) for scan in (0, 1)}
    with ocp.StandardCheckpointer() as checkpointer:
        for saved, wanted in ((0, 1), (1, 0)):
            path = tmp_path / f"saved-{saved}"
            checkpointer.save(path, states[saved])
            checkpointer.wait_until_finished()
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, states[wanted])
            metadata = checkpointer.metadata(path).item_metadata.tree
            restored = match_layout(checkpointer.restore(path, match_layout(target, metadata)), target)
            assert tree_is_scanned(restored) == bool(wanted)
            got = {p: v for p, v in nnx.to_flat_state(nnx.State(restored))}
            for p, v in nnx.to_flat_state(states[wanted]):
                np.testing.assert_array_equal(got[p].get_value(), v.get_value(), err_msg=str(p))


def _saved(policy: str) -> list[str]:
    """What one decoder layer keeps for the backward pass under ``policy``: the names of its saved values."""
    model = build_model(dataclasses.replace(DENSE, num_layers=1, scan_layers=False, remat=policy), seed=0)
    graphdef, state = nnx.split(model)
    saved = saved_residuals(lambda s: nnx.merge(graphdef, s)(TOKENS).sum(), state)
    return sorted({d.split("'")[1] for _, d in saved if "named" in d})


def test_remat_policies_keep_their_named_projections():
    assert _saved("full") == []
    assert _saved("save_qkv_proj") == ["key_proj", "query_proj", "value_proj"]
    assert _saved("save_dot_except_mlp") == ["key_proj", "out_proj", "query_proj", "value_proj"]
    assert _saved("save_out_proj") == ["out_proj"]
    for name in REMAT_POLICIES[1:]:
        remat_policy(name)  # every configurable name builds (offloading: this backend has pinned_host memory)


def test_convert_layers_round_trip_between_layouts():
    """Unrolled state -> stacked equals the scanned model's state (same seed); stacked -> unrolled is the inverse;
    optimizer-style trees (tuples of states, str keys as in orbax metadata) convert too."""
    config = dataclasses.replace(MIXED, scan_layers=True)
    flat_state = nnx.state(build_model(dataclasses.replace(config, scan_layers=False), seed=0))
    stacked = nnx.state(build_model(config, seed=0))
    converted = convert_layers(flat_state, config, scanned=True)
    _assert_same_state(converted, stacked)
    back = convert_layers(stacked, config, scanned=False)
    _assert_same_state(back, flat_state)
    pure = {"mu": nnx.state(build_model(config, seed=0)).to_pure_dict(), "count": 3}
    as_str = jax.tree.map(lambda x: x, {"opt": (pure, None)})
    as_str["opt"][0]["mu"]["stacks"] = {str(k): v for k, v in as_str["opt"][0]["mu"]["stacks"].items()}
    unstacked = convert_layers(as_str, config, scanned=False)
    assert sorted(unstacked["opt"][0]["mu"]["layers"]) == ["0", "1", "2"] and unstacked["opt"][0]["count"] == 3
    assert tree_is_scanned(unstacked) is False
    q = unstacked["opt"][0]["mu"]["layers"]["2"]["attn"]["q"]
    np.testing.assert_array_equal(q, back["layers"][2]["attn"]["q"].get_value())


def _assert_same_state(got, want):
    """Same parameter paths, values and logical axes."""
    got, want = (dict(nnx.to_flat_state(nnx.State(t))) for t in (got, want))
    assert got.keys() == want.keys()
    for path, var in want.items():
        assert got[path].get_metadata()["out_sharding"] == var.get_metadata()["out_sharding"], path
        np.testing.assert_array_equal(got[path].get_value(), var.get_value(), err_msg=str(path))


def test_greedy_generation_identical_scanned_and_unrolled():
    """The KV-cache path (prefill chunks + decode loop, experts split once per call) on stacked parameters."""
    prompts = [[3, 5, 7, 11, 13], [2], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    results = []
    for scan in (False, True):
        model = build_model(dataclasses.replace(MOE, scan_layers=scan), seed=0)
        results.append(generate(model, prompts, max_new_tokens=6, temperature=0.0, prefill_chunk=4))
    (a, b) = results
    assert [list(t) for t in a.tokens] == [list(t) for t in b.tokens]
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
