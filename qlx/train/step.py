"""One optimizer step: micro-batched gradients with the step-wide token-mean denominator, clipping, AdamW, and the
non-finite guard.

A step batch is a dict of arrays with a leading micro-batch axis M (``[M, b, ...]``):

- ``tokens_bt`` int32 [M, b, T]: prompt then response, right-padded, or several samples per row (packed);
- ``segment_ids_bt``, ``positions_bt`` int32 [M, b, T] (optional): each token's sample (1, 2, ...; 0 padding) and
  its position within the sample (see :mod:`qlx.train.batches`);
- ``start_b`` int32 [M, S]: where each slot's window of response tokens starts (S = b unpacked, one slot per row
  starting at its prompt's length; packed, one slot per response token: see :mod:`qlx.train.batches`);
- ``mask_br`` float32 [M, S, R]: the loss weight of each response token (1 on answer tokens; R = the window);
- plus whatever the loss reads, per slot (``advantages_b`` [M, S], ``old_logp_br`` [M, S, R] in RL);
- ``slot_groups_g`` [M, G] (optional): G groups of rows and slots, each slot reading only its group's rows.

Every loss is written as a sum over tokens, ``numerator = Σ_{m,i,t} ℓ_{m,i,t}``, and the step divides by
``denominator = Σ mask`` over the *whole step*, not per micro-batch:

    loss = Σ_m numerator_m / denominator,     grads = Σ_m ∇numerator_m / denominator

so k micro-batches give the same update as one batch (exact token-mean, never a mean of means). A step whose loss
or gradient norm is not finite leaves parameters and optimizer state unchanged and reports why.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qlx.mesh import spec_axes
from qlx.models.sharding import Layout, spec_for
from qlx.rl.logprobs import token_logprobs_and_entropy
from qlx.train.batches import ROUTING, SLOT_GROUPS

LossSum = Callable[[jax.Array, jax.Array, dict], tuple[jax.Array, dict]]
"""``(logp_br, entropy_br, micro_batch) -> (numerator, {name: sum})``: a loss as a sum over tokens."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """The static graph of a model; parameters and the other model state travel as arrays.

    ``policy.model(params, rest)`` rebuilds the NNX module around the given arrays without copying them, so rollouts
    and training read the same device buffers.
    """

    graphdef: nnx.GraphDef

    @staticmethod
    def split(model: nnx.Module) -> tuple[Policy, nnx.State, nnx.State]:
        """(policy, params, rest): trainable ``nnx.Param`` arrays and every other variable of the model."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return Policy(graphdef), params, rest

    def model(self, params: nnx.State, rest: nnx.State) -> nnx.Module:
        return nnx.merge(self.graphdef, params, rest)


