"""qlx.rollout.continuous against the static engine (qlx.rollout.generate_rows): greedy and sampled tokens with
requests refilling freed slots, a group's prompt prefilled once, preemption by swap, cancellation and streaming,
compilations in steady state, and the scheduler's page budget against the page pool."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import qlx
from qlx.mesh import make_mesh
from qlx.models import build_model
from qlx.rollout import SamplingSpec, generate_rows
from qlx.rollout import continuous as cb
from qlx.rollout.engine import _prefill_chunk
from qlx.rollout.kv_pages import PagePool
from qlx.rollout.scheduler import GroupQueue, group_pages

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
# One shape set for every test (compilations are shared); 47 pages of 8 tokens, 4 slots, bursts of 8 steps.
CONFIG = cb.EngineConfig(
    max_slots=4, page_size=8, num_pages=48, burst=8, max_len=96, prefill_chunk=16, reserve_tokens=16
)
COMPILED = (cb._burst, cb._first_draw, cb._copy, _prefill_chunk)


@pytest.fixture(scope="module")
def model():
    config = qlx.load_config(CONFIGS / "tiny-dense.yaml").model
    return build_model(dataclasses.replace(config, initializer_range=0.2, max_position_embeddings=256), seed=1)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 512, n).tolist() for n in lengths]


def _greedy(caps, stops=()):
    return [
        SamplingSpec(max_new_tokens=m, temperature=0.0, stop_token_ids=stops if i % 3 == 1 else (), stream=i)
        for i, m in enumerate(caps)
    ]


def _check_idle(engine):
    engine.pool.check()
    stats = engine.stats()
    assert (stats.pages_used, stats.slots_busy, stats.queue_depth) == (0, 0, 0)


def test_greedy_equals_static_generate_with_refills_and_no_recompilation(model):
    """8 requests (prompts 1-40 tokens, caps 3-24, some with a stop id) through 4 slots, then a second wave submitted
    while the engine runs: every sequence equals the static engine's token for token, the second wave compiles
    nothing, and the reported occupancy is the live slot-steps over the burst capacity."""
    lengths, caps = (7, 1, 40, 19, 33, 3, 12, 26), (24, 9, 16, 3, 24, 20, 11, 24)
    prompts, specs = _prompts(lengths), _greedy(caps)
    static = generate_rows(model, prompts, specs)
    stop = int(static.tokens[1, 3])  # a token request 1 emits, so a stop id ends it early
    specs = _greedy(caps, stops=(stop,))
    static = generate_rows(model, prompts, specs)
    assert "stop" in static.finish_reasons

    engine = cb.ContinuousEngine(model, CONFIG)
    handles = [engine.submit(p, [s]) for p, s in zip(prompts, specs, strict=True)]
    engine.run()
    for i, h in enumerate(handles):
        got = h.result()
        assert got.sequences() == [static.sequences()[i]], i
        assert got.finish_reasons == (static.finish_reasons[i],)
        np.testing.assert_allclose(got.logprobs[0], static.logprobs[i, : got.tokens.shape[1]], atol=1e-5)
        np.testing.assert_allclose(got.policy_logprobs[0], static.policy_logprobs[i, : got.tokens.shape[1]], atol=1e-5)
    _check_idle(engine)
    stats = engine.stats()
    assert stats.generated_tokens == int(static.lengths.sum())
    assert stats.slot_occupancy == pytest.approx(
        (stats.generated_tokens - len(prompts)) / (stats.burst_steps * CONFIG.max_slots)
    )
    assert 0.5 < stats.slot_occupancy <= 1

    lengths2, caps2 = (30, 2, 14, 38, 9), (5, 24, 17, 8, 22)
    prompts2, specs2 = _prompts(lengths2, seed=1), _greedy(caps2)
    static2 = generate_rows(model, prompts2, specs2)
    compiled = [f._cache_size() for f in COMPILED[:3]] + [_prefill_chunk._cache_size()]  # static compiles its own
    handles2 = [engine.submit(p, [s]) for p, s in zip(prompts2[:2], specs2[:2], strict=True)]
    engine.step()
    handles2 += [engine.submit(p, [s]) for p, s in zip(prompts2[2:], specs2[2:], strict=True)]
    engine.run()
    assert [h.result().sequences()[0] for h in handles2] == static2.sequences()
    assert [f._cache_size() for f in COMPILED] == compiled
    _check_idle(engine)


def test_group_prefills_once_and_equals_separate_prefills(model):
    """A group of 4 samples (T 0.7, top-p 0.95, own streams) of a 21-token prompt (its last page partial: each
    sample copies it before writing) prefills 21 tokens, not 84, and its samples equal the same specs run as 4
    separate groups and the static engine's rows."""
    (prompt,) = _prompts((21,), seed=2)
    specs = [SamplingSpec(max_new_tokens=20, temperature=0.7, top_p=0.95, seed=5, stream=g) for g in range(4)]
    static = generate_rows(model, [prompt] * 4, specs)

    grouped = cb.ContinuousEngine(model, CONFIG)
    handle = grouped.submit(prompt, specs)
    grouped.run()
    separate = cb.ContinuousEngine(model, CONFIG)
    singles = [separate.submit(prompt, [s]) for s in specs]
    separate.run()

    assert grouped.stats().prefill_tokens == 21
    assert separate.stats().prefill_tokens == 4 * 21
    got = handle.result()
    assert got.sequences() == [h.result().sequences()[0] for h in singles] == static.sequences()
    assert len(set(map(tuple, got.sequences()))) > 1  # the streams differ
    np.testing.assert_allclose(got.logprobs, static.logprobs, atol=1e-5)
    np.testing.assert_allclose(got.log_nucleus_mass, static.log_nucleus_mass, atol=1e-5)
    _check_idle(grouped)


