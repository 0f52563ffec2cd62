"""Memory-agent RL (train.mode memory): the multi-conversation batch against hand-computed cases, group statistics
per trajectory, k micro-batches against one, one update on a toy, and a run that checkpoints and resumes exactly."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_toydata import make_toy_run

from qlx.config import ConfigError, RLConfig, config_from_dict
from qlx.memory import MemoryRollout
from qlx.memory.batch import conversations
from qlx.mesh import axis_rules, make_mesh
from qlx.models.sharding import Layout
from qlx.train import memory_rl
from qlx.train.batches import micro_batches, pad_row_count, pad_rows, put_micro_batches
from qlx.train.checkpoint import Checkpointer
from qlx.train.memory_rl import trajectory_values
from qlx.train.optim import make_optimizer
from qlx.train.preflight import preflight
from qlx.train.step import forward_logprobs
from qlx.train.trainer import _abstract_model, _initial_params, _make_job, train

MEMORY = {
    "template": {
        "update": "Q: {question}\nM: {memory}\nC: {chunk}\nU:",
        "final": "Q: {question} {instructions}\nM: {memory}\nA:",
    },
    "chat_mode": None,
    "chunk_tokens": 16,
    "memory_tokens": 8,
    "final_tokens": 8,
    "max_question_tokens": 64,
    "max_instruction_tokens": 64,
    "window_chunks": 2,
    "prefill_chunk": 256,
}


# -- the batch: pure functions --------------------------------------------------------------------------------------


def _hand_rollout():
    """Two trajectories of one question: row 0 reads 2 chunks, row 1 reads 1; T = K_max + 1 = 3 turns."""
    t, b, s, r = 3, 2, 4, 3
    prompt_ids = np.arange(t * b * s, dtype=np.int32).reshape(t, b, s) + 1
    prompt_lengths = np.array([[4, 3], [2, 0], [3, 4]], np.int32)
    response_ids = np.arange(t * b * r, dtype=np.int32).reshape(t, b, r) + 100
    response_lengths = np.array([[3, 1], [2, 0], [1, 3]], np.int32)
    valid = np.array([[True, True], [True, False], [True, True]])
    return MemoryRollout(
        prompt_ids=prompt_ids,
        prompt_lengths=prompt_lengths,
        response_ids=response_ids,
        response_lengths=response_lengths,
        logprobs=np.zeros((t, b, r), np.float32),
        valid=valid,
        trajectory=np.broadcast_to(np.arange(b, dtype=np.int32), (t, b)).copy(),
        final=np.broadcast_to(np.arange(t)[:, None] == t - 1, (t, b)).copy(),
        stopped=valid.copy(),
        memories=((None,) * b,) * t,
        answers=("a", "b"),
        question_index=np.zeros(b, np.int32),
        num_chunks=np.array([2, 1], np.int32),
        document_tokens=np.array([20, 9], np.int32),
    )


def test_conversations_and_broadcast_hand_case():
    rollout = _hand_rollout()
    conv = conversations(rollout)
    # MemAgent's order: turn 0 of rows 0, 1; turn 1 of row 0 (row 1 has read its document); the final turns
    assert conv.trajectory_c.tolist() == [0, 1, 0, 0, 1]
    assert conv.turn_c.tolist() == [0, 0, 1, 2, 2]
    assert conv.final_c.tolist() == [False, False, False, True, True]
    assert conv.prompts[2].tolist() == [9, 10]  # prompt_ids[1, 0, :2]
    assert conv.responses[1].tolist() == [103]  # response_ids[0, 1, :1]
    assert conv.responses[4].tolist() == [115, 116, 117]  # response_ids[2, 1, :3]
    (adv_c, reward_c, keep_c), keep_n = trajectory_values(
        RLConfig(advantage="group_mean"), rollout, conv, np.array([1.0, 0.0]), np.zeros(2, np.int32)
    )
    assert adv_c.tolist() == [0.5, -0.5, 0.5, 0.5, -0.5] and reward_c.tolist() == [1, 0, 1, 1, 0]
    assert keep_c.all() and keep_n.all()
    rows = pad_row_count(pad_rows(conv.prompts, conv.responses, pad_id=0), 7, 0)
    weight = rows["mask_br"] * np.pad(adv_c, (0, 2))[:, None]
    expected = np.zeros_like(weight)
    for c, (a, n) in enumerate([(0.5, 3), (-0.5, 1), (0.5, 2), (0.5, 1), (-0.5, 3)]):
        expected[c, :n] = a  # every valid response token of every turn carries its trajectory's advantage
    np.testing.assert_array_equal(weight, expected)
    assert rows["tokens_bt"].shape[0] == 7 and not rows["mask_br"][5:].any()  # padding rows: no token counts


def test_more_chunks_do_not_weigh_more_in_the_group_statistics():
    """Two questions of one task, G = 2: question 0's trajectories read 5 chunks, question 1's read 1. Task-level
    advantage over the 4 trajectories: rewards [1, 0 | 1, 1], group means 0.5 and 1, task std (unbiased) of
    [1, 0, 1, 1] = 0.5, so A = [1, −1, 0, 0] whatever the chunk counts."""
    base = _hand_rollout()

    def rollout_with(chunks):
        k = max(chunks)
        valid = np.concatenate([np.arange(k)[:, None] < np.array(chunks)[None], np.ones((1, 4), bool)])
        t = k + 1
        return dataclasses.replace(
            base,
            prompt_ids=np.ones((t, 4, 2), np.int32),
            prompt_lengths=np.full((t, 4), 2, np.int32),
            response_ids=np.ones((t, 4, 2), np.int32),
            response_lengths=np.full((t, 4), 2, np.int32),
            valid=valid,
            trajectory=np.broadcast_to(np.arange(4, dtype=np.int32), (t, 4)).copy(),
            final=np.broadcast_to(np.arange(t)[:, None] == k, (t, 4)).copy(),
            question_index=np.array([0, 0, 1, 1], np.int32),
            num_chunks=np.array(chunks, np.int32),
        )

    rewards, tasks = np.array([1.0, 0.0, 1.0, 1.0]), np.zeros(4, np.int32)
    for chunks in ([5, 5, 1, 1], [1, 1, 1, 1], [1, 5, 3, 2]):
        rollout = rollout_with(chunks)
        conv = conversations(rollout)
        (adv_c, _, _), _ = trajectory_values(RLConfig(advantage="task"), rollout, conv, rewards, tasks)
        np.testing.assert_allclose(adv_c, np.array([1.0, -1.0, 0.0, 0.0])[conv.trajectory_c], rtol=1e-5)
        assert len(conv) == sum(chunks) + 4


def test_dynamic_sampling_drops_every_turn_of_a_flat_group():
    rollout = _hand_rollout()
    rollout = dataclasses.replace(rollout, question_index=np.array([0, 0], np.int32))
    conv = conversations(rollout)
    (_, _, keep_c), keep_n = trajectory_values(
        RLConfig(dynamic_sampling=True), rollout, conv, np.array([1.0, 1.0]), np.zeros(2, np.int32)
    )
    assert not keep_n.any() and not keep_c.any()


def test_memory_config_errors_name_the_key(tmp_path):
    data = make_toy_run(tmp_path, n=2)
    data["train"]["mode"] = "memory"
    with pytest.raises(ConfigError, match=r"memory\.chunk_tokens: must be a positive integer"):
        config_from_dict({**data, "memory": {**MEMORY, "chunk_tokens": 0}})
    with pytest.raises(ConfigError, match=r"memory\.temperature: .*rollout\.temperature"):
        config_from_dict({**data, "memory": {**MEMORY, "temperature": 0.5}})
    with pytest.raises(ConfigError, match=r"memory\.chunk_size: unknown key"):
        config_from_dict({**data, "memory": {"chunk_size": 4}})
    config_from_dict({**data, "memory": MEMORY})  # the tests' settings are valid
    too_long = config_from_dict({**data, "memory": {**MEMORY, "chunk_tokens": 1024}})  # the model has 512 positions
    with pytest.raises(ConfigError, match=r"memory: a update turn needs up to \d+ positions .* chunk 1024"):
        preflight(too_long)


# -- the job on a tiny model ----------------------------------------------------------------------------------------


def _data(tmp_path, **train):
    data = make_toy_run(tmp_path, n=8, task_types=("dialogue", "numerical"))
    data["model"] = {
        **data["model"],
        "family": "qwen3",
        "hidden_size": 32,
        "num_heads": 2,
        "num_kv_heads": 1,
        "head_dim": 16,
        "intermediate_size": 64,
    }
    data["train"].update(mode="memory", batch_size=2, **train)
    data["rl"] = {"group_size": 2, "h_low": 5.5, "h_high": 5.75}
    data["rollout"] = {"temperature": 1.0}
    data["memory"] = MEMORY
    return data


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A memory-RL job on the toy data, its fresh parameters, and one rollout of 2 questions x 2 trajectories."""
    tmp = tmp_path_factory.mktemp("memrl")
    config = config_from_dict(_data(tmp, run_dir=str(tmp / "job")), ["rl.aepo=false"])
    job, params = _job(config)
    rollout = job._rollout(job.policy.model(params, job.rest), [0, 1], 2, seed=3)[0]
    return config, job, params, rollout


