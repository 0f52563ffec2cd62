"""The memory agent: every update turn inside one compiled ``lax.scan`` over the chunk index, then the final turn.

For B = questions × samples trajectories (row r = question q · G + sample g) and documents of K_r chunks:

    memory_0 = ids of the template's no_memory text
    for t in 0 .. K_max − 1   (lax.scan over a window of W chunks; the host feeds window after window)
        row r is active iff t < K_r; an inactive row keeps its memory and emits no turn
        prompt_t  = update pieces ‖ question ids ‖ memory_t ids ‖ chunk_t ids     (assembled on device, [B, S])
        response  = chunked prefill of prompt_t into a KV cache + bounded decode  (qlx.rollout's prefill_step and
                    decode_loop), random stream (seed, turn t, trajectory r)
        memory_{t+1} = carried ids of the response (qlx.memory.carry), capped at max_memory_tokens
    final turn: final pieces ‖ question ‖ instructions ‖ memory_K, with its own cap, stream (seed, FINAL_TURN, r)

Shapes depend on the config and the padded batch only, never on K: a 4-chunk and a 64-chunk document run the same
executables (one per window shape, one for the final turn). The document ids stay on the host; device memory holds
one window [W, B, C] of ids, the KV cache of one turn, and the window's outputs, which are copied back to the host
while the next window runs.

:func:`run_reference` is the same agent as a Python loop over turns calling ``qlx.rollout.generate_rows`` with
the same random streams (each turn batching only the active rows, as MemAgent's loop does): the oracle of the tests.
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
from tqdm import tqdm

from qlx.data.tokenizer import ENDOFTEXT, IM_END
from qlx.memory.assemble import assemble_bs
from qlx.memory.carry import TagPatterns, carried_memory, carried_memory_bm
from qlx.memory.config import MemoryAgentConfig
from qlx.memory.templates import TokenTemplate, TurnTemplate, assemble_ids, tokenize_template
from qlx.rollout.buckets import batch_bucket, length_bucket, round_up
from qlx.rollout.engine import SamplingSpec, batch_axes, decode_loop, generate_rows, prefill_step, put_batch

FINAL_TURN = 2**32 - 1  # the turn number of the final turn in the random stream (seed, turn, trajectory)


@dataclasses.dataclass(frozen=True)
class MemoryRollout:
    """Every turn of B trajectories as conversations, on a [T = K_max + 1, B] grid (turn t of row r; the final turn
    of every row at t = K_max).

    prompt_ids: int32 [T, B, S] the exact prompt ids of each turn (0 past ``prompt_lengths``).
    prompt_lengths: int32 [T, B].
    response_ids: int32 [T, B, R] the sampled ids (a final stop token included; 0 past ``response_lengths``).
    response_lengths: int32 [T, B].
    logprobs: float32 [T, B, R] log-probability of each sampled id under the distribution it was drawn from
        (``qlx.rollout.sampling_logprobs``), computed on exactly ``prompt_ids`` ‖ ``response_ids``.
    valid: bool [T, B] turn t of row r happened (t < K_r, or the final turn).
    trajectory: int32 [T, B] the row each turn belongs to (r). final: bool [T, B] the final-answer turn.
    stopped: bool [T, B] the turn ended with a stop token (else it reached its cap).
    memories: [T][B] text of the memory carried after update turn t (None where no update turn ran).
    answers: [B] text of the final answer (its stop token removed).
    question_index: int32 [B] the question of each row (r // samples_per_question).
    num_chunks: int32 [B] K_r. document_tokens: int32 [B] tokens read (after centre truncation).
    """

    prompt_ids: np.ndarray
    prompt_lengths: np.ndarray
    response_ids: np.ndarray
    response_lengths: np.ndarray
    logprobs: np.ndarray
    valid: np.ndarray
    trajectory: np.ndarray
    final: np.ndarray
    stopped: np.ndarray
    memories: tuple[tuple[str | None, ...], ...]
    answers: tuple[str, ...]
    question_index: np.ndarray
    num_chunks: np.ndarray
    document_tokens: np.ndarray

    @property
    def response_mask(self) -> np.ndarray:
        """bool [T, B, R]: True on the sampled tokens of valid turns."""
        positions = np.arange(self.response_ids.shape[2])[None, None, :]
        return self.valid[:, :, None] & (positions < self.response_lengths[:, :, None])


@dataclasses.dataclass(frozen=True)
class _TurnPlan:
    """Static shapes of one kind of turn: the template, the prompt buffer, the decode cap and buffer, the cache."""

    turn: TurnTemplate
    width: int
    max_new: int
    out_len: int
    cache_len: int
    prefill_chunk: int


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one agent configuration (hashable: it keys the compiled functions)."""

    update: _TurnPlan
    final: _TurnPlan
    tags: TagPatterns
    carry: str
    max_memory_tokens: int
    memory_width: int
    no_memory: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The host side of a batch: tokenised questions, instructions and documents, and the sampling arrays."""

    plan: _Plan
    rows: int
    batch: int
    question_ids: list[list[int]]
    instruction_ids: list[list[int]]
    documents: list[np.ndarray]
    question_index: np.ndarray
    stop_token_ids: tuple[int, ...]


def _turn_plan(turn: TurnTemplate, slot_widths: dict[str, int], max_new: int, prefill_chunk: int) -> _TurnPlan:
    chunk = min(prefill_chunk, length_bucket(turn.literal_tokens + sum(slot_widths[s] for s in turn.slots)))
    width = round_up(turn.literal_tokens + sum(slot_widths[s] for s in turn.slots), chunk)
    out_len = length_bucket(max_new, minimum=32)
    return _TurnPlan(turn, width, max_new, out_len, length_bucket(width + out_len), chunk)


def turn_plans(template: TokenTemplate, config: MemoryAgentConfig, limit: int):
    """(memory width, update turn plan, final turn plan) of ``config``; a ValueError when a turn's window
    (template + slots + generation cap) exceeds ``limit`` positions (the model's max_position_embeddings)."""
    memory_width = max(config.max_memory_tokens, len(template.no_memory))
    widths = {
        "question": config.max_question_tokens,
        "instructions": config.max_instruction_tokens,
        "memory": memory_width,
        "chunk": config.chunk_tokens,
    }
    update = _turn_plan(template.update, widths, config.memory_tokens, config.prefill_chunk)
    final = _turn_plan(template.final, widths, config.final_tokens, config.prefill_chunk)
    for name, plan, cap in (("update", update, "memory_tokens"), ("final", final, "final_tokens")):
        need = plan.turn.literal_tokens + sum(widths[s] for s in plan.turn.slots) + plan.max_new
        if need > limit:
            sizes = " + ".join(f"{s} {widths[s]}" for s in plan.turn.slots)
            raise ValueError(
                f"a {name} turn needs up to {need} positions (template {plan.turn.literal_tokens} + {sizes} + "
                f"{cap} {plan.max_new}), more than the model's max_position_embeddings ({limit}); lower "
                "chunk_tokens / max_memory_tokens / max_question_tokens or the generation cap"
            )
    return memory_width, update, final


def _normalise_questions(questions) -> list[tuple[str, str]]:
    if isinstance(questions, str) or not isinstance(questions, Sequence) or len(questions) == 0:
        raise ValueError("questions must be a non-empty list of strings or (question, instructions) pairs")
    out = []
    for i, q in enumerate(questions):
        if isinstance(q, str):
            q = (q, "")
        if not (isinstance(q, tuple | list) and len(q) == 2 and all(isinstance(x, str) for x in q)):
            raise ValueError(f"questions[{i}] must be a string or a (question, instructions) pair of strings")
        if not q[0].strip():
            raise ValueError(f"questions[{i}] is empty")
        out.append((q[0], q[1]))
    return out


def _document_ids(tokenizer, document, index: int, vocab_size: int) -> np.ndarray:
    if isinstance(document, str):
        ids = np.asarray(tokenizer.encode(document), np.int64)
    else:
        ids = np.asarray(document)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"documents[{index}] must be a string or a 1-D sequence of integer token ids")
    if ids.size == 0:
        raise ValueError(f"documents[{index}] is empty (0 tokens): there is nothing to read")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        raise ValueError(f"documents[{index}][{bad[0]}] = {ids[bad[0]]} is outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int32)


def centre_truncate(ids: np.ndarray, keep: int | None) -> np.ndarray:
    """The first ⌊keep/2⌋ and last ⌈keep/2⌉ ids of a document longer than ``keep`` (MemAgent's truncation)."""
    if keep is None or ids.size <= keep:
        return ids
    head = keep // 2
    return np.concatenate([ids[:head], ids[ids.size - (keep - head) :]])


def _prepare(model, tokenizer, questions, documents, config: MemoryAgentConfig, samples: int, seed: int) -> _Inputs:
    if not isinstance(config, MemoryAgentConfig):
        raise TypeError(f"config must be a MemoryAgentConfig (got {type(config).__name__})")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples_per_question must be a positive integer (got {samples!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2^32) (got {seed!r})")
    pairs = _normalise_questions(questions)
    if isinstance(documents, str) or len(documents) != len(pairs):
        raise ValueError(f"got {len(pairs)} questions but {len(documents)} documents; pass one document per question")
    vocab_size = model.config.vocab_size
    template: TokenTemplate = tokenize_template(tokenizer, config.memory_template, config.chat_mode)
    has_instructions = "instructions" in template.final.slots
    question_ids, instruction_ids = [], []
    for i, (core, inst) in enumerate(pairs):
        q = tokenizer.encode(core)
        if len(q) > config.max_question_tokens:
            raise ValueError(
                f"questions[{i}] has {len(q)} tokens, more than max_question_tokens ({config.max_question_tokens})"
            )
        ins = tokenizer.encode(inst) if inst else []
        if ins and not has_instructions:
            raise ValueError(
                f"questions[{i}] has instructions but the final template has no {{instructions}} slot to show them"
            )
        if len(ins) > config.max_instruction_tokens:
            raise ValueError(
                f"questions[{i}]: its instructions have {len(ins)} tokens, more than max_instruction_tokens "
                f"({config.max_instruction_tokens})"
            )
        question_ids.append(q)
        instruction_ids.append(ins)
    keep = None if config.max_chunks is None else config.max_chunks * config.chunk_tokens
    docs = [centre_truncate(_document_ids(tokenizer, d, i, vocab_size), keep) for i, d in enumerate(documents)]

    stops = config.stop_token_ids
    if stops is None:
        stops = tuple(t for t in (tokenizer.token_to_id(IM_END), tokenizer.token_to_id(ENDOFTEXT)) if t is not None)
    bad = [t for t in stops if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab_size})")

    memory_width, update, final = turn_plans(template, config, model.config.max_position_embeddings)
    plan = _Plan(
        update=update,
        final=final,
        tags=TagPatterns.build(tokenizer),
        carry=config.carry,
        max_memory_tokens=config.max_memory_tokens,
        memory_width=memory_width,
        no_memory=template.no_memory,
    )
    rows = len(pairs) * samples
    axes = batch_axes(model)
    mesh = model.layout.mesh
    batch = batch_bucket(rows, math.prod(mesh.shape[a] for a in axes) if axes else 1)
    return _Inputs(
        plan=plan,
        rows=rows,
        batch=batch,
        question_ids=question_ids,
        instruction_ids=instruction_ids,
        documents=docs,
        question_index=np.repeat(np.arange(len(pairs), dtype=np.int32), samples),
        stop_token_ids=tuple(stops),
    )


def _padded(rows: list[list[int]], batch: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((batch, width), np.int32)
    lengths = np.zeros(batch, np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


def _turn(model, expert_weights, plan: _TurnPlan, cache, slots, live_b, sampling, stops_bs, seeds_b3):
    """One turn for every row: assemble the prompt, prefill it chunk by chunk, decode up to ``plan.max_new`` tokens
    (rows with ``live_b`` False draw nothing). Returns (cache, prompt_bs, prompt_len_b, tokens_bn, logprobs_bn,
    count_b, stopped_b)."""
    tokens_bs, length_b = assemble_bs(plan.turn, slots, plan.width)
    length_b = jnp.maximum(length_b, 1)
    longest = jnp.max(jnp.where(live_b, length_b, 0))
    hidden_bd = jnp.zeros((tokens_bs.shape[0], model.config.hidden_size), jnp.dtype(model.config.dtype))
    cache = dataclasses.replace(cache, lengths=jnp.zeros_like(cache.lengths))
    chunk = plan.prefill_chunk
    for start in range(0, plan.width, chunk):
        span = min(plan.cache_len, 1 << (start + chunk - 1).bit_length())

        def prefill(args, start=start, span=span):
            return prefill_step(
                model, expert_weights, *args, tokens_bs[:, start : start + chunk], start, length_b, span=span
            )

        cache, hidden_bd = jax.lax.cond(start < longest, prefill, lambda args: args, (cache, hidden_bd))
    max_new_b = jnp.where(live_b, plan.max_new, 0).astype(jnp.int32)
    tokens_bn, logprobs_bn, count_b, stopped_b, cache = decode_loop(
        model,
        expert_weights,
        cache,
        hidden_bd,
        length_b,
        max_new_b,
        *sampling,
        stops_bs,
        seeds_b3,
        out_len=plan.out_len,
    )
    n = plan.max_new
    return cache, tokens_bs, length_b, tokens_bn[:, :n], logprobs_bn[:, :n], count_b, stopped_b


def _seeds_b3(seed_b, turn, trajectory_b):
    return jnp.stack([seed_b, jnp.broadcast_to(turn, seed_b.shape).astype(jnp.uint32), trajectory_b], axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _read_window(graphdef, plan: _Plan, state, carry, chunks_wbc, chunk_len_wb, turn_w, question, sampling, stops_bs,
                 seed_b, trajectory_b):  # fmt: skip
    """``lax.scan`` of update turns over one window of chunks. carry = (cache, memory [B, M], memory lengths [B]).
    Returns (carry, per-turn outputs [W, B, ...]): prompts, prompt lengths, responses, log-probs, response lengths,
    stopped, active, carried memory ids and lengths."""
    model = nnx.merge(graphdef, state)
    expert_weights = model.expert_weights()
    up = plan.update

    def step(carry, xs):
        cache, memory_bm, memory_len_b = carry
        chunk_bc, chunk_len_b, turn = xs
        live_b = chunk_len_b > 0

        def run_turn(cache):
            slots = {"question": question, "memory": (memory_bm, memory_len_b), "chunk": (chunk_bc, chunk_len_b)}
            seeds = _seeds_b3(seed_b, turn, trajectory_b)
            cache, *out = _turn(model, expert_weights, up, cache, slots, live_b, sampling, stops_bs, seeds)
            tokens_bn, count_b, stopped_b = out[2], out[4], out[5]
            body_b = count_b - stopped_b.astype(jnp.int32)
            carried = carried_memory_bm(
                tokens_bn, body_b, plan.tags, plan.carry, plan.max_memory_tokens, plan.memory_width, plan.no_memory
            )
            return cache, (*out, *carried)

        # No lax.cond around the turn: a step with no live row already skips every prefill chunk and decodes
        # nothing (max_new 0), and a conditional around the decode loop costs a copy of the KV cache per token.
        cache, out = run_turn(cache)
        memory_bm = jnp.where(live_b[:, None], out[-2], memory_bm)
        memory_len_b = jnp.where(live_b, out[-1], memory_len_b)
        return (cache, memory_bm, memory_len_b), (*out[:-2], live_b, memory_bm, memory_len_b)

    return jax.lax.scan(step, carry, (chunks_wbc, chunk_len_wb, turn_w))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _final_turn(graphdef, plan: _Plan, state, memory, question, instructions, live_b, sampling, stops_bs, seed_b,
                trajectory_b):  # fmt: skip
    """The final-answer turn of every live row: prompts, prompt lengths, responses, log-probs, counts, stopped."""
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(live_b.shape[0], plan.final.cache_len)
    slots = {"question": question, "memory": memory, "instructions": instructions}
    seeds = _seeds_b3(seed_b, np.uint32(FINAL_TURN), trajectory_b)
    return _turn(model, model.expert_weights(), plan.final, cache, slots, live_b, sampling, stops_bs, seeds)[1:]


def _sampling_arrays(config: MemoryAgentConfig, inputs: _Inputs, seed: int):
    b = inputs.batch
    sampling = (
        np.full(b, config.temperature, np.float32),
        np.full(b, config.top_p, np.float32),
        np.full(b, config.top_k, np.int32),
    )
    stops = np.full((b, length_bucket(len(inputs.stop_token_ids), minimum=1)), -1, np.int32)
    stops[: inputs.rows, : len(inputs.stop_token_ids)] = inputs.stop_token_ids
    return sampling, stops, np.full(b, seed, np.uint32), np.arange(b, dtype=np.uint32)


def _chunk(document: np.ndarray, t: int, size: int) -> np.ndarray:
    return document[t * size : (t + 1) * size]


def run(
    model,
    tokenizer,
    questions: Sequence[str | tuple[str, str]],
    documents: Sequence[str | Sequence[int]],
    config: MemoryAgentConfig,
    *,
    samples_per_question: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> MemoryRollout:
    """Read each document with the memory agent and answer its question (module docstring).

    Args:
      model: a ``qlx`` Qwen3 model. tokenizer: a ``qlx.data.tokenizer.Tokenizer``.
      questions: per question its text (q_core), or a (q_core, q_inst) pair whose instructions appear only in the
        final turn (the template's ``{instructions}`` slot).
      documents: one per question, as text or as token ids (a 1-D int sequence; long documents are best passed as
        ids, tokenised once by the caller).
      config: a :class:`MemoryAgentConfig`.
      samples_per_question: G trajectories per question (rows q·G … q·G + G − 1).
      seed: in [0, 2^32); turn t of trajectory r samples from the stream (seed, t, r) (final turn: t = FINAL_TURN).
      progress: show a progress bar over the windows of chunks.

    Returns a :class:`MemoryRollout`.
    """
    inputs = _prepare(model, tokenizer, questions, documents, config, samples_per_question, seed)
    args = _DeviceArgs.build(model, inputs, config, seed)
    plan, k_max = inputs.plan, int(args.num_chunks.max())
    graphdef, state = nnx.split(model)
    carry = args.initial_carry(model)
    host_outputs, pending = [], None
    for start in tqdm(range(0, k_max, config.window_chunks), desc="memory agent", unit="window", disable=not progress):
        carry, outputs = _read_window(graphdef, plan, state, carry, *args.window(start), *args.shared)
        if pending is not None:
            host_outputs.append(jax.device_get(pending))
        pending = outputs
    host_outputs.append(jax.device_get(pending))
    _, memory_bm, memory_len_b = carry
    del carry
    final = jax.device_get(_final_turn(graphdef, plan, state, (memory_bm, memory_len_b), *args.final_inputs()))
    update = [np.concatenate([o[k] for o in host_outputs], axis=0)[:k_max, : inputs.rows] for k in range(9)]
    return _rollout(tokenizer, inputs, config, args.num_chunks, update, [x[: inputs.rows] for x in final])


@dataclasses.dataclass
class _DeviceArgs:
    """The device-side arguments of :func:`run`'s compiled functions, and the host windows of chunk ids."""

    inputs: _Inputs
    config: MemoryAgentConfig
    put: object
    put_window: object
    rows_docs: list[np.ndarray]
    num_chunks: np.ndarray
    question: tuple[jax.Array, jax.Array]
    shared: tuple  # question, sampling, stops, seeds, trajectories: the window's arguments after the chunks

    @classmethod
    def build(cls, model, inputs: _Inputs, config: MemoryAgentConfig, seed: int) -> _DeviceArgs:
        mesh, axes, b = model.layout.mesh, batch_axes(model), inputs.batch
        put = functools.partial(put_batch, mesh=mesh, batch_axes=axes)
        put_window = (
            jnp.asarray
            if mesh is None or not axes
            else lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, axes, *(None,) * (x.ndim - 2))))
        )
        sampling, stops, seed_b, trajectory_b = _sampling_arrays(config, inputs, seed)
        rows_docs = [inputs.documents[q] for q in inputs.question_index]
        questions = _padded([inputs.question_ids[q] for q in inputs.question_index], b, config.max_question_tokens)
        question = tuple(map(put, questions))
        shared = (question, tuple(map(put, sampling)), put(stops), put(seed_b), put(trajectory_b))
        num_chunks = np.array([-(-d.size // config.chunk_tokens) for d in rows_docs], np.int32)
        return cls(inputs, config, put, put_window, rows_docs, num_chunks, question, shared)

    def initial_carry(self, model):
        plan, b = self.inputs.plan, self.inputs.batch
        memory_bm, memory_b = _padded([list(plan.no_memory)] * b, b, plan.memory_width)
        return model.init_cache(b, plan.update.cache_len), self.put(memory_bm), self.put(memory_b)

    def window(self, start: int):
        """Chunk ids [W, B, C], chunk lengths [W, B] (0: row inactive) and turn numbers [W] of chunks start.."""
        w, c, b = self.config.window_chunks, self.config.chunk_tokens, self.inputs.batch
        chunks = np.zeros((w, b, c), np.int32)
        lengths = np.zeros((w, b), np.int32)
        for t in range(start, start + w):
            for r, doc in enumerate(self.rows_docs):
                piece = _chunk(doc, t, c)
                chunks[t - start, r, : piece.size] = piece
                lengths[t - start, r] = piece.size
        turns = jnp.asarray(np.arange(start, start + w, dtype=np.uint32))
        return self.put_window(chunks), self.put_window(lengths), turns

    def final_inputs(self):
        """The final turn's arguments after the memory: question, instructions, live rows, sampling, seeds."""
        inputs, b = self.inputs, self.inputs.batch
        ids = [inputs.instruction_ids[q] for q in inputs.question_index]
        instructions = tuple(map(self.put, _padded(ids, b, self.config.max_instruction_tokens)))
        question, sampling, stops, seed_b, trajectory_b = self.shared
        live_b = self.put(np.arange(b) < inputs.rows)
        return question, instructions, live_b, sampling, stops, seed_b, trajectory_b


def memory_analysis(
    model, tokenizer, questions, documents, config: MemoryAgentConfig, *, samples_per_question: int = 1
) -> dict[str, dict[str, int]]:
    """Compiled device memory (bytes) of the two executables :func:`run` uses for this batch: ``"window"`` (the
    scan over ``window_chunks`` update turns) and ``"final"``, each as {argument, output, temp, alias, total}
    (``total`` = argument + output + temp − alias). Nothing here depends on the documents' lengths."""
    inputs = _prepare(model, tokenizer, questions, documents, config, samples_per_question, 0)
    args = _DeviceArgs.build(model, inputs, config, 0)
    graphdef, state = nnx.split(model)
    carry = jax.eval_shape(lambda: args.initial_carry(model))
    plan = inputs.plan
    window = _read_window.lower(graphdef, plan, state, carry, *args.window(0), *args.shared).compile()
    final = _final_turn.lower(graphdef, plan, state, carry[1:], *args.final_inputs()).compile()

    def stats(compiled) -> dict[str, int]:
        m = compiled.memory_analysis()
        out = {
            "argument": m.argument_size_in_bytes,
            "output": m.output_size_in_bytes,
            "temp": m.temp_size_in_bytes,
            "alias": m.alias_size_in_bytes,
        }
        out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
        return out

    return {"window": stats(window), "final": stats(final)}


def _grid(update_kbn: np.ndarray, final_bn: np.ndarray, width: int) -> np.ndarray:
    """[K + 1, B, width]: the update turns' rows, then the final turn's, zero-padded."""
    out = np.zeros((update_kbn.shape[0] + 1, update_kbn.shape[1], width), update_kbn.dtype)
    out[:-1, :, : update_kbn.shape[2]] = update_kbn
    out[-1, :, : final_bn.shape[1]] = final_bn
    return out


def _rollout(tokenizer, inputs: _Inputs, config, num_chunks, update, final) -> MemoryRollout:
    """Pack the update turns ([K, B, ...] lists: prompts, prompt lengths, responses, log-probs, counts, stopped,
    active, memory ids, memory lengths) and the final turn ([B, ...]) into a MemoryRollout."""
    prompts, prompt_len, responses, logprobs, counts, stopped, active, memory, memory_len = update[:9]
    prompts, responses, logprobs = (np.where(active[:, :, None], x, 0) for x in (prompts, responses, logprobs))
    f_prompts, f_prompt_len, f_responses, f_logprobs, f_counts, f_stopped = final
    k, rows = active.shape
    width = max(prompts.shape[2], f_prompts.shape[1])
    r = max(responses.shape[2], f_responses.shape[1])
    valid = np.concatenate([active, np.ones((1, rows), bool)], axis=0)
    memories = tuple(
        tuple(
            tokenizer.decode(memory[t, i, : memory_len[t, i]].tolist()) if active[t, i] else None for i in range(rows)
        )
        for t in range(k)
    ) + ((None,) * rows,)
    answers = tuple(tokenizer.decode(f_responses[i, : f_counts[i] - int(f_stopped[i])].tolist()) for i in range(rows))
    return MemoryRollout(
        prompt_ids=_grid(prompts, f_prompts, width),
        prompt_lengths=np.concatenate([np.where(active, prompt_len, 0), f_prompt_len[None]], axis=0).astype(np.int32),
        response_ids=_grid(responses, f_responses, r),
        response_lengths=np.concatenate([np.where(active, counts, 0), f_counts[None]], axis=0).astype(np.int32),
        logprobs=_grid(logprobs, f_logprobs, r),
        valid=valid,
        trajectory=np.broadcast_to(np.arange(rows, dtype=np.int32), (k + 1, rows)).copy(),
        final=np.broadcast_to(np.arange(k + 1)[:, None] == k, (k + 1, rows)).copy(),
        stopped=np.concatenate([stopped & active, f_stopped[None]], axis=0),
        memories=memories,
        answers=answers,
        question_index=inputs.question_index[:rows],
        num_chunks=num_chunks,
        document_tokens=np.array([inputs.documents[q].size for q in inputs.question_index], np.int32),
    )


def run_reference(
    model,
    tokenizer,
    questions: Sequence[str | tuple[str, str]],
    documents: Sequence[str | Sequence[int]],
    config: MemoryAgentConfig,
    *,
    samples_per_question: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> MemoryRollout:
    """:func:`run` as a plain loop: per turn, the active rows' prompts are concatenated in Python
    (``qlx.memory.templates.assemble_ids``) and generated by ``qlx.rollout.generate_rows`` (turn t of row r on the
    stream (seed, t, r): ``SamplingSpec(seed=seed + t·2^32, stream=r)``); the memory is carried by the plain
    :func:`qlx.memory.carry.carried_memory`. The oracle of :func:`run` (and MemAgent's loop structure)."""
    inputs = _prepare(model, tokenizer, questions, documents, config, samples_per_question, seed)
    plan, rows = inputs.plan, inputs.rows
    rows_docs = [inputs.documents[q] for q in inputs.question_index]
    questions_ids = [inputs.question_ids[q] for q in inputs.question_index]
    num_chunks = np.array([-(-d.size // config.chunk_tokens) for d in rows_docs], np.int32)
    k_max = int(num_chunks.max())
    up = plan.update
    memory = [list(plan.no_memory) for _ in range(rows)]
    prompts = np.zeros((k_max, rows, up.width), np.int32)
    prompt_len = np.zeros((k_max, rows), np.int32)
    responses = np.zeros((k_max, rows, up.max_new), np.int32)
    logprobs = np.zeros((k_max, rows, up.max_new), np.float32)
    counts = np.zeros((k_max, rows), np.int32)
    stopped = np.zeros((k_max, rows), bool)
    active = np.arange(k_max)[:, None] < num_chunks[None, :]
    memory_ids = np.zeros((k_max, rows, plan.memory_width), np.int32)
    memory_len = np.zeros((k_max, rows), np.int32)

    def spec(max_new: int, turn: int, row: int) -> SamplingSpec:
        return SamplingSpec(
            max_new_tokens=max_new,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            stop_token_ids=inputs.stop_token_ids,
            seed=seed + (turn << 32),
            stream=row,
        )

    for t in tqdm(range(k_max), desc="memory agent (reference)", unit="turn", disable=not progress):
        live = np.flatnonzero(active[t])
        turn_prompts = [
            assemble_ids(
                up.turn,
                {
                    "question": questions_ids[r],
                    "memory": memory[r],
                    "chunk": _chunk(rows_docs[r], t, config.chunk_tokens),
                },
            )
            for r in live
        ]
        result = generate_rows(
            model, turn_prompts, [spec(up.max_new, t, int(r)) for r in live], prefill_chunk=config.prefill_chunk
        )
        for j, r in enumerate(live):
            n = int(result.lengths[j])
            prompts[t, r, : len(turn_prompts[j])] = turn_prompts[j]
            prompt_len[t, r] = len(turn_prompts[j])
            responses[t, r, :n] = result.tokens[j, :n]
            logprobs[t, r, :n] = result.logprobs[j, :n]
            counts[t, r], stopped[t, r] = n, result.finish_reasons[j] == "stop"
            body = result.tokens[j, : n - int(stopped[t, r])].tolist()
            memory[r] = carried_memory(body, plan.tags, plan.carry, plan.max_memory_tokens, plan.no_memory)
            memory_ids[t, r, : len(memory[r])] = memory[r]
            memory_len[t, r] = len(memory[r])

    fin = plan.final
    final_prompts = [
        assemble_ids(
            fin.turn,
            {"question": questions_ids[r], "memory": memory[r], "instructions": inputs.instruction_ids[q]},
        )
        for r, q in enumerate(inputs.question_index)
    ]
    result = generate_rows(
        model,
        final_prompts,
        [spec(fin.max_new, FINAL_TURN, r) for r in range(rows)],
        prefill_chunk=config.prefill_chunk,
    )
    f_prompts, f_prompt_len = _padded(final_prompts, rows, fin.width)
    final = (
        f_prompts,
        f_prompt_len,
        result.tokens,
        result.logprobs,
        result.lengths.astype(np.int32),
        np.array([f == "stop" for f in result.finish_reasons]),
    )
    update = [prompts, prompt_len, responses, logprobs, counts, stopped, active, memory_ids, memory_len]
    return _rollout(tokenizer, inputs, config, num_chunks, update, final)