def test_preemption_swaps_to_host_and_outputs_are_unchanged(model):
    """With no reserve, 4 sequences of 40-46-token prompts growing by 50 tokens (43 pages) outrun the 41 pages left
    beside 6 held outside the engine: groups are swapped out and back (no token recomputed; the newest, a group of
    2 sharing its prompt's pages, goes first and comes back with the same sharing), and the outputs still equal the
    static engine's."""
    prompts = _prompts((46, 44, 40), seed=3)
    specs = [SamplingSpec(max_new_tokens=50, temperature=0.0, stream=i) for i in range(4)]
    specs[3] = SamplingSpec(max_new_tokens=50, temperature=0.7, top_p=0.95, seed=9, stream=3)
    static = generate_rows(model, [prompts[0], prompts[1], prompts[2], prompts[2]], specs)
    engine = cb.ContinuousEngine(model, dataclasses.replace(CONFIG, reserve_tokens=0))
    engine.pool.admit("held elsewhere", 6 * CONFIG.page_size)
    handles = [engine.submit(prompts[0], specs[:1]), engine.submit(prompts[1], specs[1:2])]
    handles.append(engine.submit(prompts[2], specs[2:]))  # admitted last (shortest): preempted first
    shared_swaps = 0
    while engine.step():
        engine.pool.check()
        swap = handles[2]._swap
        shared_swaps += swap is not None and swap.shared == 40 // CONFIG.page_size
    stats = engine.stats()
    assert stats.swapped_out_groups > 0 and stats.swapped_pages > 0 and shared_swaps > 0
    assert stats.recomputed_tokens == 0
    assert [seq for h in handles for seq in h.result().sequences()] == static.sequences()
    engine.pool.release("held elsewhere")
    _check_idle(engine)


