"""Routing replay (R3): the replay rule of ``qlx.models.moe.route`` on a hand-checked case; a model replaying its
own routing computes exactly what it computes alone, and a changed routing changes only the later tokens, scanned
or unrolled, on one device and on meshes (per token shard, expert parallel); the static engine records the routing
that the teacher-forced forward computes, in one call or in waves, and the continuous engine records the same
(shared prefill, swaps); the config refuses it outside RL."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlx
from qlx.config import ConfigError, config_from_dict
from qlx.mesh import make_mesh
from qlx.models import build_model
from qlx.models.moe import route
from qlx.rollout import SamplingSpec, generate, generate_rows
from qlx.rollout import continuous as cb
from qlx.rollout.engine import concatenate_results

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = qlx.load_config(CONFIGS / "models/tiny-moe.yaml", ["model.vocab_size=96"]).model
MIXED = dataclasses.replace(TINY, num_layers=3, mlp_only_layers=(1,))  # MoE, dense, MoE: two MoE layers
TOKENS = jnp.asarray(np.random.default_rng(0).integers(3, 96, (8, 12)), jnp.int32)


@functools.partial(nnx.jit, static_argnames=("return_routing",))
def forward(model, routing=None, *, return_routing=False):
    """The final hidden states of TOKENS (one compiled program: eagerly, a mesh compiles op by op)."""
    return model.hidden_states(TOKENS, routing_replay=routing, return_routing=return_routing)


@pytest.mark.parametrize("normalize", [True, False])
def test_route_replays_the_given_experts_with_the_routers_weights(normalize):
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(5, 6)), jnp.float32)
    own_w, own_e, probs = route(logits, 2, normalize)
    same = route(logits, 2, normalize, own_e)
    np.testing.assert_array_equal(same[0], own_w)
    np.testing.assert_array_equal(same[1], own_e)
    replay = np.asarray([[5, 0], [1, 2], [-1, -1], [3, 4], [0, 5]], np.int32)
    w, e, _ = route(logits, 2, normalize, jnp.asarray(replay))
    p = np.asarray(probs)
    for t, ids in enumerate(replay):
        want_ids = np.asarray(own_e[t]) if ids[0] < 0 else ids
        want = p[t, want_ids] / (p[t, want_ids].sum() if normalize else 1.0)
        np.testing.assert_array_equal(e[t], want_ids)
        np.testing.assert_allclose(w[t], want, rtol=1e-6)

    def loss(x, replay):
        return jnp.sum(route(x, 2, normalize, replay)[0] * jnp.arange(2.0))

    np.testing.assert_array_equal(jax.grad(loss)(logits, own_e), jax.grad(loss)(logits, None))
    assert np.abs(jax.grad(loss)(logits, jnp.asarray(replay))).max() > 1e-3  # the router still learns


def _changed(routing, layer: int, token: int, num_experts: int):
    """``routing`` with token ``token`` of every row sent to other experts (id + 1 mod E) in MoE layer ``layer``."""
    out = np.array(routing)
    out[:, token, layer] = (out[:, token, layer] + 1) % num_experts
    return jnp.asarray(out)


@pytest.fixture(scope="module")
def reference():
    """One device, unrolled: (hidden, routing, hidden with token 5 rerouted in MoE layer 1, that routing)."""
    model = build_model(dataclasses.replace(MIXED, scan_layers=False), seed=2)
    hidden, routing = forward(model, return_routing=True)
    changed = _changed(routing, 1, 5, MIXED.num_experts)
    return hidden, routing, forward(model, changed), changed


@pytest.mark.parametrize("scanned", [False, True])
def test_replaying_the_own_routing_changes_nothing(reference, scanned):
    model = build_model(dataclasses.replace(MIXED, scan_layers=scanned), seed=2)
    assert model.config.scanned == scanned
    hidden, routing = forward(model, return_routing=True)
    assert routing.shape == (8, 12, 2, MIXED.num_experts_per_tok)
    np.testing.assert_array_equal(routing, reference[1])
    np.testing.assert_array_equal(forward(model, routing), hidden)
    replayed, recorded = forward(model, reference[3], return_routing=True)
    np.testing.assert_array_equal(recorded, reference[3])  # the record is what ran
    np.testing.assert_allclose(replayed, reference[2], rtol=1e-5, atol=1e-6)
    diff = np.abs(np.asarray(replayed) - np.asarray(hidden)).max(axis=(0, 2))
    assert (diff[:5] == 0).all() and diff[5] > 1e-3  # causal: tokens before the rerouted one are untouched
    with pytest.raises(ValueError, match="routing_replay: 1 MoE layers"):
        model.hidden_states(TOKENS, routing_replay=routing[:, :, :1])


@pytest.mark.parametrize(
    "mesh_shape", [{"fsdp": 4, "tensor": 2}, {"expert": 4, "fsdp": 2}], ids=["token-sharded", "expert-parallel"]
)
def test_replay_on_a_mesh_equals_one_device(reference, mesh_shape):
    model = build_model(MIXED, seed=2, mesh=make_mesh(mesh_shape))
    routing = forward(model, return_routing=True)[1]
    np.testing.assert_array_equal(routing, reference[1])
    np.testing.assert_allclose(forward(model, reference[3]), reference[2], atol=2e-5)


def test_generate_records_the_routing_of_the_teacher_forced_forward():
    """Sampled rollouts of prompts of different lengths: every recorded position holds the experts the full
    forward over prompt + response routes that token to; positions past the sequence hold -1 (the last token is
    recorded when the loop ran on after it). Waves of one sequence record the same."""
    model = build_model(TINY, seed=4)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 96, n).tolist() for n in (5, 13, 2, 9)]
    kwargs = dict(max_new_tokens=7, temperature=1.0, seed=5, return_routing=True)
    result = generate(model, prompts, **kwargs)
    record = result.routed_experts
    assert record.dtype == np.int16 and record.shape[2:] == (2, TINY.num_experts_per_tok)
    fed_last = 0
    for i, prompt in enumerate(prompts):
        sequence = prompt + result.tokens[i, : result.lengths[i]].tolist()
        _, routing = model.hidden_states(jnp.asarray([sequence]), return_routing=True)
        n = len(sequence)
        np.testing.assert_array_equal(record[i, : n - 1], routing[0, : n - 1])
        last = record[i, n - 1]
        assert (last == -1).all() or (last == routing[0, n - 1]).all()
        fed_last += int((last >= 0).all())
        assert (record[i, n:] == -1).all()
    assert 0 < fed_last < len(prompts) or len(set(result.lengths.tolist())) == 1
    waves = generate(model, prompts, max_sequences=2, **kwargs)
    width = min(record.shape[1], waves.routed_experts.shape[1])
    np.testing.assert_array_equal(waves.routed_experts[:, :width], record[:, :width])
    assert (waves.routed_experts[:, width:] == -1).all() and (record[:, width:] == -1).all()
    assert generate(model, prompts, max_new_tokens=2).routed_experts is None


def test_continuous_engine_records_the_static_engines_routing():
    """The continuous engine (a group of 3 sharing its prompt's prefill, and 6 of its pages held elsewhere: a group
    is swapped to the host and back) records, per sample, the routing the static engine records for the same
    sample: prompt positions from the shared prefill, then every fed token; its last token is never fed (-1)."""
    model = build_model(TINY, seed=4)
    prompts = [np.random.default_rng(7).integers(3, 96, n).tolist() for n in (30, 21)]
    specs = [[SamplingSpec(max_new_tokens=40, temperature=1.0, seed=2, stream=g) for g in range(3)]]
    specs.append([SamplingSpec(max_new_tokens=40, temperature=1.0, seed=2, stream=3)])
    static = generate_rows(model, [prompts[0]] * 3 + [prompts[1]], [s for g in specs for s in g], return_routing=True)
    config = cb.EngineConfig(max_slots=4, page_size=8, num_pages=32, burst=8, max_len=96, prefill_chunk=16)
    engine = cb.ContinuousEngine(model, dataclasses.replace(config, reserve_tokens=0), record_routing=True)
    engine.pool.admit("held elsewhere", 6 * config.page_size)
    handles = [engine.submit(p, g) for p, g in zip(prompts, specs, strict=True)]
    engine.run()
    assert engine.stats().swapped_out_groups > 0
    results = [h.result() for h in handles]
    assert [seq for r in results for seq in r.sequences()] == static.sequences()
    record = concatenate_results(results).routed_experts  # rows padded with -1 to the widest
    for i, prompt in enumerate([prompts[0]] * 3 + [prompts[1]]):
        n = len(prompt) + int(static.lengths[i])
        np.testing.assert_array_equal(record[i, : n - 1], static.routed_experts[i, : n - 1])
        assert (record[i, n - 1 :] == -1).all()


def test_config_refuses_routing_replay_outside_rl():
    for mode in ("sft", "memory"):
        with pytest.raises(ConfigError, match="rl.routing_replay: is for train.mode: rl"):
            config_from_dict({}, [f"train.mode={mode}", "rl.routing_replay=true"])
