"""Expert parallelism (qlx.models.moe_ep) on 8 fake CPU devices: the model's forward and gradients on expert meshes
equal the single-device dropless model for the dense and ring transports, and on meshes without an expert axis
(routed per token shard); a capped receive buffer drops exactly the
assignments of an independent plain-loop reading of the drop rule and reports them; padding is never routed; routing
per token shard equals the plain router and needs no collective; the compiled program does not all-gather expert
weights and splits the FLOPs over the expert axis; the ragged transport compiles ahead of time for a TPU v5p
topology (skipped without libtpu)."""

import dataclasses
import importlib.util
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlx
from qlx.hlo import collective_bytes
from qlx.mesh import make_mesh
from qlx.models import build_model, shard_model
from qlx.models.moe import expert_outputs_reference, route
from qlx.models.moe_ep import ep_experts, ep_route, kept_counts, permute_rows, receive_capacity
from qlx.models.qwen3 import MoE
from qlx.models.sharding import Layout, state_shardings

ROOT = Path(__file__).resolve().parents[1]
# tiny-moe with one layer and 16 experts (2 per device at expert=8).
CONFIG = dataclasses.replace(qlx.load_config(ROOT / "configs/models/tiny-moe.yaml").model, num_experts=16, num_layers=1)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 16)), jnp.int32)
MESHES = {
    "expert=8": {"expert": 8, "fsdp": 1},
    "expert=4,fsdp=2": {"expert": 4, "fsdp": 2},
    "expert=2,data=2,tensor=2": {"expert": 2, "data": 2, "tensor": 2, "fsdp": 1},
    "expert=2,seq=2,fsdp=2": {"expert": 2, "seq": 2, "fsdp": 2},
}
TOKEN_MESHES = {"fsdp=8": {"fsdp": 8}, "fsdp=2,seq=2,tensor=2": {"fsdp": 2, "seq": 2, "tensor": 2}}
"""Meshes without expert parallelism: the MoE layer runs per token shard (qlx.models.moe_ep.token_sharded_experts)."""


def with_transport(transport: str, capacity_factor=None):
    """The test model (the same weights for every seed-0 build) with an expert-parallel transport."""
    config = dataclasses.replace(CONFIG, moe_ep_transport=transport, moe_capacity_factor=capacity_factor)
    return build_model(config, seed=0)


LAYER_X = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16, CONFIG.hidden_size)), jnp.float32)
LAYER_COT = jnp.asarray(np.random.default_rng(2).normal(size=LAYER_X.shape), jnp.float32)


LAYER_PROGRAMS = {}


def layer_program(transport: str, mesh_name: str | None = None):
    """One MoE layer (the test model's first), compiled once per (transport, mesh): (compiled, state, x), where the
    program returns y = MoE(x) and the gradients of sum(y * cot) for every weight and x, on MESHES[mesh_name]
    (None: one device, the dropless reference)."""
    if (transport, mesh_name) not in LAYER_PROGRAMS:
        config = dataclasses.replace(CONFIG, moe_ep_transport=transport)
        layer = MoE(config, rngs=nnx.Rngs(0))
        x = LAYER_X
        if mesh_name is not None:
            mesh = make_mesh({**MESHES, **TOKEN_MESHES}[mesh_name])
            layout = Layout.create(mesh)
            nnx.update(layer, jax.device_put(nnx.state(layer), state_shardings(nnx.state(layer), mesh)))
            x = jax.device_put(x, layout.sharding(x.shape, ("batch", "length", "embed")))
        else:
            layout = Layout()
        graphdef, state = nnx.split(layer)

        def loss(state, x):
            y, *_ = nnx.merge(graphdef, state)(x, layout=layout)
            return jnp.sum(y * LAYER_COT), y

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        LAYER_PROGRAMS[transport, mesh_name] = (step.lower(state, x).compile(), state, x)
    return LAYER_PROGRAMS[transport, mesh_name]


def layer_value_and_grads(transport: str, mesh_name: str | None = None):
    compiled, state, x = layer_program(transport, mesh_name)
    return compiled(state, x)


@pytest.fixture(scope="module")
def layer_reference():
    return layer_value_and_grads("xla")


