"""Continuous batching over a paged KV cache: groups prefilled once, a fixed set of decode slots run in K-step bursts,
the host admitting, allocating and evicting between bursts.

API (what a server or the RL loop drives; one engine per model; ``submit``, ``cancel``, ``step`` and ``stats`` hold
one lock, so a server may submit and cancel from its request threads while one thread steps: they wait for the
running tick, at most one prefill plus one burst):

    engine = ContinuousEngine(model, EngineConfig(max_slots=8, page_size=16, num_pages=512, burst=16, ...))
    handle = engine.submit(prompt_ids, [SamplingSpec(...), ...])   # one group: G samples of one prompt -> Handle
    engine.step()            # one tick: admit (prefill), allocate, one burst, collect; False when nothing is left
    handle.take_new()        # per sample, the tokens generated since the last call (stream them after each step)
    handle.done, handle.finish_reasons, handle.result()          # GenerateResult of the group, as the static engine's
    engine.cancel(handle)    # unfinished samples end with finish_reason "cancelled"; pages and slots are freed
    engine.update_weights(model)  # new parameters (same shapes) from the next tick; in-flight KV is kept
    engine.run()             # step() until every submitted group is done
    engine.stats()           # EngineStats: queue depth, slots busy, pages used, tokens/s, occupancy, ...
    generate_continuous(model, prompts, specs, config)           # generate_rows' contract, on this engine
    generate_groups(model, prompts, group_specs, config)         # the same with G samples per prompt (RL)

A tick:
1. Admit (``qlx.rollout.scheduler``): swapped-out groups first, then waiting groups longest expected first, whole
   groups only, while free slots and the token budget (a reserve per sequence) allow. A new group's prompt gets
   pages once (``PagePool.admit``) and is prefilled once, in chunks, by the static engine's ``prefill_step`` over a
   :class:`~qlx.models.cache.PagedKVCache` (up to ``prefill_rows`` prompts per call; at most
   ``prefill_chunks_per_tick`` calls per tick, a longer prefill resuming next tick between bursts, while no other
   group is admitted); its G samples fork the prompt's pages and draw their first tokens from the prompt's one
   logits vector (random stream of each sample: its own ``SamplingSpec`` seed and stream, token j keyed by
   ``fold_in(key, j)`` as in the static engine).
2. Allocate: each live slot gets room for min(K, its remaining tokens) more tokens (``PagePool.extend``; the
   copy-on-write copies of a shared partial page run on the device first). When pages run out, the most recently
   admitted running group is **swapped** to host memory (its pages copied out, released, and copied back into fresh
   pages when it is readmitted, first in the queue): nothing is recomputed, and tokens continue exactly
   (``stats().recomputed_tokens`` stays 0; ``swapped_out_groups`` / ``swapped_pages`` count the swaps).
3. Burst: one jitted ``lax.while_loop`` of up to K = ``burst`` steps over all ``max_slots`` slots (empty slots run at
   position -1: no write, no read); each step feeds every live slot's last token at its position, attends through
   ``paged_attention`` (only the pages that hold tokens), and draws the next token with the static engine's
   ``draw_tokens``. It stops after K steps, when no slot is live, or, while groups wait, as soon as one slot
   finishes (so the host can refill it). Shapes depend on the config only: the burst compiles once, prefill once
   per span (a power of two up to ``max_len``), so there is no compilation in steady state.
4. Collect: tokens and log-probs of the burst go to the host; finished samples release their pages and slots.

Results carry the static engine's contract (``GenerateResult``): tokens, sampling log-probs, policy log-probs
(``log_softmax(z / T)`` over the whole vocabulary), log nucleus masses, finish reasons (stop | length | cancelled),
and per token the policy version that drew it (``policy_version``, advanced by ``update_weights``).
A model on a mesh runs with the KV pages split over the kv heads like the model's k/v projections (``kv_heads``),
everything else replicated. With several processes (``jax.distributed``) every process runs the same scheduler: its
inputs are host values every process holds alike, and what it reads back (tokens, a swap's pages) is read whole by
every process (``qlx.distributed.to_host``), so all of them take the same decisions. Tokens reach the host
synchronously after each burst.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlx.distributed import to_host
from qlx.kernels import copy_pages
from qlx.models.cache import PagedKVCache
from qlx.models.sharding import Layout
from qlx.rollout.buckets import batch_bucket, round_up
from qlx.rollout.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerateResult,
    SamplingSpec,
    _check_prompts,
    _expert_weights,
    _prefill_chunk,
    concatenate_results,
    draw_tokens,
    routing_dtype,
    stream_keys,
)
from qlx.rollout.kv_pages import OutOfPages, PagePool, pages_for
from qlx.rollout.scheduler import GroupQueue, group_pages, outstanding_pages

FINISH_CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Shapes and budgets of a :class:`ContinuousEngine` (every compiled shape follows from these).

    max_slots: decode slots (sequences decoded together); a power of two.
    page_size: token slots per KV page (16-64 suit the GPU kernel, >= 128 the TPU one).
    num_pages: KV pages on the device, the dummy page 0 included; with page_size it is the KV memory.
    burst: K, the most decode steps one compiled burst runs before the host admits and allocates again.
    max_len: longest prompt + max_new_tokens of one sequence (the page-table width is ceil(max_len / page_size)).
    prefill_chunk: prompt positions per prefill call.
    prefill_rows: prompts prefilled together per call (a group's prompt is one row).
    prefill_chunks_per_tick: most prefill calls (``prefill_chunk`` positions of ``prefill_rows`` prompts each) per
        tick, so a long prompt's prefill is interleaved with the running slots' bursts; 0: no limit.
    reserve_tokens: room each running sequence keeps for its next tokens when groups are admitted
        (``qlx.rollout.scheduler``); 0 admits as soon as the prompt fits.
    max_stop_ids: most stop token ids per sample (the width of the stop table).
    """

    max_slots: int = 8
    page_size: int = 16
    num_pages: int = 512
    burst: int = 16
    max_len: int = 1024
    prefill_chunk: int = 64
    prefill_rows: int = 1
    prefill_chunks_per_tick: int = 0
    reserve_tokens: int = 64
    max_stop_ids: int = 4

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            least = {"reserve_tokens": 0, "prefill_chunks_per_tick": 0, "num_pages": 2}.get(field.name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"EngineConfig.{field.name} must be an int >= {least}, got {value!r}")
        if self.max_slots & (self.max_slots - 1):
            raise ValueError(f"EngineConfig.max_slots must be a power of two, got {self.max_slots}")

    @property
    def table_width(self) -> int:
        """Page-table columns per sequence."""
        return pages_for(self.max_len, self.page_size)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What the engine has done so far (counters since construction) and holds now.

    queue_depth: groups waiting (swapped-out ones included); slots_busy / max_slots: live decode slots now;
    pages_used / pages_total: KV pages held now / that can be handed out; generated_tokens: tokens drawn (first
    tokens included); prefill_tokens: prompt tokens run through the model (a group's prompt counts once);
    recomputed_tokens: tokens run through the model again after a preemption (0: preemption swaps);
    swapped_out_groups, swapped_pages: preemptions and the pages they copied to host; bursts, burst_steps: compiled
    bursts run and their decode steps; slot_occupancy: live slot-steps / (burst_steps x max_slots);
    occupancy_while_queued: the same over the bursts that began with groups waiting (0 if none); busy_seconds:
    wall time inside ``step``; tokens_per_second: generated_tokens / busy_seconds.
    """

    queue_depth: int
    slots_busy: int
    max_slots: int
    pages_used: int
    pages_total: int
    generated_tokens: int
    prefill_tokens: int
    recomputed_tokens: int
    swapped_out_groups: int
    swapped_pages: int
    bursts: int
    burst_steps: int
    slot_occupancy: float
    occupancy_while_queued: float
    busy_seconds: float
    tokens_per_second: float


@dataclasses.dataclass(eq=False)
class _Sample:
    spec: SamplingSpec
    seq_id: tuple
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    policy_logprobs: list = dataclasses.field(default_factory=list)
    log_nucleus_mass: list = dataclasses.field(default_factory=list)
    policy_versions: list = dataclasses.field(default_factory=list)
    routing: list = dataclasses.field(default_factory=list)  # [n, M, k] per burst: experts of its fed tokens
    finish_reason: str | None = None
    slot: int | None = None
    written: int = 0  # tokens whose K/V are in the cache (prompt + generated - 1 while decoding)
    streamed: int = 0

    @property
    def remaining(self) -> int:
        return self.spec.max_new_tokens - len(self.tokens)


@dataclasses.dataclass(eq=False)
class _Swap:
    shared: int  # leading pages the samples hold in common
    own: list  # per swapped sample, its pages past the shared ones
    rooms: list  # per swapped sample, the tokens its pages had room for
    samples: list
    data: tuple  # host copies of every page, shared ones first: per layer K then V, [KV, n, page, D]


@dataclasses.dataclass(eq=False)
class _Prefill:
    handles: list
    tokens_rp: np.ndarray  # [prefill_rows, prompt positions padded to whole chunks]
    lengths_r: np.ndarray
    table_rw: np.ndarray
    hidden_rd: jax.Array  # each row's hidden state at its last prompt position (once its chunk ran)
    start: int  # the next chunk's first position
    routing: jax.Array | None  # record_routing: [rows, prompt positions, M, k], the prompts' routed experts


class Handle:
    """One submitted group (G samples of one prompt), updated by the engine after every step.

    id; prompt (int32 ids); specs; tokens, logprobs, policy_logprobs, log_nucleus_mass: per sample, the values so
    far (lists); finish_reasons: per sample "stop" | "length" | "cancelled", None while it runs; done."""

    def __init__(self, gid: int, prompt: np.ndarray, specs: Sequence[SamplingSpec], expected: int):
        self.id, self.prompt, self.specs, self.expected = gid, prompt, tuple(specs), expected
        self._samples = [_Sample(spec, (gid, g)) for g, spec in enumerate(specs)]
        self._state = "waiting"  # waiting | prefilling | running | swapped | done
        self._swap: _Swap | None = None
        self._admitted = -1
        self._prompt_routing: np.ndarray | None = None  # record_routing: [prompt, M, k], shared by the samples

    @property
    def tokens(self) -> list[list[int]]:
        return [list(s.tokens) for s in self._samples]

    @property
    def logprobs(self) -> list[list[float]]:
        return [list(s.logprobs) for s in self._samples]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [s.finish_reason for s in self._samples]

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self._samples)

    def take_new(self) -> list[list[int]]:
        """Per sample, the tokens generated since the previous call (what to stream after a step)."""
        out = []
        for s in self._samples:
            new = s.tokens[s.streamed :]  # one read: tokens appended meanwhile by step() come next time
            s.streamed += len(new)
            out.append(new)
        return out

    def result(self) -> GenerateResult:
        """The group's samples as a :class:`GenerateResult` (width: the largest max_new_tokens); only when done."""
        if not self.done:
            raise ValueError(f"group {self.id} is still running; call result() once handle.done")
        width = max(s.spec.max_new_tokens for s in self._samples)

        def table(name, dtype):
            out = np.zeros((len(self._samples), width), dtype)
            for i, s in enumerate(self._samples):
                values = getattr(s, name)
                out[i, : len(values)] = values
            return out

        routed = None
        if self._prompt_routing is not None:  # prompt positions, then each sample's fed tokens; -1 after
            prompt = self._prompt_routing
            routed = np.full((len(self._samples), prompt.shape[0] + width, *prompt.shape[1:]), -1, prompt.dtype)
            for i, s in enumerate(self._samples):
                row = np.concatenate([prompt, *s.routing])
                routed[i, : row.shape[0]] = row
        return GenerateResult(
            tokens=table("tokens", np.int32),
            logprobs=table("logprobs", np.float32),
            lengths=np.asarray([len(s.tokens) for s in self._samples], np.int32),
            finish_reasons=tuple(s.finish_reason for s in self._samples),
            policy_logprobs=table("policy_logprobs", np.float32),
            log_nucleus_mass=table("log_nucleus_mass", np.float32),
            policy_versions=table("policy_versions", np.int32),
            routed_experts=routed,
        )


@functools.partial(jax.jit, static_argnums=0)
def _first_draw(graphdef, state, last_hidden_rd, row_s, temperature_s, top_p_s, top_k_s, seeds_s3):
    """Token 0 of every slot from its prompt's logits: one [R, V] projection of the prefilled rows' last hidden
    states, gathered to the slots (``row_s``), each slot keyed by its own stream. Returns draw_tokens' 4 arrays."""
    model = nnx.merge(graphdef, state)
    logits_rv = jnp.einsum("rd,dv->rv", last_hidden_rd, model.lm_head_weight(), preferred_element_type=jnp.float32)
    keys_s = jax.vmap(jax.random.fold_in, in_axes=(0, None))(stream_keys(seeds_s3), 0)
    return draw_tokens(logits_rv[row_s], temperature_s, top_p_s, top_k_s, keys_s, with_policy=True)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("steps", "record"), donate_argnums=(3,))