def response_window(
    tokens_bt: jax.Array, start_b: jax.Array, window: int, groups: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Indices of the positions that predict each slot's response tokens, and those tokens: ([S, R], [S, R]) int32.

    ``start_b`` [S] holds K = S / b slots per row: slot s's window starts at token ``start_b[s]`` of row s // K
    (unpacked: K = 1 and start is the prompt length; packed: see :mod:`qlx.train.batches`), the rows read as one
    flat sequence. The rows and slots form ``groups`` G equal groups (the batch mesh shards) and a slot's window lies
    in its group's rows, so the indices are into its group's (b / G)·T tokens: the gather stays on the shard.
    Position ``p - 1`` predicts token ``p``; indices past the group are clamped (their mask is 0).
    """
    rows, length = tokens_bt.shape
    slots = start_b.shape[0]
    if rows % groups or slots % groups:
        raise ValueError(f"{rows} rows and {slots} slots do not split into {groups} batch-shard groups")
    k, span = slots // rows, rows // groups * length
    s = jnp.arange(slots)
    base_s = (s // k) * length + start_b - (s // (slots // groups)) * span
    pred_sr = jnp.clip(base_s[:, None] - 1 + jnp.arange(window)[None, :], 0, span - 1)
    targets_sr = _take_grouped(tokens_bt.reshape(groups, span), jnp.clip(pred_sr + 1, 0, span - 1))
    return pred_sr, targets_sr


def _take_grouped(values_gn, index_sr: jax.Array) -> jax.Array:
    """``values_gn[g][index_sr[s]]`` for the slots s of group g (S / G slots per group, in order): [S, R, ...]."""
    groups = values_gn.shape[0]
    index_gsr = index_sr.reshape(groups, -1, *index_sr.shape[1:])
    taken = jax.vmap(lambda values, index: jnp.take(values, index, axis=0))(values_gn, index_gsr)
    return taken.reshape(index_sr.shape + values_gn.shape[2:])


def response_logprobs(model, batch: dict, *, temperature: float, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Log-prob of each response token and the entropy of its next-token distribution at ``temperature``: [S, R].

    Packed rows (``segment_ids_bt``, ``positions_bt``: see :mod:`qlx.train.batches`) attend within their segment
    and restart RoPE at each sample; a batch with ``routing_btmk`` (``qlx.train.batches.ROUTING``) replays that
    routing in the MoE layers (``rl.routing_replay``). Only the response windows' hidden states reach the vocabulary
    projection (no [b, T, V] array): they are gathered within each group of rows and slots
    :func:`qlx.train.batches.micro_batches` laid out (``slot_groups_g``: one per batch shard of the mesh, so the
    gather stays on the device), then split over the devices for the projection (:func:`sharded_logprobs`).
    """
    tokens_bt, start_b, mask_br = batch["tokens_bt"], batch["start_b"], batch["mask_br"]
    hidden_btd = model.hidden_states(
        tokens_bt,
        positions_bt=batch.get("positions_bt"),
        segment_ids_bt=batch.get("segment_ids_bt"),
        routing_replay=batch.get(ROUTING),
    )
    groups = batch[SLOT_GROUPS].shape[-1] if SLOT_GROUPS in batch else 1
    pred_sr, targets_sr = response_window(tokens_bt, start_b, mask_br.shape[1], groups)
    hidden_srd = _take_grouped(hidden_btd.reshape(groups, -1, hidden_btd.shape[-1]), pred_sr)
    kw = {"temperature": temperature, "chunk": chunk}
    if model.layout.mesh is None:
        return token_logprobs_and_entropy(hidden_srd, model.lm_head_weight(), targets_sr, mask_br, **kw)
    head_dv = model.lm_head_weight(cast=False)
    return sharded_logprobs(model.layout, hidden_srd, head_dv, targets_sr, mask_br, dtype=hidden_srd.dtype, **kw)


def logprob_token_axes(mesh_shape: Mapping[str, int], rules: Mapping, n: int) -> tuple[str, ...]:
    """Mesh axes (``mesh_shape``: name -> size, in mesh order) that split ``n`` response tokens for the vocabulary
    projection: those the ``rules`` give "batch", then "length", then every other axis, each kept while the running
    product of sizes divides ``n`` (size-1 axes dropped)."""
    named = [a for name in ("batch", "length") for a in rules.get(name, ())]
    axes: list[str] = []
    for axis in dict.fromkeys([*named, *mesh_shape]):
        if mesh_shape[axis] > 1 and n % (math.prod(mesh_shape[a] for a in axes) * mesh_shape[axis]) == 0:
            axes.append(axis)
    return tuple(axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _gather_head(w_local, dtype, dims: tuple[tuple[str, ...], ...], token_axes: tuple[str, ...]):
    """The whole [D, V] head in ``dtype`` from this device's block (``dims``: the token axes splitting each
    dimension), typed to vary over the token axes (each device adds its own tokens' share of ∂W).

    Backward, in the block's dtype (float32 parameters: a 16-bit sum over tens of devices would round every partial
    sum): the shares are summed over the token axes, ``psum_scatter`` over those that split the head (each device
    keeps its block), ``psum`` over the others."""
    w = w_local.astype(dtype)
    for dim, axes in enumerate(dims):
        if axes:
            w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
    split = {a for axes in dims for a in axes}
    return jax.lax.pcast(w, tuple(a for a in token_axes if a not in split), to="varying")


def _gather_head_fwd(w_local, dtype, dims, token_axes):
    return _gather_head(w_local, dtype, dims, token_axes), jnp.zeros((0,), w_local.dtype)  # carries the dtype


def _gather_head_bwd(dtype, dims, token_axes, like, g):
    g = g.astype(like.dtype)
    split = {a for axes in dims for a in axes}
    rest = tuple(a for a in token_axes if a not in split)
    if rest:
        g = jax.lax.psum(g, rest)
    for dim, axes in enumerate(dims):
        if axes:
            g = jax.lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)
    # reduced here, once per micro-batch: left alone, XLA moves the reduction out of the micro-batch loop and
    # carries an unreduced float32 [D, V] accumulator through it instead
    return (jax.lax.optimization_barrier(g),)


_gather_head.defvjp(_gather_head_fwd, _gather_head_bwd)


def sharded_logprobs(
    layout: Layout, hidden_srd, lm_head_dv, targets_sr, mask_sr, *, dtype, temperature: float, chunk: int
):
    """:func:`qlx.rl.logprobs.token_logprobs_and_entropy` of the N = S·R response tokens split over the mesh
    (:func:`logprob_token_axes`): each device projects its N / shards tokens onto the whole vocabulary with the
    [D, V] head gathered inside in ``dtype`` (FSDP: the head arrives in its parameter layout and dtype, ``embed`` x
    ``vocab`` less any axis that does not split the tokens). Returns (logp [S, R], entropy [S, R]) float32.

    Left to XLA's partitioner, the window gather (data-dependent indices) comes back replicated, and every device ran
    the projection, its float32 ∂h [N, D] and tiles over all N tokens (on v5p at stage 1: 196,608 tokens, 3 GiB of
    temporaries and 64x the FLOPs). ∂W is each device's share, reduce-scattered in float32 to the head's layout
    (:func:`_gather_head`).
    """
    s, r, d = hidden_srd.shape
    mesh = layout.mesh
    axes = logprob_token_axes(mesh.shape, dict(layout.rules), s * r)
    head_spec = spec_for(lm_head_dv.shape, ("embed", "vocab"), mesh, dict(layout.rules))
    dims = tuple(tuple(a for a in spec_axes(entry) if a in axes) for entry in head_spec)
    rows, tokens = PartitionSpec(axes, None), PartitionSpec(axes)
    hidden_nd = jax.lax.with_sharding_constraint(hidden_srd.reshape(s * r, d), NamedSharding(mesh, rows))

    # the head tied to the micro-batch, so XLA cannot hoist its gather out of the micro-batch loop (and hold the
    # whole head through every layer's backward)
    hidden_nd, lm_head_dv = jax.lax.optimization_barrier((hidden_nd, lm_head_dv))

    def local(h_nd, w_local, y_n, m_n):
        w_dv = _gather_head(w_local, dtype, dims, axes)
        return token_logprobs_and_entropy(h_nd, w_dv, y_n, m_n, temperature=temperature, chunk=chunk)

    logp_n, ent_n = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, PartitionSpec(*(d_ or None for d_ in dims)), tokens, tokens),
        out_specs=(tokens, tokens),
    )(hidden_nd, lm_head_dv, targets_sr.reshape(s * r), mask_sr.reshape(s * r))
    return logp_n.reshape(s, r), ent_n.reshape(s, r)