@pytest.mark.parametrize("transport", ["dense", "ring"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_ep_layer_matches_single_device(layer_reference, transport, mesh_name):
    """A MoE layer's output and its gradients (x, router, experts) equal the single-device dropless layer's."""
    (_, y), (d_state, dx) = layer_value_and_grads(transport, mesh_name)
    (_, want_y), (want_state, want_dx) = layer_reference
    np.testing.assert_allclose(y, want_y, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, atol=1e-5)
    for (path, g), (_, w) in zip(nnx.to_flat_state(d_state), nnx.to_flat_state(want_state), strict=True):
        np.testing.assert_allclose(g.get_value(), w.get_value(), atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize("mesh_name", list(TOKEN_MESHES))
def test_token_sharded_layer_matches_single_device(layer_reference, mesh_name):
    """Without an expert axis, the MoE layer routed per token shard: output and gradients equal the single-device
    layer's, and each device sorts only its own n·k assignments (XLA's partitioner, transport "xla", sorts all N·k
    on every device: on v5p that held the whole batch's routed tokens, 16 GiB at stage 1, per device)."""
    (_, y), (d_state, dx) = layer_value_and_grads("auto", mesh_name)
    (_, want_y), (want_state, want_dx) = layer_reference
    np.testing.assert_allclose(y, want_y, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, atol=1e-5)
    for (path, g), (_, w) in zip(nnx.to_flat_state(d_state), nnx.to_flat_state(want_state), strict=True):
        np.testing.assert_allclose(g.get_value(), w.get_value(), atol=1e-5, err_msg=str(path))
    assignments = LAYER_X.shape[0] * LAYER_X.shape[1] * CONFIG.num_experts_per_tok
    shards = math.prod(size for axis, size in TOKEN_MESHES[mesh_name].items() if axis != "tensor")

    def sorted_sizes(transport):
        text = layer_program(transport, mesh_name)[0].as_text()
        return {int(n) for n in re.findall(r"= \(?s32\[(\d+)\][^=\n]*? sort\(", text)}

    assert sorted_sizes("auto") == {assignments // shards}
    assert assignments in sorted_sizes("xla")  # the check sees the replicated sort


def test_permute_rows_backward_is_the_inverse_gather():
    """A partial permutation's VJP equals jax's own gradient of the gather (which is a scatter-add)."""
    r = np.random.default_rng(3)
    x = jnp.asarray(r.normal(size=(6, 3)), jnp.float32)
    idx = jnp.asarray([4, 6, 0, 2, 9, 1, 6, 6], jnp.int32)  # 6 and 9: no partner (zero rows)
    inv = jnp.full((6,), 8, jnp.int32).at[jnp.asarray([4, 0, 2, 1])].set(jnp.asarray([0, 2, 3, 5]))
    cot = jnp.asarray(r.normal(size=(8, 3)), jnp.float32)
    got = jax.grad(lambda x: jnp.sum(permute_rows(x, idx, inv) * cot))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.take(x, idx, axis=0, mode="fill", fill_value=0) * cot))(x)
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(permute_rows(x, idx, inv), jnp.take(x, idx, axis=0, mode="fill", fill_value=0))


# The capacity test: one MoE layer's expert compute called directly, tokens split over (fsdp, expert).
N, K, E, D, I = 64, 2, 8, 8, 6
EP_SIZES = {"expert": 4, "fsdp": 2}
TOKEN_AXES = ("fsdp", "expert")


def capacity_problem():
    """Skewed routing (experts 0 and 1 overloaded) and 6 padding tokens."""
    r = np.random.default_rng(7)
    x = jnp.asarray(r.normal(size=(N, D)), jnp.float32)
    logits = r.normal(size=(N, E))
    logits[:, :2] += 2.0
    weights, experts_tk, _ = route(jnp.asarray(logits, jnp.float32), K, normalize=True)
    valid = np.ones(N, bool)
    valid[[3, 17, 18, 40, 41, 63]] = False
    w_gate_up = jnp.asarray(r.normal(size=(E, D, 2, I)) / np.sqrt(D), jnp.float32)
    w_down = jnp.asarray(r.normal(size=(E, I, D)) / np.sqrt(I), jnp.float32)
    return x, weights, experts_tk, jnp.asarray(valid), w_gate_up, w_down


EP_PROGRAMS = {}
COT = jnp.asarray(np.random.default_rng(2).normal(size=(N, D)), jnp.float32)


def ep_value_and_grads(transport: str, capacity_factor, valid=None):
    """((sum(y * COT), (y, drops)), gradients for x, w_gate_up, w_down) of ep_experts on the capacity problem
    (``valid`` replaces its padding mask), compiled once per (transport, capacity factor)."""
    x, weights, experts_tk, problem_valid, w_gate_up, w_down = capacity_problem()
    if (transport, capacity_factor) not in EP_PROGRAMS:
        mesh = make_mesh(EP_SIZES)

        def loss(x, w_gate_up, w_down, valid):
            y, drops = ep_experts(
                x,
                weights,
                experts_tk,
                valid,
                w_gate_up,
                w_down,
                mesh=mesh,
                rules=None,
                token_axes=TOKEN_AXES,
                transport=transport,
                capacity_factor=capacity_factor,
            )
            return jnp.sum(y * COT), (y, drops)

        EP_PROGRAMS[transport, capacity_factor] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    return EP_PROGRAMS[transport, capacity_factor](x, w_gate_up, w_down, problem_valid if valid is None else valid)


def plain_kept_mask(experts_tk, valid, capacity_factor):
    """The documented drop rule as a plain loop over devices, independent of the vectorised implementation.

    Tokens are split in 8 consecutive blocks, block f * 4 + r on device (fsdp f, expert r); device s owns experts
    2s, 2s+1. Receiver s walks its sources r = s, s+1, ... (mod 4); each source's rows for s in order of expert,
    then assignment index t * k + j; it keeps the first `capacity` rows."""
    ep, n = EP_SIZES["expert"], N // 8
    capacity = math.ceil(capacity_factor * n * K) if capacity_factor else ep * n * K
    kept = np.zeros((N, K), bool)
    experts_np = np.asarray(experts_tk)
    for f in range(EP_SIZES["fsdp"]):
        for s in range(ep):
            taken = 0
            for step in range(ep):
                r = (s + step) % ep
                rows = range((f * ep + r) * n, (f * ep + r + 1) * n)
                chunk = [(experts_np[t, j], t * K + j, t, j) for t in rows for j in range(K) if valid[t]]
                for _, _, t, j in sorted(c for c in chunk if c[0] // (E // ep) == s):
                    if taken < capacity:
                        kept[t, j] = True
                        taken += 1
    return kept


@pytest.mark.parametrize("capacity_factor", [None, 0.6])  # dropless; capped (drops)
def test_capacity_drops_exactly_the_rule(capacity_factor):
    """Dense and ring transports drop the assignments the plain rule drops, return the reference sum over the
    kept ones (padding contributes nothing), report (dropped, routed), and have the same gradients."""
    x, weights, experts_tk, valid, w_gate_up, w_down = capacity_problem()
    kept = plain_kept_mask(experts_tk, np.asarray(valid), capacity_factor)
    out_tkd = expert_outputs_reference(x, experts_tk, w_gate_up, w_down)
    want = jnp.einsum("tkd,tk->td", out_tkd, weights * jnp.asarray(kept))
    routed = int(np.asarray(valid).sum()) * K
    if capacity_factor == 0.6:
        assert routed - kept.sum() > 10  # the rule really drops here
    grads = {}
    for transport in ("dense", "ring"):
        (_, (y, drops)), grads[transport] = ep_value_and_grads(transport, capacity_factor)
        np.testing.assert_allclose(y, want, atol=1e-5, err_msg=transport)
        assert drops.tolist() == [routed - kept.sum(), routed], transport
    for g, w in zip(grads["ring"], grads["dense"], strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """``lax.ragged_all_to_all``'s documented semantics from all_gather and gathers (XLA:CPU cannot run the real one):
    device r sends operand[input_offsets[s] : + send_sizes[s]] to device s, written at output_offsets[s] there."""
    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # [EP, A, D]
    starts = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # per source r: where its chunk for me starts
    sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    dests = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    row = jnp.arange(output.shape[0])[:, None]
    inside = (row >= dests[None, :]) & (row < (dests + sizes)[None, :])  # [rows, EP], at most one source per row
    src = jnp.argmax(inside, axis=1)
    take = operands[src, jnp.clip(starts[src] + row[:, 0] - dests[src], 0, operand.shape[0] - 1)]
    return jnp.where(jnp.any(inside, axis=1)[:, None], take, output)


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_ragged_transport_offsets(monkeypatch, capacity_factor):
    """The ragged transport's offsets and sizes, run through an emulated ragged_all_to_all, give the plain rule's
    result and gradients equal to the dense transport's."""
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    x, weights, experts_tk, valid, w_gate_up, w_down = capacity_problem()
    kept = plain_kept_mask(experts_tk, np.asarray(valid), capacity_factor)
    want = jnp.einsum("tkd,tk->td", expert_outputs_reference(x, experts_tk, w_gate_up, w_down), weights * kept)
    (_, (y, _)), grads = ep_value_and_grads("ragged", capacity_factor)
    np.testing.assert_allclose(y, want, atol=1e-5)
    _, want_grads = ep_value_and_grads("dense", capacity_factor)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_ep_route_matches_route_without_collectives():
    """ep_route returns route's weights, experts and probabilities row for row (13 rows: padded to the 8 token
    shards, then sliced), and with 16 rows sharded over `expert` its compiled program has no collective at all."""
    mesh = make_mesh(MESHES["expert=8"])
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(16, 16)), jnp.float32)
    fn = jax.jit(lambda x: ep_route(x, 4, True, mesh=mesh, token_axes=("expert",)))
    for got, want in zip(fn(logits[:13]), route(logits[:13], 4, True), strict=True):
        np.testing.assert_array_equal(got, want)
    sharded = jax.device_put(logits, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert")))
    assert sum(collective_bytes(fn.lower(sharded).compile().as_text()).values()) == 0


def test_kept_counts_small_case():
    """Hand-computed: 3 devices, capacity 4. Receiver 0 takes sources 0, 1, 2: 2 + 3 -> keeps 2, then 2 of 3, then
    0 of 1; receiver 1 takes 1, 2, 0: 1 + 0 + 5 -> 1, 0, 3; receiver 2 takes 2, 0, 1: 2 + 0 + 1 -> all."""
    send = jnp.asarray([[2, 5, 0], [3, 1, 1], [1, 0, 2]])
    kept, offset = kept_counts(send, 4)
    assert kept.tolist() == [[2, 3, 0], [2, 1, 1], [0, 0, 2]]
    assert offset.tolist() == [[0, 1, 2], [2, 0, 2], [4, 1, 0]]
    assert receive_capacity(16, 4, None) == 64 and receive_capacity(16, 4, 1.25) == 20


def test_padding_is_never_routed():
    """Padding rows (valid False) get y = 0, are not counted as routed, and leave the other tokens unchanged."""
    valid = capacity_problem()[3]
    (_, (y, drops)), _ = ep_value_and_grads("dense", None)
    (_, (y_all, _)), _ = ep_value_and_grads("dense", None, valid=jnp.ones_like(valid))
    pad = ~np.asarray(valid)
    assert np.all(np.asarray(y)[pad] == 0)
    np.testing.assert_allclose(np.asarray(y)[~pad], np.asarray(y_all)[~pad], atol=1e-6)
    assert drops.tolist() == [0, int((~pad).sum()) * K]


def test_model_reports_dropped_fraction():
    """A small capacity factor drops assignments and the model's aux reports a fraction in (0, 1)."""
    sharded = shard_model(with_transport("dense", capacity_factor=0.5), make_mesh(MESHES["expert=8"]))
    _, aux = nnx.jit(lambda m, t: m(t, return_aux=True))(sharded, TOKENS)
    assert 0.0 < float(aux["moe_dropped_fraction"]) < 1.0


def test_collective_bytes_reads_hlo_text():
    """Hand-written HLO: all-gather result 16x8 f32, a two-array all-to-all, an async bf16 all-reduce (start only)."""
    hlo = """
      %ag = f32[16,8]{1,0} all-gather(f32[2,8]{1,0} %p), replica_groups={}
      %a2a = (f32[4,3]{1,0}, f32[4,3]{1,0}) all-to-all(f32[4,3] %x, f32[4,3] %y)
      %ars = (bf16[2,2], bf16[2,2]) all-reduce-start(bf16[2,2] %z)
      %ard = bf16[2,2] all-reduce-done(%ars)
      %ad = f32[10]{0} add(f32[10] %q, f32[10] %r)
    """
    got = collective_bytes(hlo)
    assert (got["all-gather"], got["all-to-all"], got["all-reduce"], got["reduce-scatter"]) == (512, 96, 8, 0)


def next_token_loss(model):
    logits, aux = model(TOKENS, return_aux=True)
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), TOKENS[:, 1:, None], axis=-1))
    return nll, aux


