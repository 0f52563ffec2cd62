"""Batched generation: chunked prefill into a preallocated KV cache, then a compiled decode loop.

For N prompts of different lengths L_i (right-padded into one [B, P] array):

    prefill   for each chunk c of C prompt positions (a Python loop over P / C chunks):
                  h, cache = model.hidden_states(tokens[:, cC:(c+1)C], positions, cache[:, :span])
                  keep h at position L_i − 1 of each row
              where span, the cache prefix the chunk attends over, is (c+1)C rounded up to a power of two (one
              compiled function per span: log2(P / C) + 1 of them), so attention work stays within 2x of causal.
    decode    one lax.while_loop (no Python per token): token j of row i is drawn from the row's sampling
              distribution at position L_i + j − 1, then fed back at position L_i + j; a row stops at its first stop
              token or after its max_new_tokens; the loop ends when every row has stopped.

Only each row's last hidden state is projected to the vocabulary during prefill (no [B, P, V] logits), so prefill
memory is bounded by the chunk. Shapes are bucketed (``qlx.rollout.buckets``): the batch to a power of two (and a
multiple of the mesh's batch shards), the prompt to a multiple of the chunk, the output buffer and the cache to
length buckets, so a new request rarely compiles anything. The model is passed into the compiled functions as
``nnx.split`` (graphdef static, parameter state as arrays), so no parameter is copied.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qlx.distributed import to_host
from qlx.models.cache import KVCache, length_axes
from qlx.rollout.buckets import batch_bucket, length_bucket, round_up
from qlx.rollout.sampling import policy_logprobs, sample_tokens, sampling_logprobs

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How one sequence is sampled.

    max_new_tokens: most tokens generated (a final stop token counts).
    temperature: 0 is greedy; otherwise logits are divided by it before the filters (``qlx.rollout.sampling``).
    top_p: nucleus mass in [0, 1]; 1 is off. top_k: keep the k most likely tokens; 0 is off.
    stop_token_ids: generation stops after emitting any of these (the stop token is returned, as its log-prob).
    seed, stream: the sequence's random stream is ``fold_in(fold_in(key(seed mod 2^32), seed >> 32 mod 2^32),
        stream)``; token j uses ``fold_in(that, j)``, so a sequence's samples depend only on its own seed, stream,
        prompt and the model (not on the other sequences of the batch).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    stream: int = 0

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int | np.integer) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer (got {self.max_new_tokens!r})")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (got {self.temperature!r})")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1] (got {self.top_p!r})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, 0 meaning off (got {self.top_k!r})")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """Generated tokens of N sequences.

    tokens: int32 [N, T] (T = the largest max_new_tokens); row i is valid up to ``lengths[i]``, 0 after.
    logprobs: float32 [N, T]; log-probability of each token under the distribution it was sampled from
        (``qlx.rollout.sampling.sampling_logprobs``: the tempered, top-k/top-p renormalised distribution; the
        model's own log_softmax for greedy rows); 0 after ``lengths[i]``.
    lengths: int32 [N] tokens generated per sequence (including a final stop token).
    finish_reasons: "stop" (ended with a stop token) or "length" (reached max_new_tokens), per sequence.
    policy_logprobs: float32 [N, T]; each token's log-probability under the policy, ``log_softmax(logits / T)``
        over the whole vocabulary (``qlx.rollout.sampling.policy_logprobs``): what the trainer recomputes for the
        importance ratio; 0 after ``lengths[i]``.
    log_nucleus_mass: float32 [N, T]; log S, the policy mass of the tokens the filters kept at that step (0 when
        nothing was filtered), so ``logprobs = policy_logprobs - log_nucleus_mass``; 0 after ``lengths[i]``.
    policy_versions: int32 [N, T]; the version of the weights that drew each token (the static engine: the
        caller's ``policy_version`` for every token; the continuous engine: its version at that step, so a sample
        that ran across ``update_weights`` holds two spans); 0 after ``lengths[i]`` (read it with :attr:`mask`).
    routed_experts: None, or (``return_routing=True``; the continuous engine's ``record_routing``) int16
        [N, S, M, k]: the experts the rollout routed each token of the sequence (its prompt, then its generated
        tokens: position p of ``prompt + tokens[:lengths[i]]``) to in each of the M MoE layers, for routing replay
        in training (R3, ``rl.routing_replay``); -1 where nothing was computed: past the sequence, and the last
        generated token when the loop ended without feeding it back (training routes such a token by its own
        top-k; its routing reaches no log-prob). S >= every prompt length + T.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finish_reasons: tuple[str, ...]
    policy_logprobs: np.ndarray
    log_nucleus_mass: np.ndarray
    policy_versions: np.ndarray
    routed_experts: np.ndarray | None = None

    def rows(self, rows: slice) -> GenerateResult:
        """The result of the sequences ``rows``."""
        return GenerateResult(
            tokens=self.tokens[rows],
            logprobs=self.logprobs[rows],
            lengths=self.lengths[rows],
            finish_reasons=self.finish_reasons[rows],
            policy_logprobs=self.policy_logprobs[rows],
            log_nucleus_mass=self.log_nucleus_mass[rows],
            policy_versions=self.policy_versions[rows],
            routed_experts=None if self.routed_experts is None else self.routed_experts[rows],
        )

    @property
    def mask(self) -> np.ndarray:
        """bool [N, T]: True where a token was generated."""
        return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

    def sequences(self) -> list[list[int]]:
        """The generated tokens of each sequence as lists."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def concatenate_results(results: Sequence[GenerateResult], width: int = 0) -> GenerateResult:
    """The sequences of ``results`` in order, as one result (token arrays right-padded with zeros to ``width``, at
    least the widest)."""
    width = max(width, *(r.tokens.shape[1] for r in results))

    def stacked(name, width=width, fill=0):
        arrays = [getattr(r, name) for r in results]
        pads = [((0, 0), (0, width - a.shape[1])) + ((0, 0),) * (a.ndim - 2) for a in arrays]
        return np.concatenate([np.pad(a, pad, constant_values=fill) for a, pad in zip(arrays, pads, strict=True)])

    routed = [r.routed_experts for r in results]
    if any(a is None for a in routed) and not all(a is None for a in routed):
        raise ValueError("routed_experts: some results record the routing and some do not")

    return GenerateResult(
        tokens=stacked("tokens"),
        logprobs=stacked("logprobs"),
        lengths=np.concatenate([r.lengths for r in results]),
        finish_reasons=tuple(f for r in results for f in r.finish_reasons),
        policy_logprobs=stacked("policy_logprobs"),
        log_nucleus_mass=stacked("log_nucleus_mass"),
        policy_versions=stacked("policy_versions"),
        routed_experts=None if routed[0] is None else stacked("routed_experts", max(a.shape[1] for a in routed), -1),
    )


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] = (),
    seed: int = 0,
    return_logprobs: bool = True,
    prefill_chunk: int = 512,
    max_sequences: int = 0,
    policy_version: int = 0,
    return_routing: bool = False,
) -> GenerateResult:
    """Sample up to ``max_new_tokens`` tokens after each prompt (lists of token ids, lengths may differ).

    Sequence i uses random stream i of ``seed`` (see :class:`SamplingSpec`); ``temperature=0`` is
    greedy decoding. ``return_logprobs=False`` returns zeros in the three log-prob arrays (the values are computed
    either way; the flag exists so callers state whether they rely on them). ``prefill_chunk`` bounds the prompt
    positions processed per prefill step; ``max_sequences`` > 0 generates in waves of that many sequences
    (:func:`generate_rows`); ``policy_version`` tags every token (``GenerateResult.policy_versions``);
    ``return_routing`` records the routed experts (``GenerateResult.routed_experts``). Returns a
    :class:`GenerateResult`.
    """
    specs = [
        SamplingSpec(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop_token_ids=tuple(stop_token_ids),
            seed=seed,
            stream=i,
        )
        for i in range(len(prompts))
    ]
    result = generate_rows(
        model,
        prompts,
        specs,
        prefill_chunk=prefill_chunk,
        max_sequences=max_sequences,
        policy_version=policy_version,
        return_routing=return_routing,
    )
    if not return_logprobs:
        zeros = np.zeros_like(result.logprobs)
        result = dataclasses.replace(result, logprobs=zeros, policy_logprobs=zeros, log_nucleus_mass=zeros)
    return result


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[np.ndarray]:
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one list of token ids")
    arrays = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"prompts[{i}] must be a non-empty list of integer token ids (got shape {ids.shape}, dtype {ids.dtype})"
            )
        bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        if bad.size:
            raise ValueError(f"prompts[{i}][{bad[0]}] = {ids[bad[0]]} is outside the vocabulary [0, {vocab_size})")
        arrays.append(ids.astype(np.int32))
    return arrays


def batch_axes(model) -> tuple[str, ...]:
    """Mesh axes the batch dimension is sharded over (from the model's logical-axis rules)."""
    mesh = model.layout.mesh
    if mesh is None:
        return ()
    return tuple(axis for axis in dict(model.layout.rules).get("batch", ()) if mesh.shape[axis] > 1)


def batch_sharding(ndim: int, *, mesh, batch_axes: tuple[str, ...]) -> NamedSharding | None:
    """The layout of an ``ndim``-dimensional array whose first dimension is the batch: split over ``batch_axes``
    (None without a mesh or batch axes: the default device)."""
    if mesh is None or not batch_axes:
        return None
    return NamedSharding(mesh, PartitionSpec(batch_axes, *(None,) * (ndim - 1)))


def put_batch(x: np.ndarray, *, mesh, batch_axes: tuple[str, ...]) -> jax.Array:
    """A host array whose first dimension is the batch, on device (sharded over ``batch_axes`` on a mesh)."""
    sharding = batch_sharding(x.ndim, mesh=mesh, batch_axes=batch_axes)
    return jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _routing_record(shape, dtype, sharding) -> jax.Array:
    """An empty routing record (all -1), made on the devices in ``sharding`` (compiled once per shape)."""
    record = jnp.full(shape, -1, dtype)
    return record if sharding is None else jax.lax.with_sharding_constraint(record, sharding)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_cache(graphdef, state, batch: int, max_len: int):
    """An empty cache with one distinct buffer per array (it is donated to, and updated in place by, each step)."""
    return nnx.merge(graphdef, state).init_cache(batch, max_len)


@functools.partial(jax.jit, static_argnums=0)
def _expert_weights(graphdef, state):
    """The MoE experts as separate arrays (``Qwen3ForCausalLM.expert_weights``), or None: split once per generate
    call and passed to every prefill chunk and the decode loop (XLA would redo the split inside each of them)."""
    return nnx.merge(graphdef, state).expert_weights()


@functools.partial(jax.jit, static_argnums=0, static_argnames=("span",), donate_argnums=(3, 4, 8))
def _prefill_chunk(
    graphdef, state, expert_weights, cache, last_hidden_bd, tokens_bc, start, lengths_b, routing_bsmk, *, span
):
    """:func:`prefill_step` compiled, the model passed as ``nnx.split``; cache, last hidden state and routing
    buffer donated."""
    model = nnx.merge(graphdef, state)
    return prefill_step(
        model, expert_weights, cache, last_hidden_bd, tokens_bc, start, lengths_b, span=span, routing_bsmk=routing_bsmk
    )


def routing_dtype(num_experts: int):
    """The integer type of recorded expert ids: int16 (ids up to 32,767; -1 marks no record), else int32."""
    return jnp.int16 if num_experts < 2**15 else jnp.int32


def prefill_step(model, expert_weights, cache, last_hidden_bd, tokens_bc, start, lengths_b, *, span, routing_bsmk=None):
    """Write one chunk of prompt positions [start, start + C) into the cache; keep each row's hidden state at its
    last prompt position (L_b − 1) when that position falls in this chunk. Positions past a row's prompt are
    padding (position −1: not written, attends to nothing). Returns (cache, last_hidden_bd), and with
    ``routing_bsmk`` (the routing record, [B, S, M, k], S >= start + C) also that record with the chunk's routed
    experts (``hidden_states(return_routing=True)``; -1 past each prompt) written at positions [start, start + C).

    The chunk runs on the first ``span`` cache slots only (span >= start + C): the slots after them hold nothing
    its queries may see, so attention over the prefix gives the same result for less work. A cache whose length the
    layout splits (``qlx.models.cache.length_axes``) runs whole: each shard's attention skips its slots past the
    chunk's positions anyway. A traceable function
    (the memory agent calls it inside its chunk loop); ``_prefill_chunk`` is its compiled form.
    """
    chunk = tokens_bc.shape[1]
    positions_bc = start + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    positions_bc = jnp.where(positions_bc < lengths_b[:, None], positions_bc, -1)
    if isinstance(cache, KVCache) and length_axes(model.layout, cache.k[0].shape):
        span = cache.max_len  # a cache split over length shards runs whole: a prefix of it would be gathered
    record = routing_bsmk is not None
    hidden_bcd, prefix, *routed = model.hidden_states(
        tokens_bc,
        positions_bt=positions_bc,
        cache=cache.prefix(span),
        expert_weights=expert_weights,
        return_routing=record,
    )
    cache = cache.with_prefix(prefix)
    offset_b = lengths_b - 1 - start
    inside_b = (offset_b >= 0) & (offset_b < chunk)
    picked_bd = jnp.take_along_axis(hidden_bcd, jnp.clip(offset_b, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
    last_hidden_bd = jnp.where(inside_b[:, None], picked_bd.astype(last_hidden_bd.dtype), last_hidden_bd)
    if not record:
        return cache, last_hidden_bd
    routed_bcmk = routed[0].astype(routing_bsmk.dtype)
    return cache, last_hidden_bd, jax.lax.dynamic_update_slice_in_dim(routing_bsmk, routed_bcmk, start, axis=1)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("out_len",), donate_argnums=(3, 12))
def _decode(
    graphdef,
    state,
    expert_weights,
    cache,
    last_hidden_bd,
    lengths_b,
    max_new_b,
    temperature_b,
    top_p_b,
    top_k_b,
    stops_bs,
    seeds_b3,
    routing_bsmk,
    *,
    out_len,
):
    """:func:`decode_loop` compiled (with the policy log-probs), the model passed as ``nnx.split``; the cache
    and the routing record donated."""
    model = nnx.merge(graphdef, state)
    return decode_loop(
        model,
        expert_weights,
        cache,
        last_hidden_bd,
        lengths_b,
        max_new_b,
        temperature_b,
        top_p_b,
        top_k_b,
        stops_bs,
        seeds_b3,
        out_len=out_len,
        with_policy=True,
        routing_bsmk=routing_bsmk,
    )


def stream_keys(seeds_b3: jax.Array) -> jax.Array:
    """One typed PRNG key per row from uint32 (seed lo, seed hi, stream) [B, 3] (:class:`SamplingSpec`); token j of
    the row draws with ``fold_in(key, j)``."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(jax.random.key(s[0]), s[1]), s[2]))(seeds_b3)


def draw_tokens(logits_bv, temperature_b, top_p_b, top_k_b, step_keys_b, *, with_policy: bool):
    """One token per row from its sampling distribution (``qlx.rollout.sampling``) over logits [B, V] (float32).

    Returns (token_b, logprob_b) and, with ``with_policy``, also (policy_logprob_b, log_nucleus_mass_b):
    log pi = log_softmax(z / T)[token] and log S = log pi - log p (the same for every kept token; 0 unfiltered).
    """
    logp_bv = sampling_logprobs(logits_bv, temperature_b, top_p_b, top_k_b)
    token_b, logprob_b = sample_tokens(logp_bv, temperature_b, step_keys_b)
    if not with_policy:
        return token_b, logprob_b
    pi_b = policy_logprobs(logits_bv, temperature_b, token_b)
    filtered_b = (temperature_b > 0) & ((top_p_b < 1) | (top_k_b > 0))
    return token_b, logprob_b, pi_b, jnp.where(filtered_b, pi_b - logprob_b, 0.0)


def decode_loop(
    model,
    expert_weights,
    cache,
    last_hidden_bd,
    lengths_b,
    max_new_b,
    temperature_b,
    top_p_b,
    top_k_b,
    stops_bs,
    seeds_b3,
    *,
    out_len,
    with_policy: bool = False,
    routing_bsmk=None,
):
    """The decode loop after a prefill: returns tokens [B, out_len], log-probs [B, out_len], counts [B],
    stopped-by-token [B] and the final cache (returned so that donated cache buffers are updated in place); with
    ``with_policy`` also the policy log-probs and log nucleus masses [B, out_len] (:class:`GenerateResult`); with
    ``routing_bsmk`` (the prefill's routing record, [B, S, M, k], S >= L_b + out_len) last that record with the
    routed experts of every token the loop fed back (token j at position L_b + j, fed at step j + 1: a row's last
    token is recorded only when the loop ran on after it).

    Row b draws from the hidden state ``last_hidden_bd[b]`` of its prompt (L_b = ``lengths_b[b]`` tokens), with the
    sampling parameters of its row, stop ids ``stops_bs[b]`` (−1 = unused slot), and the random stream
    ``seeds_b3[b]`` (uint32 seed lo, seed hi, stream; see :class:`SamplingSpec`). A row with ``max_new_b[b] == 0``
    draws nothing. A traceable function (the memory agent calls it inside its chunk loop); ``_decode`` is its
    compiled form.
    """
    w_dv = model.lm_head_weight()
    keys_b = stream_keys(seeds_b3)
    batch = lengths_b.shape[0]

    def emit(j, hidden_bd, done_b, stopped_b, count_b, tokens_bn, logprobs_bn, *policy):
        logits_bv = jnp.einsum("bd,dv->bv", hidden_bd, w_dv, preferred_element_type=jnp.float32)
        step_keys_b = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_b, j)
        token_b, logprob_b, *drawn_policy = draw_tokens(
            logits_bv, temperature_b, top_p_b, top_k_b, step_keys_b, with_policy=bool(policy)
        )
        live_b = ~done_b
        tokens_bn = tokens_bn.at[:, j].set(jnp.where(live_b, token_b, 0))
        logprobs_bn = logprobs_bn.at[:, j].set(jnp.where(live_b, logprob_b, 0.0))
        policy = tuple(
            x_bn.at[:, j].set(jnp.where(live_b, x_b, 0.0)) for x_bn, x_b in zip(policy, drawn_policy, strict=True)
        )
        hit_b = live_b & jnp.any(token_b[:, None] == stops_bs, axis=-1)
        count_b = count_b + live_b.astype(jnp.int32)
        done_b = done_b | hit_b | (count_b >= max_new_b)
        return token_b, (done_b, stopped_b | hit_b, count_b, tokens_bn, logprobs_bn, *policy)

    def cond(loop):
        j, _, _, outs, _ = loop
        return (j < out_len) & ~jnp.all(outs[0])

    def body(loop):
        # Step j feeds token j - 1 at position L + j - 1 and draws token j. Step 0 draws from the prefill's last
        # hidden state; its model call runs at position -1 (writes nothing, sees nothing), so the sampling code
        # appears once in the compiled loop.
        j, cache, previous_b, outs, routing = loop
        positions_b1 = jnp.where(j == 0, -1, lengths_b + j - 1)[:, None]
        hidden_b1d, cache, *routed = model.hidden_states(
            previous_b[:, None],
            positions_bt=positions_b1,
            cache=cache,
            expert_weights=expert_weights,
            return_routing=routing is not None,
        )
        if routing is not None:  # row b fed its token j - 1 (it has drawn j tokens): record its routing
            fed_b = (j >= 1) & (outs[2] >= j)
            at_b = jnp.where(fed_b, lengths_b + j - 1, routing.shape[1])
            routing = routing.at[jnp.arange(batch), at_b].set(routed[0][:, 0].astype(routing.dtype), mode="drop")
        hidden_bd = jnp.where(j == 0, last_hidden_bd, hidden_b1d[:, 0])
        token_b, outs = emit(j, hidden_bd, *outs)
        return j + 1, cache, token_b, outs, routing

    outs = (
        max_new_b <= 0,
        jnp.zeros(batch, bool),
        jnp.zeros(batch, jnp.int32),
        jnp.zeros((batch, out_len), jnp.int32),
        *(jnp.zeros((batch, out_len), jnp.float32) for _ in range(3 if with_policy else 1)),
    )
    _, cache, _, (_, stopped_b, count_b, tokens_bn, logprobs_bn, *policy), routing = jax.lax.while_loop(
        cond, body, (jnp.int32(0), cache, jnp.zeros(batch, jnp.int32), outs, routing_bsmk)
    )
    return tokens_bn, logprobs_bn, count_b, stopped_b, cache, *policy, *(() if routing is None else (routing,))


def generate_rows(
    model,
    prompts: Sequence[Sequence[int]],
    specs: Sequence[SamplingSpec],
    *,
    prefill_chunk: int = 512,
    max_sequences: int = 0,
    policy_version: int = 0,
    return_routing: bool = False,
) -> GenerateResult:
    """Generate for ``prompts[i]`` with ``specs[i]``: the batched engine behind :func:`generate` and the server.

    ``max_sequences`` > 0 generates at most that many sequences per compiled call, in waves, one after another: the
    KV cache and the working set are those of one wave. Each sequence draws from its own spec's stream, so the
    tokens are those of a single call. Every token is tagged ``policy_version`` (the version of ``model``'s
    weights, the caller's count, e.g. the RL step); ``return_routing`` records every token's routed experts
    (``GenerateResult.routed_experts``: a [B, P + T, M, k] record on the devices, 2·M·k bytes per position)."""
    if len(specs) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(specs)} sampling specs")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 (got {prefill_chunk})")
    if max_sequences < 0:
        raise ValueError(f"max_sequences must be >= 0 (0: all in one call; got {max_sequences})")
    if 0 < max_sequences < len(prompts):
        waves = range(0, len(prompts), max_sequences)
        return concatenate_results(
            [
                generate_rows(
                    model,
                    prompts[i : i + max_sequences],
                    specs[i : i + max_sequences],
                    prefill_chunk=prefill_chunk,
                    policy_version=policy_version,
                    return_routing=return_routing,
                )
                for i in waves
            ]
        )
    vocab_size = model.config.vocab_size
    arrays = _check_prompts(prompts, vocab_size)
    for i, spec in enumerate(specs):
        bad = [t for t in spec.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"specs[{i}].stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab_size})")

    limit = model.config.max_position_embeddings
    for i, (ids, spec) in enumerate(zip(arrays, specs, strict=True)):
        if ids.size + spec.max_new_tokens > limit:
            raise ValueError(
                f"prompts[{i}] has {ids.size} tokens; with max_new_tokens={spec.max_new_tokens} it passes the model's "
                f"max_position_embeddings ({limit})"
            )

    n = len(arrays)
    mesh = model.layout.mesh
    axes = batch_axes(model)
    batch = batch_bucket(n, math.prod(mesh.shape[a] for a in axes) if axes else 1)
    longest = max(a.size for a in arrays)
    chunk = min(prefill_chunk, length_bucket(longest))
    prompt_len = round_up(longest, chunk)
    out_len = length_bucket(max(s.max_new_tokens for s in specs), minimum=32)
    cache_len = length_bucket(prompt_len + out_len)
    n_stops = length_bucket(max(1, max(len(s.stop_token_ids) for s in specs)), minimum=1)

    tokens_bp = np.zeros((batch, prompt_len), np.int32)
    lengths_b = np.ones(batch, np.int32)
    max_new_b = np.ones(batch, np.int32)
    temperature_b = np.zeros(batch, np.float32)
    top_p_b = np.ones(batch, np.float32)
    top_k_b = np.zeros(batch, np.int32)
    stops_bs = np.full((batch, n_stops), -1, np.int32)
    seeds = np.zeros((batch, 3), np.uint32)
    for i, (ids, spec) in enumerate(zip(arrays, specs, strict=True)):
        tokens_bp[i, : ids.size] = ids
        lengths_b[i] = ids.size
        max_new_b[i] = spec.max_new_tokens
        temperature_b[i], top_p_b[i], top_k_b[i] = spec.temperature, spec.top_p, spec.top_k
        stops_bs[i, : len(spec.stop_token_ids)] = spec.stop_token_ids
        seeds[i] = (spec.seed % 2**32, (spec.seed >> 32) % 2**32, spec.stream % 2**32)

    graphdef, state = nnx.split(model)
    put = functools.partial(put_batch, mesh=mesh, batch_axes=axes)
    cache = _init_cache(graphdef, state, batch, cache_len)
    expert_weights = _expert_weights(graphdef, state)
    last_hidden_bd = put(np.zeros((batch, model.config.hidden_size), jnp.dtype(model.config.dtype)))
    lengths_dev = put(lengths_b)
    routing = None
    if return_routing:
        c = model.config
        shape = (batch, prompt_len + out_len, c.num_moe_layers, c.num_experts_per_tok)
        routing = _routing_record(shape, routing_dtype(c.num_experts), batch_sharding(4, mesh=mesh, batch_axes=axes))
    for start in range(0, prompt_len, chunk):
        span = min(cache_len, 1 << (start + chunk - 1).bit_length())
        cache, last_hidden_bd, *recorded = _prefill_chunk(
            graphdef,
            state,
            expert_weights,
            cache,
            last_hidden_bd,
            put(tokens_bp[:, start : start + chunk]),
            start,
            lengths_dev,
            routing,
            span=span,
        )
        routing = recorded[0] if recorded else None
    out_tokens, out_logprobs, out_lengths, stopped, _, out_policy, out_mass, *recorded = _decode(
        graphdef,
        state,
        expert_weights,
        cache,
        last_hidden_bd,
        lengths_dev,
        put(max_new_b),
        put(temperature_b),
        put(top_p_b),
        put(top_k_b),
        put(stops_bs),
        put(seeds),
        routing,
        out_len=out_len,
    )
    width = max(s.max_new_tokens for s in specs)
    out_tokens, out_logprobs, out_lengths, stopped, out_policy, out_mass = (
        to_host(x) for x in (out_tokens, out_logprobs, out_lengths, stopped, out_policy, out_mass)
    )
    return GenerateResult(
        tokens=out_tokens[:n, :width],
        logprobs=out_logprobs[:n, :width],
        lengths=out_lengths[:n],
        finish_reasons=tuple(FINISH_STOP if s else FINISH_LENGTH for s in stopped[:n]),
        policy_logprobs=out_policy[:n, :width],
        log_nucleus_mass=out_mass[:n, :width],
        policy_versions=np.where(np.arange(width)[None, :] < out_lengths[:n, None], policy_version, 0).astype(np.int32),
        routed_experts=to_host(recorded[0])[:n, : longest + width] if recorded else None,
    )