def sft_loss_sum(logp_br: jax.Array, entropy_br: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    """Cross-entropy on answer tokens as a sum: ``−Σ mask · log p``; also sums the entropy."""
    mask_br = batch["mask_br"]
    return -jnp.sum(mask_br * logp_br), {"entropy_sum": jnp.sum(mask_br * entropy_br)}


def accumulate_gradients(
    policy: Policy, params, rest, micro_batches: dict, denominator, loss_sum: LossSum, **logprob_kw
):
    """Σ over micro-batches (axis 0) of the loss numerator and its gradient, divided by ``denominator``.

    Returns (loss, grads, aux) where aux holds the sums the loss reported, summed over micro-batches.
    """

    def numerator(p, micro_batch):
        logp_br, entropy_br = response_logprobs(policy.model(p, rest), micro_batch, **logprob_kw)
        return loss_sum(logp_br, entropy_br, micro_batch)

    grad_fn = jax.value_and_grad(numerator, has_aux=True)

    def body(carry, micro_batch):
        num_acc, grad_acc, aux_acc = carry
        (num, aux), grads = grad_fn(params, micro_batch)
        grad_acc = jax.tree.map(jnp.add, grad_acc, grads)
        aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
        return (num_acc + num, grad_acc, aux_acc), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    aux_shape = jax.eval_shape(lambda p, mb: numerator(p, mb)[1], params, first)  # traced args: remat-safe
    init = (
        jnp.zeros((), jnp.float32),
        jax.tree.map(jnp.zeros_like, params),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
    )
    (num, grads, aux), _ = jax.lax.scan(body, init, micro_batches)
    scale = 1.0 / jnp.maximum(denominator, 1.0)
    return num * scale, jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), aux