COMPILED = {}


def model_program(mesh_name: str | None):
    """(compiled loss + gradient of the dense-transport model on MESHES[mesh_name] (None: one device), its state)."""
    if mesh_name not in COMPILED:
        model = with_transport("dense")
        if mesh_name is not None:
            model = shard_model(model, make_mesh(MESHES[mesh_name]))
        graphdef, state = nnx.split(model)
        step = jax.jit(jax.value_and_grad(lambda state: next_token_loss(nnx.merge(graphdef, state)), has_aux=True))
        COMPILED[mesh_name] = (step.lower(state).compile(), state)
    return COMPILED[mesh_name]


def test_ep_model_matches_single_device():
    """The whole model at {expert: 8} (the batch rule splits attention and the dense layers over expert too):
    loss, aux and every parameter gradient equal the single-device model's."""
    (compiled, state), (want_compiled, want_state) = model_program("expert=8"), model_program(None)
    (value, aux), grads = compiled(state)
    (want_value, want_aux), want_grads = want_compiled(want_state)
    assert float(value) == pytest.approx(float(want_value), abs=1e-5)
    np.testing.assert_allclose(aux["load_balancing_loss"], want_aux["load_balancing_loss"], rtol=1e-5)
    assert float(aux["moe_dropped_fraction"]) == 0.0
    for (path, g), (_, w) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(want_grads), strict=True):
        np.testing.assert_allclose(g.get_value(), w.get_value(), atol=1e-5, err_msg=str(path))