def test_on_a_mesh_swaps_and_equals_one_device(model):
    """The swap scenario above with the model on a data 2 x fsdp 2 x tensor 2 mesh (KV pages split over the kv
    heads like the model's k/v projections): the same outputs as the static engine on one device (the same over two
    processes: tests/test_multihost.py)."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = build_model(model.config, seed=1, mesh=mesh)
    prompts = _prompts((46, 44, 40), seed=3)
    specs = [SamplingSpec(max_new_tokens=50, temperature=0.7, top_p=0.95, seed=9, stream=i) for i in range(4)]
    static = generate_rows(model, [prompts[0], prompts[1], prompts[2], prompts[2]], specs)
    engine = cb.ContinuousEngine(sharded, dataclasses.replace(CONFIG, reserve_tokens=0))
    assert engine._pages[0].sharding.spec[0] == "tensor"
    engine.pool.admit("held elsewhere", 6 * CONFIG.page_size)
    handles = [engine.submit(prompts[0], specs[:1]), engine.submit(prompts[1], specs[1:2])]
    handles.append(engine.submit(prompts[2], specs[2:]))
    engine.run()
    assert engine.stats().swapped_out_groups > 0
    results = [h.result() for h in handles]
    assert [seq for r in results for seq in r.sequences()] == static.sequences()
    logprobs = np.concatenate([r.logprobs for r in results])
    np.testing.assert_allclose(logprobs, static.logprobs[:, : logprobs.shape[1]], atol=1e-5)
    engine.pool.release("held elsewhere")
    _check_idle(engine)


def test_cancel_and_streaming(model):
    """Tokens streamed after each step add up to the result; cancelling a running group and a waiting one ends their
    samples with "cancelled" and frees their pages, and the others run on unchanged."""
    prompts = _prompts((30, 15, 4), seed=4)
    specs = [SamplingSpec(max_new_tokens=24, temperature=0.0, stream=i) for i in range(3)]
    static = generate_rows(model, prompts, specs)
    engine = cb.ContinuousEngine(model, CONFIG)
    running = engine.submit(prompts[0], [specs[0], specs[0]])  # longest expected first: slots 0, 1
    kept = engine.submit(prompts[1], [specs[1], specs[1]])  # slots 2, 3
    waiting = engine.submit(prompts[2], [specs[2]])  # no slot left: queued
    streamed = [[], []]
    engine.step()
    for acc, new in zip(streamed, kept.take_new(), strict=True):
        acc += new
    assert 0 < len(streamed[0]) < 24 and running.tokens[0] and not running.done
    assert engine.stats().queue_depth == 1
    engine.cancel(running)
    engine.cancel(waiting)
    assert running.finish_reasons == ["cancelled", "cancelled"] and waiting.finish_reasons == ["cancelled"]
    assert engine.stats().queue_depth == 0 and engine.stats().slots_busy == 2
    assert running.tokens[0] == static.sequences()[0][: len(running.tokens[0])]
    while engine.step():
        for acc, new in zip(streamed, kept.take_new(), strict=True):
            acc += new
    for acc, new in zip(streamed, kept.take_new(), strict=True):
        acc += new
    assert streamed == kept.tokens == [static.sequences()[1]] * 2
    _check_idle(engine)


def test_chunked_prefill_is_interleaved_with_bursts(model):
    """One prefill chunk per tick: a 40-token prompt (3 chunks) submitted while a group decodes is prefilled over 3
    ticks, the running group gaining a burst of tokens in each, and both end as the static engine's rows."""
    prompts = _prompts((5, 40), seed=5)
    specs = [SamplingSpec(max_new_tokens=40, temperature=0.0, stream=i) for i in range(2)]
    static = generate_rows(model, prompts, specs)
    engine = cb.ContinuousEngine(model, dataclasses.replace(CONFIG, prefill_chunks_per_tick=1))
    first = engine.submit(prompts[0], specs[:1])
    engine.step()
    late = engine.submit(prompts[1], specs[1:])
    for tick in range(3):
        before = len(first.tokens[0])
        engine.step()
        assert len(first.tokens[0]) == before + CONFIG.burst and bool(late.tokens[0]) == (tick == 2)
    assert engine.stats().prefill_tokens == 45
    engine.run()
    assert first.tokens + late.tokens == static.sequences()
    _check_idle(engine)