def _job(config):
    prepared = preflight(config)
    mesh, rules = make_mesh(config.mesh), axis_rules(config.mesh.rules)
    policy, abstract, rest = _abstract_model(config, mesh, rules)
    optimizer = make_optimizer(config.train.optimizer)
    layout = Layout.create(mesh, rules)
    job = _make_job(config, prepared.dataset, policy, rest, optimizer, layout, config.train.run_dir, None)
    job.begin(None)
    return job, _initial_params(config, mesh, rules, abstract)


def _batch(job, rollout, rewards_n):
    conv = conversations(rollout)
    task_n = np.zeros(len(rewards_n), np.int32)
    (adv_c, reward_c, keep_c), _ = trajectory_values(job.config.rl, rollout, conv, rewards_n, task_n)
    rows = pad_rows(conv.prompts, conv.responses, pad_id=job.tokenizer.pad_id)
    total = job.row_count(len(conv))
    rows = pad_row_count(rows, total, job.tokenizer.pad_id)
    pad = total - len(conv)
    return conv, rows, *(np.pad(x, (0, pad)) for x in (adv_c, reward_c, keep_c))


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _logp_c(job, params, rows, n):
    """Summed log-prob of each of the first n rows' responses under params: [n]."""
    batch = micro_batches(rows, 0, pad_id=job.tokenizer.pad_id, packing=False)
    logp, _ = forward_logprobs(
        params, job.rest, put_micro_batches(batch.arrays, job.layout), policy=job.policy, temperature=1.0, chunk=8192
    )
    return (batch.per_sample(logp) * rows["mask_br"]).sum(axis=1)[:n]


