"""The optimizer step: exact token-mean across micro-batches, the non-finite guard, and an RL step that moves the
policy toward rewarded outputs."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_train_toydata import make_toy_run

import qlx
from qlx.config import OptimizerConfig, config_from_dict
from qlx.mesh import make_mesh
from qlx.models import build_model
from qlx.train import rl as rl_module
from qlx.train.batches import micro_batches, pad_rows, put_micro_batches
from qlx.train.optim import make_optimizer
from qlx.train.preflight import preflight
from qlx.train.rl import RLJob, rl_loss_sum
from qlx.train.step import Policy, make_train_step, nonfinite_reason, sft_loss_sum

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


SGD = optax.sgd(1.0)  # updates linear in the gradient, so parameters compare as tightly as gradients do
ADAMW = make_optimizer(OptimizerConfig(learning_rate=1e-2, weight_decay=0.01, grad_clip=1.0))
RL_LOSS = rl_module.functools.partial(rl_loss_sum, clip_low=0.2, clip_high=0.2)


def _tiny(optimizer, seed=0):
    """(model, policy, params, rest, optimizer, opt_state) of a one-layer tiny MoE."""
    config = qlx.load_config(CONFIGS / "models/tiny-moe.yaml", ["model.vocab_size=96", "model.num_layers=1"]).model
    model = build_model(config, seed=seed)
    policy, params, rest = Policy.split(model)
    return model, policy, params, rest, optimizer, optimizer.init(params)


def _random_rows(rng, n, vocab=96):
    prompts = [rng.integers(3, vocab, rng.integers(4, 12)).tolist() for _ in range(n)]
    responses = [rng.integers(3, vocab, rng.integers(1, 9)).tolist() for _ in range(n)]
    rows = pad_rows(prompts, responses, pad_id=0)
    rows["advantages_b"] = rng.normal(size=n).astype(np.float32)
    rows["old_logp_br"] = rng.normal(-4.5, 0.1, rows["mask_br"].shape).astype(np.float32)
    return rows


def _step(rows, micro_batch_size, loss_sum, tiny, temperature=1.0):
    model, policy, params, rest, optimizer, opt_state = tiny
    micro = micro_batches(rows, micro_batch_size, pad_id=0, packing=False).arrays
    copy = jax.tree.map(jnp.copy, (params, opt_state))  # the step donates its inputs
    step = make_train_step(policy, optimizer, loss_sum, temperature=temperature, chunk=16)
    return step(*copy, rest, put_micro_batches(micro, model.layout), np.float32(rows["mask_br"].sum()))


def _reference_sft_loss(model, rows):
    """−Σ mask · log softmax(full logits)[target] / Σ mask, straight from the model's logits."""
    logits = nnx.jit(lambda m, tokens: m(tokens))(model, jnp.asarray(rows["tokens_bt"]))
    logq = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    total, count = 0.0, 0.0
    for i, start in enumerate(rows["start_b"]):
        for r in range(int(rows["mask_br"][i].sum())):
            total -= float(logq[i, start - 1 + r, rows["tokens_bt"][i, start + r]])
            count += 1
    return total / count