def _burst(
    graphdef,
    state,
    expert_weights,
    cache,
    token_s,
    count_s,
    live_s,
    max_new_s,
    temperature_s,
    top_p_s,
    top_k_s,
    stops_sn,
    seeds_s3,
    stop_early,
    *,
    steps,
    record=False,
):
    """Up to ``steps`` decode steps over every slot (module docstring, tick 3). Slot s feeds ``token_s[s]`` at
    position ``cache.lengths[s]`` and draws its token ``count_s[s]``. Returns (cache, last tokens, counts, live,
    stopped-by-token, steps run, and [S, steps] tokens, log-probs, policy log-probs, log nucleus masses, with
    ``record`` also [S, steps, M, k] the routed experts of the fed tokens; column i is step i, valid while the slot
    was live)."""
    model = nnx.merge(graphdef, state)
    w_dv = model.lm_head_weight()
    keys_s = stream_keys(seeds_s3)
    slots = token_s.shape[0]

    def cond(loop):
        i, _, _, _, live_s, _, ended, _ = loop
        return (i < steps) & jnp.any(live_s) & ~(stop_early & ended)

    def body(loop):
        i, cache, token_s, count_s, live_s, stopped_s, ended, outs = loop
        positions_s1 = jnp.where(live_s, cache.lengths, -1)[:, None]
        hidden_s1d, cache, *routed = model.hidden_states(
            token_s[:, None],
            positions_bt=positions_s1,
            cache=cache,
            expert_weights=expert_weights,
            return_routing=record,
        )
        logits_sv = jnp.einsum("sd,dv->sv", hidden_s1d[:, 0], w_dv, preferred_element_type=jnp.float32)
        step_keys_s = jax.vmap(jax.random.fold_in)(keys_s, count_s)
        drawn = draw_tokens(logits_sv, temperature_s, top_p_s, top_k_s, step_keys_s, with_policy=True)
        drawn = (*drawn, *(r[:, 0] for r in routed))  # record: the fed tokens' experts (read for live steps only)
        outs = tuple(
            o.at[:, i].set(jnp.where(live_s.reshape(-1, *(1,) * (x.ndim - 1)), x, 0).astype(o.dtype))
            for o, x in zip(outs, drawn, strict=True)
        )
        new_s = drawn[0]
        hit_s = live_s & jnp.any(new_s[:, None] == stops_sn, axis=-1)
        count_s = count_s + live_s.astype(jnp.int32)
        ended_s = live_s & (hit_s | (count_s >= max_new_s))
        token_s = jnp.where(live_s, new_s, token_s)
        return i + 1, cache, token_s, count_s, live_s & ~ended_s, stopped_s | hit_s, ended | jnp.any(ended_s), outs

    outs = (jnp.zeros((slots, steps), jnp.int32), *(jnp.zeros((slots, steps), jnp.float32) for _ in range(3)))
    if record:
        c = model.config
        outs += (jnp.full((slots, steps, c.num_moe_layers, c.num_experts_per_tok), -1, routing_dtype(c.num_experts)),)
    init = (jnp.int32(0), cache, token_s, count_s, live_s, jnp.zeros(slots, bool), jnp.bool_(False), outs)
    i, cache, token_s, count_s, live_s, stopped_s, _, outs = jax.lax.while_loop(cond, body, init)
    return cache, token_s, count_s, live_s, stopped_s, i, outs


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy(pages, src, dst):
    """Every layer's K and V pages with pages src[i] copied to dst[i] (copy-on-write before a burst)."""
    return tuple(copy_pages(p, src, dst) for p in pages)