REWARDS = np.array([1.0, 0.0, 0.0, 1.0])


def test_k_micro_batches_equal_one(toy, tmp_path):
    config, job, params, rollout = toy
    micro_config = dataclasses.replace(config, train=dataclasses.replace(config.train, micro_batch_size=8))
    micro_job = _job(micro_config)[0]
    results = []
    for j in (job, micro_job):
        conv, rows, adv_b, reward_b, keep_b = _batch(j, rollout, REWARDS)
        optimizer = make_optimizer(config.train.optimizer)
        p = _copy(params)
        results.append(j.policy_update(rows, p, optimizer.init(p), adv_b, reward_b, keep_b))
    assert len(conversations(rollout)) > 8  # more than one micro-batch
    (one, _, out_one), (many, _, out_many) = results
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(out_many[key], out_one[key], rtol=1e-5)
    assert out_many["update/tokens"] == out_one["update/tokens"] > 0
    step = config.train.optimizer.learning_rate  # Adam's first step moves every parameter by about lr
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0.01 * step)


def test_one_step_raises_the_probability_of_rewarded_memories(toy):
    config, job, params, rollout = toy
    conv, rows, adv_b, reward_b, keep_b = _batch(job, rollout, REWARDS)
    before = _logp_c(job, params, rows, len(conv))
    optimizer = make_optimizer(config.train.optimizer)
    p = _copy(params)
    new, _, out = job.policy_update(rows, p, optimizer.init(p), adv_b, reward_b, keep_b)
    assert out["update/tokens"] == sum(len(r) for r in conv.responses)  # every turn trained, padding not
    change = _logp_c(job, new, rows, len(conv)) - before
    memory = ~conv.final_c
    rewarded = REWARDS[conv.trajectory_c] > 0
    assert change[memory & rewarded].mean() > 0 > change[memory & ~rewarded].mean()
    assert change[~memory & rewarded].mean() > 0 > change[~memory & ~rewarded].mean()


def _params(step_dir):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(step_dir / "params")


def _stand_in_score(dataset, index, response, *, rule):
    """A verifier that a random model's answers pass about half the time (deterministic in the text)."""
    return float(sum(map(ord, response)) % 2)


def test_memory_run_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_rl, "score", _stand_in_score)  # rewards with variance: the updates are not zero
    data = _data(tmp_path, steps=2, checkpoint_every=1, keep_checkpoints=3, run_dir=str(tmp_path / "a"))
    assert train(config_from_dict(data)).status == "done"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "2")
    result = train(config_from_dict(data, [f"train.run_dir={tmp_path / 'b'}"]))
    assert result.resumed_from == 1 and Checkpointer(tmp_path / "b" / "checkpoints", read_only=True).steps() == [1, 2]
    first, a, b = (_params(tmp_path / d / "checkpoints" / s) for d, s in (("a", "1"), ("a", "2"), ("b", "2")))
    leaves = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(first), strict=True))
    assert all(np.array_equal(x, y) for x, y, _ in leaves)
    assert any(not np.array_equal(x, z) for x, _, z in leaves)  # step 2 changed the parameters
    metrics = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    timing = ("tokens_per_s", "step_time_s", "rollout_time_s", "update_time_s")
    strip = [{k: v for k, v in m[-1].items() if k not in timing} for m in metrics]
    assert strip[0] == strip[1] and strip[0]["step"] == 2 and strip[0]["update/tokens"] > 0