def make_train_step(
    policy: Policy,
    optimizer: optax.GradientTransformation,
    loss_sum: LossSum,
    *,
    temperature: float,
    chunk: int,
    shardings: tuple | None = None,
):
    """The compiled step ``(params, opt_state, rest, micro_batches, denominator) -> (params, opt_state, metrics)``.

    A step whose loss or gradient norm is not finite leaves parameters and optimizer state unchanged.
    ``params`` and ``opt_state`` are donated (their buffers are reused for the results). ``shardings`` =
    (param shardings, optimizer-state shardings, replicated) pins the outputs to the layout the inputs have, so
    every step (first, later, or right after a restore) runs the same compiled program. metrics: loss, grad_norm
    (before clipping), finite_loss, finite_grad (booleans), and the loss's aux sums.
    """

    def step(params, opt_state, rest, micro_batches: dict, denominator):
        loss, grads, aux = accumulate_gradients(
            policy, params, rest, micro_batches, denominator, loss_sum, temperature=temperature, chunk=chunk
        )
        grad_norm = optax.tree.norm(grads)
        finite_loss, finite_grad = jnp.isfinite(loss), jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = finite_loss & finite_grad
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite_loss": finite_loss, "finite_grad": finite_grad, **aux}
        return keep(new_params, params), keep(new_opt_state, opt_state), metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=shardings)


@functools.partial(jax.jit, static_argnames=("policy", "temperature", "chunk"))
def forward_logprobs(params, rest, micro_batches: dict, *, policy: Policy, temperature: float, chunk: int):
    """Log-probs and entropy of the response tokens under ``params`` (no gradient): ([M, b, R], [M, b, R])."""
    model = policy.model(params, rest)
    return jax.lax.map(
        lambda micro_batch: response_logprobs(model, micro_batch, temperature=temperature, chunk=chunk), micro_batches
    )


def nonfinite_reason(metrics: dict) -> str | None:
    """Why a step was skipped ("loss is nan", "gradient norm is inf", ...), or None when it was applied."""
    reasons = []
    if not bool(metrics["finite_loss"]):
        reasons.append(f"loss is {float(metrics['loss'])}")
    if not bool(metrics["finite_grad"]):
        reasons.append(f"gradient norm is {float(metrics['grad_norm'])}")
    return "; ".join(reasons) or None