@jax.jit
def _gather(pages, ids):
    """Every layer's K and V pages ``ids`` (a swap to host)."""
    return tuple(p[:, ids] for p in pages)


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter(pages, ids, data):
    """Every layer's K and V pages with pages ``ids`` set to ``data`` (a swap back from host)."""
    return tuple(p.at[:, ids].set(d) for p, d in zip(pages, data, strict=True))


PAGE_AXES = ("kv_heads", None, None, None)  # a KV page array [KV, pages, page, D]: kv heads split like the model's


def _zero_pages(shape, dtype, layout: Layout) -> jax.Array:
    """A KV page array of zeros, made on the devices (on a mesh laid out by ``PAGE_AXES``); once, at start."""
    if layout.mesh is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=layout.sharding(shape, PAGE_AXES))()


def _put(x: np.ndarray, layout: Layout, axes: tuple | None = None) -> jax.Array:
    """A host array on the model's devices: on a mesh replicated, or laid out by the logical ``axes``. With several
    processes every one passes the same value (each runs the same scheduler on the same tokens)."""
    if layout.mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, layout.sharding(x.shape, axes or (None,) * x.ndim))


class ContinuousEngine:
    """Continuous batching for ``model`` (a ``Qwen3ForCausalLM``, on one device or a mesh, in one process or
    several); see the module docstring."""

    def __init__(
        self, model, config: EngineConfig | None = None, *, policy_version: int = 0, record_routing: bool = False
    ):
        self.config = c = config or EngineConfig()
        self.policy_version = int(policy_version)  # tags every token drawn (GenerateResult.policy_versions)
        self.record_routing = bool(record_routing)  # GenerateResult.routed_experts
        if not isinstance(c, EngineConfig):
            raise ValueError(f"config must be a qlx.rollout.continuous.EngineConfig, got {type(c).__name__}")
        if c.max_len > model.config.max_position_embeddings:
            raise ValueError(
                f"EngineConfig.max_len ({c.max_len}) passes the model's max_position_embeddings "
                f"({model.config.max_position_embeddings})"
            )
        self.model = model
        self._graphdef, self._state = nnx.split(model)
        self._expert_weights = _expert_weights(self._graphdef, self._state)
        mc = model.config
        shape = (mc.num_kv_heads, c.num_pages, c.page_size, mc.head_dim)
        self._pages = tuple(_zero_pages(shape, mc.dtype, model.layout) for _ in range(2 * mc.num_layers))  # K, then V
        self.pool = PagePool(c.num_pages, c.page_size)
        self._slots: list[_Sample | None] = [None] * c.max_slots
        self._queue = GroupQueue()
        self._prefilling: _Prefill | None = None
        self._running: list[Handle] = []
        self._ids = 0
        self._admissions = 0  # admission order (the newest running group is preempted first)
        self._counts = dict(
            generated_tokens=0,
            prefill_tokens=0,
            swapped_out_groups=0,
            swapped_pages=0,
            bursts=0,
            burst_steps=0,
            live_slot_steps=0,
            queued_steps=0,
            queued_live_slot_steps=0,
        )
        self._busy_seconds = 0.0
        self._lock = threading.RLock()

    def _put(self, x) -> jax.Array:
        return _put(np.asarray(x), self.model.layout)

    # ---------------------------------------------------------------- public API

    def submit(
        self, prompt: Sequence[int], specs: Sequence[SamplingSpec], *, expected_new_tokens: int | None = None
    ) -> Handle:
        """Queue one group: ``len(specs)`` samples of ``prompt`` (token ids), sample g sampled by ``specs[g]``.
        ``expected_new_tokens`` orders the queue (longest expected first; default: the largest max_new_tokens)."""
        with self._lock:
            return self._submit(prompt, specs, expected_new_tokens)

    def _submit(self, prompt, specs, expected_new_tokens) -> Handle:
        c = self.config
        (ids,) = _check_prompts([prompt], self.model.config.vocab_size)
        specs = tuple(specs)
        if not specs or not all(isinstance(s, SamplingSpec) for s in specs):
            raise ValueError("specs must be a non-empty list of qlx.rollout.SamplingSpec (one per sample)")
        if len(specs) > c.max_slots:
            raise ValueError(f"a group of {len(specs)} samples cannot fit EngineConfig.max_slots ({c.max_slots})")
        for g, spec in enumerate(specs):
            if ids.size + spec.max_new_tokens > c.max_len:
                raise ValueError(
                    f"specs[{g}]: prompt ({ids.size} tokens) + max_new_tokens ({spec.max_new_tokens}) passes "
                    f"EngineConfig.max_len ({c.max_len})"
                )
            if len(spec.stop_token_ids) > c.max_stop_ids:
                raise ValueError(
                    f"specs[{g}].stop_token_ids has {len(spec.stop_token_ids)} ids, more than "
                    f"EngineConfig.max_stop_ids ({c.max_stop_ids})"
                )
            bad = [t for t in spec.stop_token_ids if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise ValueError(f"specs[{g}].stop_token_ids: {bad[0]} is outside the vocabulary")
        whole = pages_for(ids.size, c.page_size) + sum(
            pages_for(ids.size + s.max_new_tokens, c.page_size) for s in specs
        )
        if whole > c.num_pages - 1:
            raise ValueError(
                f"a group of {len(specs)} x ({ids.size} prompt + up to {max(s.max_new_tokens for s in specs)} new) "
                f"tokens may need {whole} pages; EngineConfig.num_pages allows {c.num_pages - 1}"
            )
        expected = max(s.max_new_tokens for s in specs) if expected_new_tokens is None else int(expected_new_tokens)
        handle = Handle(self._ids, ids, specs, ids.size + expected)
        self._ids += 1
        self._queue.push(handle, handle.expected)
        return handle

    def update_weights(self, model, *, policy_version: int | None = None) -> None:
        """Decode with ``model``'s parameters from the next tick on (same architecture and shapes: nothing
        recompiles). Sequences in flight keep their KV pages, computed under the old weights (``keep`` semantics);
        cancel them first to drop them. Tokens drawn from then on carry ``policy_version`` (None: the current
        version + 1), so a sample that spans the update holds two versions."""
        graphdef, state = nnx.split(model)
        if graphdef != self._graphdef:
            raise ValueError("update_weights needs a model of the engine's architecture (its nnx graph differs)")
        with self._lock:
            self.model, self._state = model, state
            self._expert_weights = _expert_weights(graphdef, state)
            self.policy_version = self.policy_version + 1 if policy_version is None else int(policy_version)

    def cancel(self, handle: Handle) -> None:
        """End the group's unfinished samples with finish_reason "cancelled" and free their slots and pages."""
        with self._lock:
            self._cancel(handle)

    def _cancel(self, handle: Handle) -> None:
        if handle.done:
            return
        if handle._state in ("waiting", "swapped"):
            self._queue.remove(handle)
            handle._swap = None
        for sample in handle._samples:
            if sample.slot is not None:
                self._finish(sample, FINISH_CANCELLED)
            elif sample.finish_reason is None:
                sample.finish_reason = FINISH_CANCELLED
        self._retire(handle)

    def step(self) -> bool:
        """One tick (module docstring): admit, allocate, burst, collect. Returns whether work is left."""
        with self._lock:
            began = time.perf_counter()
            self._admit()
            if any(s is not None for s in self._slots):
                self._allocate()
                self._run_burst()
            self._busy_seconds += time.perf_counter() - began
            return bool(len(self._queue) or self._running or self._prefilling is not None)

    def run(self) -> None:
        """Step until every submitted group is done."""
        while self.step():
            pass

    def stats(self) -> EngineStats:
        with self._lock:
            return self._stats()

    def _stats(self) -> EngineStats:
        c, n = self.config, self._counts
        capacity = n["burst_steps"] * c.max_slots
        return EngineStats(
            queue_depth=len(self._queue),
            slots_busy=sum(s is not None for s in self._slots),
            max_slots=c.max_slots,
            pages_used=self.pool.used_pages,
            pages_total=c.num_pages - 1,
            generated_tokens=n["generated_tokens"],
            prefill_tokens=n["prefill_tokens"],
            recomputed_tokens=0,
            swapped_out_groups=n["swapped_out_groups"],
            swapped_pages=n["swapped_pages"],
            bursts=n["bursts"],
            burst_steps=n["burst_steps"],
            slot_occupancy=n["live_slot_steps"] / capacity if capacity else 0.0,
            occupancy_while_queued=(
                n["queued_live_slot_steps"] / (n["queued_steps"] * c.max_slots) if n["queued_steps"] else 0.0
            ),
            busy_seconds=self._busy_seconds,
            tokens_per_second=n["generated_tokens"] / self._busy_seconds if self._busy_seconds else 0.0,
        )

    # ---------------------------------------------------------------- admission

    def _free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s is None]

    def _outstanding(self) -> int:
        c = self.config
        return sum(
            outstanding_pages(
                s.written,
                len(self.pool.pages(s.seq_id)),
                s.remaining,
                page_size=c.page_size,
                reserve_tokens=c.reserve_tokens,
            )
            for s in self._slots
            if s is not None
        )

    def _needs(self, handle: Handle) -> tuple[int, int]:
        """(slots, pages) the group takes at admission."""
        c = self.config
        if handle._state == "swapped":
            swap, reserve_tokens = handle._swap, c.reserve_tokens
            reserve = sum(
                outstanding_pages(
                    s.written, swap.shared + len(own), s.remaining, page_size=c.page_size, reserve_tokens=reserve_tokens
                )
                for s, own in zip(swap.samples, swap.own, strict=True)
            )
            return len(swap.samples), swap.shared + sum(len(o) for o in swap.own) + reserve
        pages = group_pages(
            handle.prompt.size,
            [s.max_new_tokens for s in handle.specs],
            page_size=c.page_size,
            reserve_tokens=c.reserve_tokens,
        )
        return len(handle.specs), pages

    def _admit(self) -> None:
        """Readmit swapped groups and admit new ones (module docstring, tick 1). A prefill unfinished within this
        tick's ``prefill_chunks_per_tick`` resumes next tick; nothing else is admitted meanwhile."""
        budget = [self.config.prefill_chunks_per_tick or None]  # prefill calls left this tick (None: no limit)
        if self._prefilling is not None and not self._advance_prefill(budget):
            return
        fresh: list[Handle] = []
        slots_left, pages_left = len(self._free_slots()), self.pool.free_pages - self._outstanding()
        while len(self._queue):
            handle = self._queue.peek()
            if handle._state == "waiting" and len(fresh) == self.config.prefill_rows:
                self._start_prefill(fresh)
                fresh = []
                if not self._advance_prefill(budget):
                    return
                slots_left, pages_left = len(self._free_slots()), self.pool.free_pages - self._outstanding()
            slots, pages = self._needs(handle)
            if slots > slots_left or pages > pages_left:
                break
            self._queue.pop()
            slots_left, pages_left = slots_left - slots, pages_left - pages
            if handle._state == "swapped":
                self._swap_in(handle)
            else:
                self.pool.admit(("prompt", handle.id), handle.prompt.size)
                handle._state = "prefilling"
                fresh.append(handle)
        if fresh:
            self._start_prefill(fresh)
            self._advance_prefill(budget)

    def _start_prefill(self, handles: list[Handle]) -> None:
        """The groups' prompts (one row each, padded to whole chunks) and page tables for :meth:`_advance_prefill`."""
        c = self.config
        rows = c.prefill_rows
        prompt_len = round_up(max(h.prompt.size for h in handles), c.prefill_chunk)
        tokens_rp = np.zeros((rows, prompt_len), np.int32)
        lengths_r = np.zeros(rows, np.int32)
        table_rw = np.zeros((rows, c.table_width), np.int32)
        for r, h in enumerate(handles):
            tokens_rp[r, : h.prompt.size] = h.prompt
            lengths_r[r] = h.prompt.size
            table_rw[r] = self.pool.page_table([("prompt", h.id)], c.table_width)[0]
        mc = self.model.config
        hidden_rd = self._put(np.zeros((rows, mc.hidden_size), jnp.dtype(mc.dtype)))
        routing = None
        if self.record_routing:
            shape = (rows, prompt_len, mc.num_moe_layers, mc.num_experts_per_tok)
            routing = self._put(np.full(shape, -1, routing_dtype(mc.num_experts)))
        self._prefilling = _Prefill(handles, tokens_rp, lengths_r, table_rw, hidden_rd, 0, routing)

    def _advance_prefill(self, budget: list) -> bool:
        """Run chunks of the prefill in progress while ``budget[0]`` (calls left, None: no limit) allows; when the
        prompts are done, hand the groups their slots and first tokens. Returns whether it finished."""
        c, p = self.config, self._prefilling
        cache_len = c.table_width * c.page_size
        lengths = self._put(p.lengths_r)
        while p.start < p.tokens_rp.shape[1]:
            if budget[0] is not None:
                if budget[0] == 0:
                    return False
                budget[0] -= 1
            k, v = self._split_pages()
            cache = PagedKVCache(
                k, v, self._put(p.table_rw), self._put(np.zeros(len(p.lengths_r), np.int32))
            )  # donated
            span = min(cache_len, 1 << (p.start + c.prefill_chunk - 1).bit_length())
            cache, p.hidden_rd, *recorded = _prefill_chunk(
                self._graphdef,
                self._state,
                self._expert_weights,
                cache,
                p.hidden_rd,
                self._put(p.tokens_rp[:, p.start : p.start + c.prefill_chunk]),
                p.start,
                lengths,
                p.routing,
                span=span,
            )
            p.routing = recorded[0] if recorded else None
            self._pages = cache.k + cache.v
            p.start += c.prefill_chunk
        self._prefilling = None
        if p.routing is not None:
            routing = to_host(p.routing)
            for r, h in enumerate(p.handles):
                h._prompt_routing = routing[r, : h.prompt.size]
        self._counts["prefill_tokens"] += int(p.lengths_r.sum())
        self._place(p.handles, p.hidden_rd)
        return True

    def _place(self, handles: list[Handle], last_hidden_rd) -> None:
        """Fork each prefilled prompt to its samples, give them slots and draw their token 0 (groups cancelled
        during the prefill only release the prompt)."""
        c = self.config
        free = self._free_slots()
        row_s = np.zeros(c.max_slots, np.int32)
        placed: list[_Sample] = []
        for r, h in enumerate(handles):
            if h._state == "done":  # cancelled while prefilling
                self.pool.release(("prompt", h.id))
                continue
            h._state, h._admitted = "running", self._admission()
            self._running.append(h)
            for sample in h._samples:
                self.pool.fork(("prompt", h.id), sample.seq_id)
                sample.slot, sample.written = free.pop(0), h.prompt.size
                self._slots[sample.slot] = sample
                row_s[sample.slot] = r
                placed.append(sample)
            self.pool.release(("prompt", h.id))
        if not placed:
            return
        arrays = self._slot_arrays()
        drawn = _first_draw(
            self._graphdef,
            self._state,
            last_hidden_rd,
            self._put(row_s),
            *(self._put(arrays[name]) for name in ("temperature", "top_p", "top_k", "seeds")),
        )
        token_s, logprob_s, policy_s, mass_s = (to_host(x) for x in drawn)
        for sample in placed:
            s = sample.slot
            self._append(sample, [token_s[s]], [logprob_s[s]], [policy_s[s]], [mass_s[s]])
            if token_s[s] in sample.spec.stop_token_ids:
                self._finish(sample, FINISH_STOP)
            elif sample.remaining == 0:
                self._finish(sample, FINISH_LENGTH)
        for h in handles:
            if h.done and h in self._running:
                self._retire(h)

    def _admission(self) -> int:
        self._admissions += 1
        return self._admissions

    # ---------------------------------------------------------------- allocation and preemption

    def _allocate(self) -> None:
        """Room for each live slot's next min(K, remaining) tokens; swap out the newest group when pages run out.

        Pending copy-on-write copies run before a swap-out (the victim's copies fill the pages it saves, and a page
        it releases may be handed out again) and after the last extension."""
        copies = []
        while True:
            try:
                for sample in self._slots:
                    if sample is None:
                        continue
                    target = sample.written + min(self.config.burst, sample.remaining)
                    room = self.pool.length(sample.seq_id)
                    if target > room:
                        copies += self.pool.extend(sample.seq_id, target - room)
                break
            except OutOfPages:
                if len(self._running) == 1:
                    raise
                self._copy_pages(copies)
                copies = []
                self._swap_out(max(self._running, key=lambda h: h._admitted))
        self._copy_pages(copies)

    def _copy_pages(self, copies) -> None:
        if not copies:
            return
        n = batch_bucket(len(copies))
        src = np.zeros(n, np.int32)
        dst = np.zeros(n, np.int32)
        src[: len(copies)] = [cp.src for cp in copies]
        dst[: len(copies)] = [cp.dst for cp in copies]
        self._pages = _copy(self._pages, self._put(src), self._put(dst))

    def _swap_out(self, handle: Handle) -> None:
        """Copy the group's pages to host memory, release them and its slots, queue it first (module docstring)."""
        samples = [s for s in handle._samples if s.slot is not None]
        ids = [s.seq_id for s in samples]
        shared = self.pool.shared_prefix_pages(ids) if len(ids) > 1 else 0
        tables = [self.pool.pages(i) for i in ids]
        pages = list(tables[0][:shared]) + [p for t in tables for p in t[shared:]]
        padded = np.zeros(batch_bucket(len(pages)), np.int32)
        padded[: len(pages)] = pages
        data = tuple(to_host(x) for x in _gather(self._pages, self._put(padded)))
        handle._swap = _Swap(
            shared=shared,
            own=[list(t[shared:]) for t in tables],
            rooms=[self.pool.length(i) for i in ids],
            samples=samples,
            data=data,
        )
        for s in samples:
            self.pool.release(s.seq_id)
            self._slots[s.slot], s.slot = None, None
        handle._state = "swapped"
        self._running.remove(handle)
        self._queue.push_swapped(handle)
        self._counts["swapped_out_groups"] += 1
        self._counts["swapped_pages"] += len(pages)

    def _swap_in(self, handle: Handle) -> None:
        """Fresh pages with the same sharing (shared prompt pages forked, own pages appended), filled from host."""
        swap, c = handle._swap, self.config
        ids = [s.seq_id for s in swap.samples]
        if swap.shared:
            self.pool.admit(("prompt", handle.id), swap.shared * c.page_size)
            for i in ids:
                self.pool.fork(("prompt", handle.id), i)
            self.pool.release(("prompt", handle.id))
            for i, room in zip(ids, swap.rooms, strict=True):
                self.pool.extend(i, room - swap.shared * c.page_size)  # after whole shared pages: never a copy
        else:
            for i, room in zip(ids, swap.rooms, strict=True):
                self.pool.admit(i, room)
        tables = [self.pool.pages(i) for i in ids]
        pages = list(tables[0][: swap.shared]) + [p for t in tables for p in t[swap.shared :]]
        padded = np.zeros(swap.data[0].shape[1], np.int32)
        padded[: len(pages)] = pages
        self._pages = _scatter(
            self._pages, self._put(padded), tuple(_put(d, self.model.layout, PAGE_AXES) for d in swap.data)
        )
        free = self._free_slots()
        for s in swap.samples:
            s.slot = free.pop(0)
            self._slots[s.slot] = s
        handle._state, handle._swap, handle._admitted = "running", None, self._admission()
        self._running.append(handle)

    # ---------------------------------------------------------------- bursts

    def _split_pages(self):
        n = len(self._pages) // 2
        return self._pages[:n], self._pages[n:]

    def _slot_arrays(self) -> dict[str, np.ndarray]:
        c = self.config
        out = dict(
            token=np.zeros(c.max_slots, np.int32),
            count=np.zeros(c.max_slots, np.int32),
            live=np.zeros(c.max_slots, bool),
            max_new=np.zeros(c.max_slots, np.int32),
            temperature=np.zeros(c.max_slots, np.float32),
            top_p=np.ones(c.max_slots, np.float32),
            top_k=np.zeros(c.max_slots, np.int32),
            stops=np.full((c.max_slots, c.max_stop_ids), -1, np.int32),
            seeds=np.zeros((c.max_slots, 3), np.uint32),
            written=np.zeros(c.max_slots, np.int32),
        )
        for slot, sample in enumerate(self._slots):
            if sample is None:
                continue
            spec = sample.spec
            out["token"][slot] = sample.tokens[-1] if sample.tokens else 0
            out["count"][slot] = len(sample.tokens)
            out["live"][slot] = True
            out["max_new"][slot] = spec.max_new_tokens
            out["temperature"][slot], out["top_p"][slot], out["top_k"][slot] = spec.temperature, spec.top_p, spec.top_k
            out["stops"][slot, : len(spec.stop_token_ids)] = spec.stop_token_ids
            out["seeds"][slot] = (spec.seed % 2**32, (spec.seed >> 32) % 2**32, spec.stream % 2**32)
            out["written"][slot] = sample.written
        return out

    def _run_burst(self) -> None:
        c = self.config
        a = self._slot_arrays()
        ids = [s.seq_id if s is not None else None for s in self._slots]
        table = np.zeros((c.max_slots, c.table_width), np.int32)
        for slot, seq_id in enumerate(ids):
            if seq_id is not None:
                table[slot] = self.pool.page_table([seq_id], c.table_width)[0]
        k, v = self._split_pages()
        cache = PagedKVCache(k, v, self._put(table), self._put(a["written"]))
        queued = len(self._queue) > 0
        cache, _, count_s, _, stopped_s, steps, outs = _burst(
            self._graphdef,
            self._state,
            self._expert_weights,
            cache,
            *(
                self._put(a[name])
                for name in ("token", "count", "live", "max_new", "temperature", "top_p", "top_k", "stops", "seeds")
            ),
            self._put(np.bool_(queued)),
            steps=c.burst,
            record=self.record_routing,
        )
        self._pages = cache.k + cache.v
        count_s, stopped_s, steps = to_host(count_s), to_host(stopped_s), int(to_host(steps))
        tokens, logprobs, policy, mass, *routing = (to_host(x) for x in outs)
        self._counts["bursts"] += 1
        self._counts["burst_steps"] += steps
        live_steps = int(count_s.sum() - a["count"].sum())
        self._counts["live_slot_steps"] += live_steps
        if queued:
            self._counts["queued_steps"] += steps
            self._counts["queued_live_slot_steps"] += live_steps
        for slot, sample in enumerate(list(self._slots)):
            if sample is None:
                continue
            n = int(count_s[slot]) - len(sample.tokens)
            sample.written += n
            if routing:  # the n steps fed the sample's last n tokens before this burst's last draw
                sample.routing.append(routing[0][slot, :n])
            self._append(sample, tokens[slot, :n], logprobs[slot, :n], policy[slot, :n], mass[slot, :n])
            if stopped_s[slot]:
                self._finish(sample, FINISH_STOP)
            elif sample.remaining == 0:
                self._finish(sample, FINISH_LENGTH)
        for h in [h for h in self._running if h.done]:
            self._retire(h)

    # ---------------------------------------------------------------- bookkeeping

    def _append(self, sample: _Sample, tokens, logprobs, policy, mass) -> None:
        sample.tokens += [int(t) for t in tokens]
        sample.logprobs += [float(x) for x in logprobs]
        sample.policy_logprobs += [float(x) for x in policy]
        sample.log_nucleus_mass += [float(x) for x in mass]
        sample.policy_versions += [self.policy_version] * len(tokens)
        self._counts["generated_tokens"] += len(tokens)

    def _finish(self, sample: _Sample, reason: str) -> None:
        sample.finish_reason = reason
        if sample.slot is not None:
            self.pool.release(sample.seq_id)
            self._slots[sample.slot], sample.slot = None, None

    def _retire(self, handle: Handle) -> None:
        handle._state = "done"
        if handle in self._running:
            self._running.remove(handle)