def test_expert_axis_splits_the_flops():
    """Per-device FLOPs of forward + backward at {expert: 8} are at most 0.2x the single-device program's."""
    single = model_program(None)[0].cost_analysis()["flops"]
    per_device = model_program("expert=8")[0].cost_analysis()["flops"]
    assert per_device <= 0.2 * single, (per_device, single)


@pytest.mark.parametrize("mesh_name", ["expert=8", "expert=4,fsdp=2"])
def test_compiled_layer_keeps_experts_local(mesh_name):
    """A MoE layer's forward + backward all-gathers at most the router, 1/EP of the expert weights (each device's
    own experts, gathered over fsdp) and token-side arrays: the experts are never all-gathered over `expert`."""
    compiled, state, _ = layer_program("dense", mesh_name)
    experts = (state["gate_up"][...].size + state["down"][...].size) * 4
    router = state["router"][...].size * 4
    gathered = collective_bytes(compiled.as_text())["all-gather"]
    activations = LAYER_X.size * 4  # token-side gathers (counts, partial rows) stay below one copy of x
    assert gathered <= router + experts / MESHES[mesh_name]["expert"] + activations, (gathered, router, experts)
    assert gathered < experts / 2  # an all-gather of the experts over `expert` would alone exceed this


TPU_SCRIPT = textwrap.dedent(
    """
    import dataclasses, jax, jax.numpy as jnp
    from jax.experimental import topologies
    from flax import nnx
    import qlx
    from qlx.mesh import make_mesh
    from qlx.models.qwen3 import Qwen3ForCausalLM
    from qlx.models.sharding import Layout, state_shardings
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    config = dataclasses.replace(qlx.load_config("configs/models/tiny-moe.yaml").model, num_experts=16, num_layers=1,
                                 moe_ep_transport="ragged", moe_backend="ragged", moe_capacity_factor=2.0)
    layout = Layout.create(make_mesh({"expert": 8, "fsdp": 1}, devices=devices))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0), layout=layout)))
    shardings = state_shardings(state, layout.mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    tokens = jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=layout.sharding((8, 32), ("batch", "length")))
    loss = lambda state, tokens: jnp.mean(nnx.merge(graphdef, state)(tokens))
    lowered = jax.jit(jax.value_and_grad(loss)).lower(state, tokens)
    compiled = lowered.compile()
    print("RAGGED", lowered.as_text().count("ragged_all_to_all"), compiled.memory_analysis().temp_size_in_bytes)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_ragged_transport_compiles_for_tpu(tmp_path):
    """Forward + backward with ragged_all_to_all lower and compile for TPU v5p (2x2x2) ahead of time: two
    ragged all-to-alls per MoE layer each way (dispatch, return, and their transposes)."""
    env = dict(os.environ, TMPDIR=str(tmp_path), TPU_ACCELERATOR_TYPE="v5p-8", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", TPU_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("RAGGED"))
    moe_layers = sum(CONFIG.is_moe_layer(i) for i in range(CONFIG.num_layers))
    assert int(line.split()[1]) == 4 * moe_layers