def test_micro_batches_equal_one_batch():
    """RL loss over 5 rows: one pass versus 3 micro-batches of 2 (the last padded with an empty row)."""
    tiny = _tiny(SGD)
    rows = _random_rows(np.random.default_rng(7), 5)
    one = _step(rows, 0, RL_LOSS, tiny, temperature=0.7)
    many = _step(rows, 2, RL_LOSS, tiny, temperature=0.7)
    assert float(one[2]["clipfrac_sum"]) > 0  # old log-probs far from the policy's: the clip is active
    np.testing.assert_allclose(float(many[2]["loss"]), float(one[2]["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(many[2]["grad_norm"]), float(one[2]["grad_norm"]), rtol=1e-5)
    for a, b, p in zip(jax.tree.leaves(many[0]), jax.tree.leaves(one[0]), jax.tree.leaves(tiny[2]), strict=True):
        np.testing.assert_allclose(np.asarray(a) - np.asarray(p), np.asarray(b) - np.asarray(p), rtol=2e-4, atol=1e-7)
        assert not np.array_equal(np.asarray(b), np.asarray(p))


def test_step_loss_is_the_token_mean_over_the_whole_step():
    tiny = _tiny(ADAMW)
    rows = _random_rows(np.random.default_rng(3), 4)
    _, _, out = _step(rows, 2, sft_loss_sum, tiny)
    reference = _reference_sft_loss(tiny[0], rows)
    np.testing.assert_allclose(float(out["loss"]), reference, rtol=1e-5)
    means = [_reference_sft_loss(tiny[0], {k: v[i : i + 2] for k, v in rows.items()}) for i in (0, 2)]
    assert abs(np.mean(means) - reference) > 1e-3  # a mean of micro-batch means would differ


def test_nonfinite_step_is_skipped():
    model, policy, params, rest, optimizer, opt_state = _tiny(ADAMW)
    scale = params["final_norm"]["scale"]
    scale.set_value(scale.get_value().at[3].set(jnp.nan))
    rows = _random_rows(np.random.default_rng(1), 4)
    new_params, new_opt, out = _step(rows, 2, sft_loss_sum, (model, policy, params, rest, optimizer, opt_state))
    assert nonfinite_reason(out) == "loss is nan; gradient norm is nan"
    for a, b in zip(jax.tree.leaves((new_params, new_opt)), jax.tree.leaves((params, opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rl_step_moves_policy_toward_rewarded_outputs(tmp_path, monkeypatch):
    """Reward 1 when the response starts with a chosen token: its probability must rise after one RL step; the
    step with expert parallelism on 8 devices computes the same."""
    data = make_toy_run(tmp_path, n=8, task_types=("reading",))
    config = config_from_dict(
        data,
        [
            "train.mode=rl",
            "train.batch_size=4",
            "rl.group_size=8",
            "rl.aepo=false",
            "train.optimizer.learning_rate=0.01",
            "rollout.temperature=1.0",
            "rollout.top_p=1.0",
            "data.max_output_tokens=4",
        ],
    )
    prepared = preflight(config)
    tokenizer = prepared.tokenizer
    model = build_model(config.model, seed=3)
    policy, params, rest = Policy.split(model)
    optimizer = make_optimizer(config.train.optimizer)
    opt_state = optimizer.init(params)
    job = RLJob(config, prepared.dataset, policy, rest, optimizer, model.layout, run_dir=tmp_path)
    job.begin(params)

    def first_token_probs(p):
        prompts = [job.dataset.prompt(i) for i in range(len(job.dataset))]
        rows = pad_rows(prompts, [[0]] * len(prompts), pad_id=tokenizer.pad_id)
        logits = policy.model(p, rest)(jnp.asarray(rows["tokens_bt"]))
        last = logits[jnp.arange(len(prompts)), rows["start_b"] - 1] / config.rollout.temperature
        return np.asarray(jax.nn.softmax(last, axis=-1))

    before = first_token_probs(params)
    texts = [tokenizer.decode([t]) for t in range(tokenizer.vocab_size)]
    mass = {c: sum(before[:, t].mean() for t in range(len(texts)) if texts[t][:1] == c) for c in {t[:1] for t in texts}}
    char = min((c for c in mass if c), key=lambda c: abs(mass[c] - 0.2))  # rewarded now and then
    rewarded = np.asarray([text[:1] == char for text in texts] + [False] * (before.shape[1] - len(texts)))
    seen = []

    def reward_first_character(dataset, index, response, rule):
        seen.append(response[:1] == char)
        return float(seen[-1])

    monkeypatch.setattr(rl_module, "score", reward_first_character)
    params, opt_state, metrics, skipped = job.step(1, params, opt_state)
    assert skipped is None and 0 < sum(seen) < len(seen)
    assert metrics["reward/mean"] == pytest.approx(np.mean(seen))
    assert not config.rl.dynamic_sampling  # every rollout trains: the two entropy metrics are the same mean
    assert metrics["entropy/all_rollouts"] == pytest.approx(metrics["entropy"]) and metrics["entropy"] > 0
    after = first_token_probs(params)
    assert (after[:, rewarded].sum(axis=1) > before[:, rewarded].sum(axis=1)).all()
    assert after[:, rewarded].sum(axis=1).mean() > 1.1 * before[:, rewarded].sum(axis=1).mean()

    # The same step with expert parallelism on 8 devices ({expert: 8}: rollout, log-probs and update all run the
    # MoE in moe_ep's shard_map, scanned layers): the same rollouts, rewards, entropy and gradient.
    ep_model = build_model(config.model, seed=3, mesh=make_mesh({"expert": 8, "fsdp": 1}))
    assert ep_model.config.scanned
    ep_policy, ep_params, ep_rest = Policy.split(ep_model)
    ep_job = RLJob(config, prepared.dataset, ep_policy, ep_rest, optimizer, ep_model.layout, run_dir=tmp_path)
    ep_job.begin(ep_params)
    _, _, ep_metrics, ep_skipped = ep_job.step(1, ep_params, optimizer.init(ep_params))
    assert ep_skipped is None
    for key in ("reward/mean", "response_length/mean", "update/tokens"):
        assert ep_metrics[key] == metrics[key], key
    for key in ("entropy", "loss", "grad_norm"):  # on-policy the loss is -mean(A) ~ 0: float noise is absolute
        assert ep_metrics[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key


def _first_rl_step(config, run_dir) -> dict:
    """The metrics of step 1 of an RL job of ``config`` from a fresh seed-3 model."""
    prepared = preflight(config)
    model = build_model(config.model, seed=3)
    policy, params, rest = Policy.split(model)
    optimizer = make_optimizer(config.train.optimizer)
    job = RLJob(config, prepared.dataset, policy, rest, optimizer, model.layout, run_dir=run_dir)
    job.begin(params)
    return job.step(1, params, optimizer.init(params))[2]


def test_rl_step_on_the_continuous_engine_equals_the_static_engine(tmp_path, monkeypatch):
    """``rollout.engine=continuous`` (two groups of 4 at a time in 8 slots, prompts prefilled once per group) gives
    the static engine's rollouts (the same random streams, T 1 / top-p 0.9), rewards and update."""
    data = make_toy_run(tmp_path, n=8, task_types=("reading",))
    overrides = ["train.mode=rl", "train.batch_size=4", "rl.group_size=4", "rl.aepo=false", "rollout.temperature=1.0"]
    overrides += ["rollout.top_p=0.9", "data.max_output_tokens=6", "rollout.slots=8", "rollout.burst=4"]
    seen = []

    def reward_parity(dataset, index, response, rule):
        seen.append(response)
        return float(sum(map(ord, response)) % 2)

    monkeypatch.setattr(rl_module, "score", reward_parity)
    out = {}
    for engine in ("static", "continuous"):
        seen.clear()
        metrics = _first_rl_step(config_from_dict(data, [*overrides, f"rollout.engine={engine}"]), tmp_path / engine)
        out[engine] = list(seen), metrics
    assert out["continuous"][0] == out["static"][0] and len(set(out["static"][0])) > 1
    assert 0 < out["static"][1]["reward/mean"] < 1
    for key in ("reward/mean", "response_length/mean", "update/tokens", "entropy", "loss", "grad_norm"):
        assert out["continuous"][1][key] == pytest.approx(out["static"][1][key], rel=1e-5, abs=1e-7), key


def test_rl_step_replays_the_rollouts_routing(tmp_path, monkeypatch):
    """``rl.routing_replay``: the rollout's recorded routing reaches the update. Replaying it (float32: the routing
    the update would compute anyway) gives the step without replay; a record with every expert id shifted by one
    gives the same rollouts but other log-probs, entropy and gradient."""
    data = make_toy_run(tmp_path, n=8, task_types=("reading",))
    overrides = ["train.mode=rl", "train.batch_size=4", "rl.group_size=4", "rl.aepo=false", "rollout.temperature=1.0"]
    overrides += ["data.max_output_tokens=6"]
    monkeypatch.setattr(rl_module, "score", lambda dataset, index, response, rule: float(len(response) % 2))
    generate = rl_module.generate
    shift = []

    def shifted_generate(*args, **kwargs):
        result = generate(*args, **kwargs)
        if shift and result.routed_experts is not None:
            e = result.routed_experts
            moved = np.where(e >= 0, (e + 1) % config.model.num_experts, e).astype(e.dtype)
            result = dataclasses.replace(result, routed_experts=moved)
        return result

    monkeypatch.setattr(rl_module, "generate", shifted_generate)
    out = {}
    for name, replay, shifted in (("plain", False, False), ("replay", True, False), ("shifted", True, True)):
        config = config_from_dict(data, [*overrides, f"rl.routing_replay={str(replay).lower()}"])
        shift[:] = [True] if shifted else []
        out[name] = _first_rl_step(config, tmp_path / name)
    for key in ("reward/mean", "response_length/mean", "update/tokens"):
        assert out["replay"][key] == out["plain"][key] == out["shifted"][key], key
    for key in ("entropy", "loss", "grad_norm"):
        assert out["replay"][key] == pytest.approx(out["plain"][key], rel=1e-6, abs=1e-9), key
    # the tiny random model's MoE output is small beside its residual stream: the changes are small but far
    # beyond float32 noise (entropy 1e-5 absolute, gradient norm 0.4% when written; replay itself matched bitwise)
    assert abs(out["shifted"]["entropy"] - out["plain"]["entropy"]) > 2e-6
    assert out["shifted"]["grad_norm"] != pytest.approx(out["plain"]["grad_norm"], rel=1e-3)


def test_difficulty_refilter_keeps_the_pass_rate_band(tmp_path, monkeypatch):
    """Pass rates 1, 1/2 and 0 by record; the band [0.25, 0.75] keeps the middle records only, and a restart
    reuses the saved selection instead of sampling again."""
    data = make_toy_run(tmp_path, n=9, task_types=("reading",))
    config = config_from_dict(
        data,
        ["train.mode=rl", "train.batch_size=3", "data.refilter_k=4", "data.min_pass_rate=0.25",
         "data.max_pass_rate=0.75", "data.max_output_tokens=2"],
    )  # fmt: skip
    prepared = preflight(config)
    model = build_model(config.model, seed=0)
    policy, params, rest = Policy.split(model)
    optimizer = make_optimizer(config.train.optimizer)
    calls = []

    def alternating(dataset, index, response, rule):  # record i: always right (i % 3 == 0), half the time, never
        calls.append(index)
        return float(index % 3 == 0 or (index % 3 == 1 and calls.count(index) % 2 == 0))

    monkeypatch.setattr(rl_module, "score", alternating)
    job = RLJob(config, prepared.dataset, policy, rest, optimizer, model.layout, run_dir=tmp_path)
    job.begin(params)
    assert [r.id for r in job.dataset.records] == [prepared.dataset.records[i].id for i in (1, 4, 7)]
    assert len(calls) == 9 * 4
    saved = json.loads((tmp_path / "refilter.json").read_text())
    assert saved["pass_rates"] == [1.0, 0.5, 0.0] * 3 and saved["kept"] == [1, 4, 7]
    again = RLJob(config, prepared.dataset, policy, rest, optimizer, model.layout, run_dir=tmp_path)
    again.begin(params)
    assert len(calls) == 9 * 4 and [r.id for r in again.dataset.records] == [r.id for r in job.dataset.records]


def test_rl_update_leaves_out_rows_that_count_for_nothing(tmp_path):
    """Rows with an all-zero mask (dynamic sampling, AEPO) are left out of the update: parameters, loss and gradient
    norm equal the same train step over every row, the zero rows included."""
    data = make_toy_run(tmp_path, n=4, task_types=("reading",))
    config = config_from_dict(data, ["train.mode=rl", "train.micro_batch_size=4", "train.packing=false"])
    prepared = preflight(config)
    model = build_model(config.model, seed=2)
    policy, params, rest = Policy.split(model)
    optimizer = make_optimizer(config.train.optimizer)
    opt_state = optimizer.init(params)
    job = RLJob(config, prepared.dataset, policy, rest, optimizer, model.layout, run_dir=tmp_path)
    rows = _random_rows(np.random.default_rng(5), 12, vocab=prepared.tokenizer.vocab_size)
    rows["mask_br"][[0, 3, 4, 5, 8, 11]] = 0
    micro = micro_batches(rows, 4, pad_id=0, packing=False).arrays
    assert micro["tokens_bt"].shape[:2] == (3, 4)  # the reference runs all 12 rows
    copy = jax.tree.map(jnp.copy, (params, opt_state))  # both steps donate their inputs
    ref_params, _, ref = job.train_step(
        *copy, rest, put_micro_batches(micro, model.layout), np.float32(rows["mask_br"].sum())
    )
    shapes, step = [], job.train_step
    job.train_step = lambda *args: shapes.append(args[3]["tokens_bt"].shape[:2]) or step(*args)
    new_params, _, out = job._update(rows, params, opt_state)
    assert shapes == [(2, 4)]  # the 6 rows with tokens to learn from
    np.testing.assert_allclose(out["loss"], float(ref["loss"]), rtol=1e-5)
    np.testing.assert_allclose(out["grad_norm"], float(ref["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