def generate_continuous(
    model, prompts: Sequence[Sequence[int]], specs: Sequence[SamplingSpec], config: EngineConfig | None = None
) -> GenerateResult:
    """:func:`qlx.rollout.generate_rows`' contract on a :class:`ContinuousEngine`: prompt i is a group of one sample
    with ``specs[i]``, all submitted at once. Returns the rows in prompt order."""
    if len(specs) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(specs)} sampling specs")
    return generate_groups(model, prompts, [[s] for s in specs], config)


def generate_groups(
    model,
    prompts: Sequence[Sequence[int]],
    group_specs: Sequence[Sequence[SamplingSpec]],
    config: EngineConfig | None = None,
    *,
    policy_version: int = 0,
    record_routing: bool = False,
) -> GenerateResult:
    """Group i = ``len(group_specs[i])`` samples of ``prompts[i]`` (prefilled once), all submitted at once to a
    :class:`ContinuousEngine` (its tokens tagged ``policy_version``; ``record_routing``: with
    ``GenerateResult.routed_experts``). Returns the samples as rows, group by group (sample g of group i after those
    of the groups before it), as :func:`qlx.rollout.generate_rows` over the prompts repeated."""
    if len(group_specs) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(group_specs)} groups of sampling specs")
    engine = ContinuousEngine(model, config, policy_version=policy_version, record_routing=record_routing)
    handles = [engine.submit(p, s) for p, s in zip(prompts, group_specs, strict=True)]
    engine.run()
    width = max(s.max_new_tokens for specs in group_specs for s in specs)
    return concatenate_results([h.result() for h in handles], width)
