"""Scanned layers (``model.scan_layers``): logits, load-balancing loss and gradients equal the unrolled model for
a dense stack and a non-uniform MoE one (scanned per run) under each kind of remat policy; remat policies keep what
their names say; layout conversion between unrolled and stacked state trees; greedy generation on stacked parameters.
Checkpoints restoring across layouts: tests/test_train_checkpoint.py."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

import qlx
from qlx.config import REMAT_POLICIES, ConfigError, ModelConfig
from qlx.models import build_model
from qlx.models.remat import remat_policy
from qlx.models.stacking import convert_layers, tree_is_scanned
from qlx.rollout import generate

CONFIGS = Path(__file__).resolve().parents[1] / "configs/models"
SMALL = dict(num_layers=2, vocab_size=64, hidden_size=32, head_dim=8, intermediate_size=32)
DENSE = dataclasses.replace(qlx.load_config(CONFIGS / "tiny-dense.yaml").model, **SMALL)
MOE = dataclasses.replace(qlx.load_config(CONFIGS / "tiny-moe.yaml").model, **SMALL, moe_intermediate_size=16)
MIXED = dataclasses.replace(MOE, num_layers=3, mlp_only_layers=(2,))  # two runs: MoE layers 0-1, dense layer 2
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)


def loss_and_grads(model):
    graphdef, state = nnx.split(model)

    def loss(s):
        logits, aux = nnx.merge(graphdef, s)(TOKENS, return_aux=True)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 1]) + 0.1 * aux["load_balancing_loss"], logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return value, logits, grads


@functools.cache
def built(config: ModelConfig):
    """The seed-0 model of ``config`` as (graphdef, state), built once per config (the state is never mutated)."""
    return nnx.split(build_model(config, seed=0))


def model(config: ModelConfig):
    """A fresh model (its own Variables) holding the cached seed-0 parameters of ``config``."""
    return nnx.merge(*built(config), copy=True)


@pytest.fixture(scope="module")
def unrolled():
    """{name: (config, loss, logits, grads)} of the unrolled float32 reference models (seed 0)."""
    out = {}
    for name, config in (("dense", DENSE), ("mixed", MIXED)):
        config = dataclasses.replace(config, scan_layers=False)
        out[name] = (config, *loss_and_grads(model(config)))
    return out


def test_scan_layers_config():
    assert DENSE.scanned and MOE.scanned and not MIXED.scanned  # auto: uniform stacks only
    assert dataclasses.replace(MIXED, scan_layers=True).scanned
    assert MIXED.layer_runs == ((0, 2), (2, 3))
    assert ModelConfig(decoder_sparse_step=2, num_layers=4).layer_runs == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert ModelConfig(remat=True).remat == "full" and ModelConfig(remat=False).remat == "none"
    with pytest.raises(ConfigError, match="model.remat: unknown policy 'save_all'"):
        qlx.load_config(CONFIGS / "tiny-dense.yaml", overrides=["model.remat=save_all"])
    with pytest.raises(ConfigError, match="model.scan_layers"):
        qlx.load_config(CONFIGS / "tiny-dense.yaml", overrides=["model.scan_layers=sometimes"])


# Each kind of remat policy once (none; full; the dots policy; a names policy; an offloading one); the MoE stack
# (a scanned run of two MoE layers, then a dense run) under `full`.
@pytest.mark.parametrize(
    ("name", "remat"),
    [("dense", p) for p in ("none", "minimal", "save_dot_except_mlp", "qkv_proj_offloaded")] + [("mixed", "full")],
)
def test_scanned_equals_unrolled(unrolled, name, remat):
    """Same seed -> same weights in either layout; loss, logits and every gradient equal the unrolled model's."""
    config, loss, logits, grads = unrolled[name]
    scanned = model(dataclasses.replace(config, scan_layers=True, remat=remat))
    assert scanned.config.scanned and tree_is_scanned(nnx.state(scanned))
    got_loss, got_logits, got_grads = loss_and_grads(scanned)
    np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5)
    assert float(got_loss) == pytest.approx(float(loss), abs=1e-6)
    got = dict(nnx.to_flat_state(convert_layers(got_grads, config, scanned=False)))
    want = dict(nnx.to_flat_state(grads))
    assert got.keys() == want.keys()
    for path, g in want.items():
        np.testing.assert_allclose(got[path].get_value(), g.get_value(), rtol=1e-5, atol=1e-6, err_msg=str(path))


def _saved(policy: str) -> list[str]:
    """What one decoder layer keeps for the backward pass under ``policy``: the names of its saved values."""
    graphdef, state = built(dataclasses.replace(DENSE, num_layers=1, scan_layers=False, remat=policy))
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
    flat_state = built(dataclasses.replace(config, scan_layers=False))[1]
    stacked = built(config)[1]
    converted = convert_layers(flat_state, config, scanned=True)
    _assert_same_state(converted, stacked)
    back = convert_layers(stacked, config, scanned=False)
    _assert_same_state(back, flat_state)
    pure = {"mu": stacked.to_pure_dict(), "count": 3}
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


def test_greedy_generation_on_stacked_parameters():
    """The KV-cache path (prefill + decode loop, experts split once per call) on stacked parameters: each greedy
    token and its log-prob are the argmax and log_softmax of the cache-free forward over prompt + generated tokens
    (the scan path, equal to the unrolled model by test_scanned_equals_unrolled)."""
    prompts = [[3, 5, 7, 11, 13], [2], [9, 8, 7, 6]]
    scanned = model(dataclasses.replace(MOE, scan_layers=True))
    result = generate(scanned, prompts, max_new_tokens=6, temperature=0.0)
    rows = [p + g for p, g in zip(prompts, result.sequences(), strict=True)]
    tokens = jnp.asarray([r + [0] * (11 - len(r)) for r in rows])  # right padding: causal, later positions only
    logp = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, t: m(t))(scanned, tokens), axis=-1))
    for i, prompt in enumerate(prompts):
        positions = np.arange(len(prompt) - 1, len(rows[i]) - 1)
        assert result.lengths[i] == 6
        np.testing.assert_array_equal(result.tokens[i], logp[i, positions].argmax(-1))
        np.testing.assert_allclose(result.logprobs[i], logp[i, positions].max(-1), atol=1e-5)
