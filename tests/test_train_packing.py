"""Sequence packing (qlx.train.batches): the packed layout on a hand-computed case; packed and padded batches give
the same per-sample log-probs, entropies, losses and gradients (SFT and RL losses, with micro-batches) and the same
RL step; a packed sample never attends across its segment (reference and blockwise flash through the model, the
Pallas kernel in interpret mode); MoE layers route padding to no expert."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from test_train_toydata import make_toy_run

import qlx
from qlx import kernels
from qlx.config import config_from_dict
from qlx.hlo import collective_bytes
from qlx.mesh import axis_rules, make_mesh
from qlx.models import build_model
from qlx.models.rope import rope_cos_sin, rope_frequencies
from qlx.train import rl as rl_module
from qlx.train.batches import ROUTING, batch_shards, first_fit, micro_batches, pad_rows, put_micro_batches
from qlx.train.preflight import preflight
from qlx.train.rl import RLJob, rl_loss_sum
from qlx.train.step import Policy, _take_grouped, forward_logprobs, make_train_step, response_window, sft_loss_sum

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = qlx.load_config(CONFIGS / "models/tiny-moe.yaml", ["model.vocab_size=96"]).model


def test_packed_layout_hand_computed():
    """Lengths 5, 3, 6, 2, 1 into rows of 16: first-fit decreasing puts 6, 5, 3, 2 in row 0 and 1 in row 1; one
    slot per response token (6 of them: a length bucket, a multiple of the 2 rows; K = 3 per row)."""
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [17]]
    responses = [[11, 12], [13], [14, 15], [16], []]
    rows = pad_rows(prompts, responses, pad_id=0)
    rows["advantages_b"] = np.arange(5, dtype=np.float32) + 1
    rows["old_logp_br"] = -np.arange(40, dtype=np.float32).reshape(5, 8)
    assert first_fit(rows["length_b"].tolist(), 16) == [[2, 0, 1, 3], [4]]
    batch = micro_batches(rows, 0, pad_id=0, packing=True)
    a = batch.arrays
    assert a["tokens_bt"].shape == (1, 2, 16) and a["mask_br"].shape == (1, 6, 1)
    np.testing.assert_array_equal(a["tokens_bt"][0, 0], [6, 7, 8, 9, 14, 15, 1, 2, 3, 11, 12, 4, 5, 13, 10, 16])
    np.testing.assert_array_equal(a["tokens_bt"][0, 1], [17] + [0] * 15)
    np.testing.assert_array_equal(a["segment_ids_bt"][0, 0], [1] * 6 + [2] * 5 + [3] * 3 + [4] * 2)
    np.testing.assert_array_equal(a["segment_ids_bt"][0, 1], [1] + [0] * 15)
    np.testing.assert_array_equal(a["positions_bt"][0, 0], [*range(6), *range(5), *range(3), *range(2)])
    # slots 0-2 read from row 0, slots 3-5 from row 1 (start relative to it): targets at flat 4, 5, 9, 10, 13, 15
    np.testing.assert_array_equal(a["start_b"][0], [4, 5, 9, 10 - 16, 13 - 16, 15 - 16])
    np.testing.assert_array_equal(a["advantages_b"][0], [3, 3, 1, 1, 2, 4])
    np.testing.assert_array_equal(a["old_logp_br"][0, :, 0], [-16, -17, 0, -1, -8, -24])
    np.testing.assert_array_equal(batch.per_sample(a["mask_br"]), rows["mask_br"])
    np.testing.assert_array_equal(batch.per_sample(a["old_logp_br"]), rows["old_logp_br"] * rows["mask_br"])
    assert batch.padding_fraction == pytest.approx(1 - 17 / 32)
    padded = micro_batches(rows, 2, pad_id=0, packing=False)  # 5 rows -> 3 micro-batches of 2, one padding row
    assert padded.arrays["tokens_bt"].shape == (3, 2, 16) and padded.arrays["start_b"].shape == (3, 2)
    np.testing.assert_array_equal(padded.arrays["segment_ids_bt"][0, 0], [1] * 5 + [0] * 11)
    np.testing.assert_array_equal(
        padded.per_sample(padded.arrays["old_logp_br"]), rows["old_logp_br"] * rows["mask_br"]
    )
    assert padded.padding_fraction == pytest.approx(1 - 17 / 96)


def test_coarse_buckets_hold_the_same_samples_in_fewer_shapes():
    """``coarse`` (the RL update's layout): row length, rows per micro-batch and slots are powers of two, every
    sample's per-token values are the fine layout's, and 40 random subsets of rows (what dynamic sampling and AEPO
    leave) take fewer distinct shapes than with length buckets."""
    rng = np.random.default_rng(3)
    rows = _random_rows(rng, 64)
    shapes = {False: set(), True: set()}
    for _ in range(40):
        keep = np.sort(rng.choice(64, rng.integers(3, 64), replace=False))
        part = {name: array[keep] for name, array in rows.items()}
        for coarse in (False, True):
            batch = micro_batches(part, 8, pad_id=0, packing=True, coarse=coarse)
            shapes[coarse].add(tuple(a.shape for a in batch.arrays.values()))
            for name in ("mask_br", "old_logp_br"):
                np.testing.assert_array_equal(batch.per_sample(batch.arrays[name]), part[name] * (part["mask_br"] > 0))
            if coarse:
                _, b, t = batch.arrays["tokens_bt"].shape
                s = batch.arrays["mask_br"].shape[1]
                assert all(n & (n - 1) == 0 for n in (b, t, s)), (b, t, s)
    assert len(shapes[True]) < len(shapes[False]) / 2, (len(shapes[True]), len(shapes[False]))


def _tiny(seed=0):
    model = build_model(dataclasses.replace(TINY, num_layers=1), seed=seed)
    return (model, *Policy.split(model))


def _random_rows(rng, n):
    prompts = [rng.integers(3, 96, rng.integers(2, 30)).tolist() for _ in range(n)]
    responses = [rng.integers(3, 96, rng.integers(1, 9)).tolist() for _ in range(n)]
    rows = pad_rows(prompts, responses, pad_id=0)
    rows["mask_br"] *= rng.uniform(0.2, 1.0, rows["mask_br"].shape).astype(np.float32)  # e.g. sft_prompt_weight
    rows["advantages_b"] = rng.normal(size=n).astype(np.float32)
    rows["old_logp_br"] = rng.normal(-4.5, 0.1, rows["mask_br"].shape).astype(np.float32)
    return rows


def _run(rows, packing, micro_batch_size, loss_sum, tiny, batch_multiple=1):
    """(per-sample log-probs, entropies, step metrics, parameter change) of one SGD(1) step: the change is −grad."""
    model, policy, params, rest = tiny
    batch = micro_batches(rows, micro_batch_size, pad_id=0, packing=packing, batch_multiple=batch_multiple)
    arrays = put_micro_batches(batch.arrays, model.layout)
    logp, entropy = forward_logprobs(params, rest, arrays, policy=policy, temperature=0.7, chunk=16)
    optimizer = optax.sgd(1.0)
    step = make_train_step(policy, optimizer, loss_sum, temperature=0.7, chunk=16)
    copy = jax.tree.map(jnp.copy, params)
    new, _, out = step(copy, optimizer.init(copy), rest, arrays, np.float32(rows["mask_br"].sum()))
    delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new, params)
    return batch.per_sample(logp), batch.per_sample(entropy), out, delta, batch.padding_fraction


def _assert_same_step(packed, padded, mask):
    """Two ``_run`` results agree: per-sample log-probs and entropies (where ``mask``), loss and parameter change."""
    for got, want in zip(packed[:2], padded[:2], strict=True):
        np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(packed[2]["loss"]), float(padded[2]["loss"]), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(packed[3]), jax.tree.leaves(padded[3]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "loss_sum", [sft_loss_sum, rl_module.functools.partial(rl_loss_sum, clip_low=0.2, clip_high=0.2)], ids=["sft", "rl"]
)
def test_packed_batch_equals_padded(loss_sum):
    """12 samples: padded in one pass against packed in micro-batches of 2 rows (float32)."""
    tiny = _tiny()
    rows = _random_rows(np.random.default_rng(5), 12)
    padded = _run(rows, False, 0, loss_sum, tiny)
    packed = _run(rows, True, 2, loss_sum, tiny)
    assert packed[4] < padded[4] - 0.2  # packing removed much of the padding
    _assert_same_step(packed, padded, rows["mask_br"] > 0)
    for name in ("grad_norm", "entropy_sum"):
        np.testing.assert_allclose(float(packed[2][name]), float(padded[2][name]), rtol=1e-5)
    assert any(np.abs(g).max() > 1e-3 for g in jax.tree.leaves(padded[3]))


def _random_routing(rng, rows, moe_layers, num_experts, top_k):
    """Distinct random expert ids [N, T, M, k] per token (a routing the router would rarely choose), -1 past each
    sample and on a few whole tokens (those route by their own top-k)."""
    n, t = rows["tokens_bt"].shape
    ids = np.argsort(rng.uniform(size=(n, t, moe_layers, num_experts)), axis=-1)[..., :top_k].astype(np.int16)
    ids[rng.uniform(size=(n, t)) < 0.2] = -1
    ids[np.arange(t)[None, :] >= rows["length_b"][:, None]] = -1
    return ids


def test_replayed_routing_is_laid_out_with_its_tokens():
    """Routing replay (``routing_btmk``): packed (samples at offsets within rows, micro-batches of 2) and padded
    batches replay the same routing per token, so log-probs, entropies, loss and gradients agree; and the replay
    reaches the model (the log-probs differ from those without it)."""
    tiny = _tiny()
    config = tiny[0].config
    rng = np.random.default_rng(6)
    rows = _random_rows(rng, 12)
    plain = _run(rows, False, 0, sft_loss_sum, tiny)
    rows[ROUTING] = _random_routing(rng, rows, 1, config.num_experts, config.num_experts_per_tok)
    padded = _run(rows, False, 0, sft_loss_sum, tiny)
    packed = _run(rows, True, 2, sft_loss_sum, tiny)
    mask = rows["mask_br"] > 0
    _assert_same_step(packed, padded, mask)
    assert np.abs(padded[0] - plain[0])[mask].max() > 1e-2


def _packed_row(rng, lengths):
    tokens = rng.integers(3, 96, sum(lengths))
    segments = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    positions = np.concatenate([np.arange(n) for n in lengths])
    return tokens, segments, positions


def test_packed_on_a_mesh_equals_padded_and_gathers_within_each_batch_shard():
    """On an fsdp-4 mesh (4 batch shards) a packed batch whose slots are grouped by shard gives the one-device
    padded batch's log-probs, entropies, loss and gradient (float32); and the compiled gather of response hidden
    states from rows sharded over the batch, and its gradient, hold no collective but the sums' scalars: no hidden
    state leaves its device (a gather over the rows read as one flat sequence all-gathers them, and its backward
    all-reduces [b·T, D])."""
    config = qlx.load_config(
        CONFIGS / "models/tiny-moe.yaml", ["model.vocab_size=96", "model.num_layers=1", "mesh.fsdp=4", "mesh.tensor=2"]
    )
    mesh, rules = make_mesh(config.mesh), axis_rules(config.mesh.rules)
    meshed = build_model(config.model, seed=0, mesh=mesh, rules=rules)
    assert batch_shards(meshed.layout) == 4
    tiny = _tiny()
    rows = _random_rows(np.random.default_rng(7), 12)
    padded = _run(rows, False, 0, sft_loss_sum, tiny)
    packed = _run(rows, True, 4, sft_loss_sum, (meshed, *Policy.split(meshed)), batch_multiple=4)
    _assert_same_step(packed, padded, rows["mask_br"] > 0)

    b, t, d, s = 8, 32, 16, 64
    sharded = NamedSharding(mesh, PartitionSpec("fsdp"))
    hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32, sharding=sharded)
    starts = jax.ShapeDtypeStruct((s,), jnp.int32, sharding=sharded)
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sharded)

    def gathered(hidden_btd, tokens_bt, start_s):
        pred_sr, targets_sr = response_window(tokens_bt, start_s, 1, 4)
        return jnp.sum(_take_grouped(hidden_btd.reshape(4, -1, d), pred_sr) ** 2) + jnp.sum(targets_sr)

    for fn in (gathered, jax.grad(gathered)):
        text = jax.jit(fn).lower(hidden, tokens, starts).compile().as_text()
        assert sum(collective_bytes(text).values()) <= 16, collective_bytes(text)  # the sums' scalars alone


@pytest.mark.parametrize("backend", ["reference", "flash"])
def test_packed_sample_sees_only_its_segment(backend):
    """Each segment's logits equal the sample's logits alone (RoPE restarts), and perturbing one segment's tokens
    leaves every other segment's logits unchanged."""
    model = build_model(dataclasses.replace(TINY, attention=backend), seed=1)
    forward = nnx.jit(lambda m, t, s, p: m(t, segment_ids_bt=s, positions_bt=p))
    rng = np.random.default_rng(2)
    lengths = [20, 25, 19]
    tokens, segments, positions = _packed_row(rng, lengths)
    packed = np.asarray(forward(model, tokens[None], segments[None], positions[None]))[0]
    edges = np.cumsum([0, *lengths])
    for s, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        alone = np.zeros(64, np.int64)
        alone[: hi - lo] = tokens[lo:hi]
        logits = np.asarray(forward(model, alone[None], (np.arange(64) < hi - lo)[None] * 1, np.arange(64)[None]))
        np.testing.assert_allclose(packed[lo:hi], logits[0, : hi - lo], rtol=1e-5, atol=1e-5)
        perturbed = tokens.copy()
        perturbed[lo:hi] = rng.integers(3, 96, hi - lo)
        again = np.asarray(forward(model, perturbed[None], segments[None], positions[None]))[0]
        others = segments != s + 1
        np.testing.assert_allclose(again[others], packed[others], rtol=1e-6, atol=1e-6)
        assert np.abs(again[~others] - packed[~others]).max() > 1e-3


def test_pallas_kernel_keeps_segments_apart():
    """The Pallas (GPU, interpret mode) kernel: perturbing q, k, v of one segment changes only that segment."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 64, 2, 16)), jnp.float32) for _ in range(3))
    segments = jnp.asarray(np.repeat([1, 2, 3], [20, 25, 19])[None], jnp.int32)

    def attend(q, k, v):
        return kernels.flash_attention(
            q, k, v, causal=True, segment_ids=segments, block_sizes=kernels.BlockSizes(16, 16),
            backend="pallas_gpu", interpret=True,
        )  # fmt: skip

    base = np.asarray(attend(q, k, v))
    inside = np.asarray(segments[0] == 2)
    noise = jnp.asarray(rng.normal(size=(1, 64, 2, 16)) * inside[None, :, None, None], jnp.float32)
    moved = np.asarray(attend(q + noise, k + noise, v + noise))
    np.testing.assert_allclose(moved[:, ~inside], base[:, ~inside], rtol=1e-6, atol=1e-6)
    assert np.abs(moved[:, inside] - base[:, inside]).max() > 1e-2


def test_moe_routes_padding_nowhere():
    """Segment id 0 (padding) reaches no expert: its MoE output is zero (the layer's output is that of a layer with
    zeroed experts) and it is not counted among the routed assignments nor in the load-balancing statistics."""
    model = build_model(TINY, seed=4)
    layer = model.layer_modules()[0]
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 16, TINY.hidden_size)), jnp.float32)
    segments = jnp.asarray([[1] * 10 + [0] * 6, [1] * 5 + [2] * 9 + [0] * 2], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    inv_freq, scale = rope_frequencies(TINY.head_dim, TINY.rope_theta, TINY.rope_scaling)
    cos, sin = rope_cos_sin(positions, inv_freq, scale)
    out, _, stats, _ = layer(x, cos, sin, layout=model.layout, segment_ids_bt=segments, positions_bt=positions)
    assert float(stats[2][1]) == (10 + 14) * TINY.num_experts_per_tok
    assert float(jnp.sum(stats[0])) == (10 + 14) * TINY.num_experts_per_tok
    np.testing.assert_allclose(float(jnp.sum(stats[1])), 10 + 14, rtol=1e-5)  # each real token's probabilities sum to 1
    layer.mlp.gate_up.set_value(jnp.zeros_like(layer.mlp.gate_up[...]))
    layer.mlp.down.set_value(jnp.zeros_like(layer.mlp.down[...]))
    no_experts, *_ = layer(x, cos, sin, layout=model.layout, segment_ids_bt=segments, positions_bt=positions)
    padding = np.asarray(segments == 0)
    np.testing.assert_array_equal(np.asarray(out)[padding], np.asarray(no_experts)[padding])
    assert np.abs(np.asarray(out)[~padding] - np.asarray(no_experts)[~padding]).min() > 0


def test_rl_step_packed_equals_padded(tmp_path, monkeypatch):
    """One RL step (AEPO with negatives off, dynamic sampling) packed and padded from the same parameters: the same
    rollouts, entropies, AEPO keep mask, token-mean denominator, loss and parameters."""
    data = make_toy_run(tmp_path, n=8, task_types=("reading",))
    settings = [
        *("train.mode=rl", "train.batch_size=4", "rl.group_size=4", "rl.aepo=true", "rl.h_low=0.01", "rl.h_high=0.02"),
        *("rl.dynamic_sampling=true", "data.max_output_tokens=4", "rollout.temperature=1.0"),
    ]
    monkeypatch.setattr(rl_module, "score", lambda dataset, index, response, rule: float(len(response) % 2))
    results = {}
    for packing in (False, True):
        config = config_from_dict(data, [*settings, f"train.packing={str(packing).lower()}"])
        prepared = preflight(config)
        full = prepared.dataset.prompt  # prompts of 8 to 44 tokens (their chat-template tail): rows can take several
        monkeypatch.setattr(prepared.dataset, "prompt", lambda i, full=full: full(i)[-(8 + 12 * (i % 4)) :])
        model = build_model(config.model, seed=3)
        policy, params, rest = Policy.split(model)
        optimizer = optax.sgd(1.0)  # updates linear in the gradient: parameters compare as tightly as gradients
        job = RLJob(config, prepared.dataset, policy, rest, optimizer, model.layout, run_dir=tmp_path / str(packing))
        job.begin(params)
        before = jax.tree.map(np.asarray, params)
        params, _, metrics, skipped = job.step(1, params, optimizer.init(params))
        assert skipped is None
        results[packing] = (metrics, jax.tree.map(lambda a, b: np.asarray(a) - b, params, before))
    (padded, p_padded), (packed, p_packed) = results[False], results[True]
    assert packed["aepo/negatives_on"] == 0 and 0 < packed["aepo/kept_fraction"] < 1  # the keep mask drops rows
    assert packed["padding_fraction"] < padded["padding_fraction"]
    for name in ("reward/mean", "aepo/kept_fraction", "dynamic_sampling/kept_fraction", "update/tokens"):
        assert packed[name] == padded[name], name
    for name in ("entropy", "entropy/all_rollouts", "loss", "grad_norm"):
        assert packed[name] == pytest.approx(padded[name], rel=1e-5), name
    for got, want in zip(jax.tree.leaves(p_packed), jax.tree.leaves(p_padded), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert any(np.abs(g).max() > 1e-3 for g in jax.tree.leaves(p_padded))