def test_update_weights_decodes_with_the_new_parameters(model):
    """After update_weights(other model of the same shapes), new requests equal the static engine on the other
    model, with no compilation."""
    other = build_model(model.config, seed=2)
    prompts = _prompts((11, 6), seed=6)
    specs = _greedy((12, 12))
    static = generate_rows(other, prompts, specs)
    engine = cb.ContinuousEngine(model, CONFIG)
    engine.submit(prompts[0], specs[:1])
    engine.run()
    compiled = [f._cache_size() for f in COMPILED]
    engine.update_weights(other)
    handles = [engine.submit(p, [s]) for p, s in zip(prompts, specs, strict=True)]
    engine.run()
    assert [h.result().sequences()[0] for h in handles] == static.sequences()
    assert [f._cache_size() for f in COMPILED] == compiled
    with pytest.raises(ValueError, match="architecture"):
        engine.update_weights(build_model(dataclasses.replace(model.config, num_layers=1), seed=0))


def test_policy_versions_tag_each_token_across_an_update(model):
    """Tokens carry the engine's policy version when drawn: a sample running across update_weights holds version 0,
    then 1 (``keep`` semantics, same weights here, so the tokens are the static engine's); the static engine tags
    every token with its caller's version; padding is 0 in both."""
    prompts, specs = _prompts((9, 5), seed=7), _greedy((40, 40))
    static = generate_rows(model, prompts, specs, policy_version=7)
    np.testing.assert_array_equal(static.policy_versions, np.where(static.mask, 7, 0))
    engine = cb.ContinuousEngine(model, CONFIG, policy_version=0)
    handles = [engine.submit(p, [s]) for p, s in zip(prompts, specs, strict=True)]
    while not any(h.tokens[0] for h in handles):
        engine.step()
    engine.update_weights(model)
    assert engine.policy_version == 1
    engine.run()
    results = [h.result() for h in handles]
    assert [r.sequences()[0] for r in results] == static.sequences()
    for r in results:
        versions = r.policy_versions[0, : r.lengths[0]]
        assert versions[0] == 0 and versions[-1] == 1 and np.all(np.diff(versions) >= 0)  # two spans, in order
        assert np.all(r.policy_versions[0, r.lengths[0] :] == 0)
    engine.update_weights(model, policy_version=5)
    assert engine.policy_version == 5


def test_scheduler_budget_and_order():
    """group_pages equals the pages a pool hands out for a prompt, its forks and each sample's reserve (copies of the
    partial page included); the queue serves swapped groups first, then the longest expected."""
    for prompt_len, news in [(21, (5, 16, 3)), (16, (8, 8)), (1, (30,)), (40, (2, 2, 2, 2))]:
        pool = PagePool(64, 8)
        pool.admit("p", prompt_len)
        for g, n in enumerate(news):
            pool.fork("p", g)
            pool.extend(g, min(16, n))
        pool.release("p")
        assert pool.used_pages == group_pages(prompt_len, news, page_size=8, reserve_tokens=16)
    queue = GroupQueue()
    for name, expected in [("a", 10), ("b", 30), ("c", 30), ("d", 20)]:
        queue.push(name, expected)
    queue.push_swapped("s")
    assert queue.remove("d") and not queue.remove("x")
    assert [queue.pop() for _ in range(len(queue))] == ["s", "b", "c", "a"]


def test_bad_input_names_the_key(model):
    engine = cb.ContinuousEngine(model, CONFIG)
    with pytest.raises(ValueError, match="EngineConfig.max_len"):
        engine.submit([1] * 90, [SamplingSpec(max_new_tokens=10)])
    with pytest.raises(ValueError, match="max_slots"):
        engine.submit([1], [SamplingSpec(max_new_tokens=1)] * 5)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        engine.submit([600], [SamplingSpec(max_new_tokens=1)])
    with pytest.raises(ValueError, match="max_stop_ids"):
        engine.submit([1], [SamplingSpec(max_new_tokens=1, stop_token_ids=(1, 2, 3, 4, 5))])
    with pytest.raises(ValueError, match="EngineConfig.max_slots must be a power of two"):
        cb.EngineConfig(max_slots=3)
    with pytest.raises(ValueError, match="EngineConfig.burst"):
        cb.EngineConfig(burst=0)
