"""Mixture-of-experts routing, the Switch load-balancing loss, and the expert-compute dispatch.

Routing is Hugging Face Qwen3-MoE's: softmax over all experts in float32, top-k, optionally renormalised
(``norm_topk_prob``). Expert compute is dropless and grouped by expert, with a backend per platform
(``ModelConfig.moe_backend``):
- ``"ragged"``: sort assignments by expert and run ``jax.lax.ragged_dot`` (TPU / GPU grouped matmul);
- ``"blocked"``: the sort-by-expert fixed-block scan of :mod:`qlx.models.moe_blocked` (fast on CPU);
- ``"auto"``: ``"blocked"`` on CPU, ``"ragged"`` elsewhere.
:func:`expert_outputs_reference` (a per-assignment weight gather) is the plain reference both are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlx.models.moe_blocked import ExpertWeights, experts_blocked, split_experts

MOE_BACKENDS = ("auto", "ragged", "blocked")


def route(
    router_logits_te: jax.Array, top_k: int, normalize: bool, replay_tk: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k routing: probs = softmax(logits) (float32); weights, experts = top_k(probs); renormalise if normalize.

    replay_tk (int [T, k], optional): routing replay (R3, "rollout routing replay"): token t uses the experts
    ``replay_tk[t]`` (those the rollout engine chose for it) instead of its own top-k, with weights
    probs[t, replay_tk[t]] (renormalised if normalize), so the router still gets its gradient; a row whose first id
    is negative (nothing recorded) routes by its own top-k. Replaying a token's own top-k gives exactly its own
    routing. Returns weights [T, k] (float32), experts [T, k] (int32) and probs [T, E] (float32).
    """
    probs_te = jax.nn.softmax(router_logits_te.astype(jnp.float32), axis=-1)
    weights_tk, experts_tk = jax.lax.top_k(probs_te, top_k)
    if replay_tk is not None:
        experts_tk = jnp.where(replay_tk[:, :1] >= 0, replay_tk.astype(experts_tk.dtype), experts_tk)
        weights_tk = jnp.take_along_axis(probs_te, experts_tk, axis=-1)
    if normalize:
        weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
    return weights_tk, experts_tk.astype(jnp.int32), probs_te


def router_stats(
    experts_tk: jax.Array, probs_te: jax.Array, valid_t: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-expert assignment counts [E] and summed router probabilities [E] of one MoE layer (float32), over the
    tokens ``valid_t`` (bool [T], None: all) marks: padding of packed or padded rows counts for nothing."""
    num_experts = probs_te.shape[-1]
    weight_t = jnp.ones(probs_te.shape[:1], jnp.float32) if valid_t is None else valid_t.astype(jnp.float32)
    counts_e = jnp.einsum("t,tke->e", weight_t, jax.nn.one_hot(experts_tk, num_experts, dtype=jnp.float32))
    return counts_e, jnp.einsum("t,te->e", weight_t, probs_te)


def load_balancing_loss(counts_e: jax.Array, prob_sum_e: jax.Array, num_rows, num_experts: int) -> jax.Array:
    """Switch load-balancing loss as Hugging Face's ``load_balancing_loss_func`` over all MoE layers together.

    loss = E * sum_e (counts_e / N) * (prob_sum_e / N), where counts and probability sums are accumulated over the
    MoE layers and N = tokens x MoE layers (real tokens only when :func:`router_stats` was given the mask, as
    Hugging Face's ``attention_mask`` does). counts_e sum to k per row, so a perfectly balanced router gives k.
    """
    return num_experts * jnp.sum((counts_e / num_rows) * (prob_sum_e / num_rows))


def expert_outputs_reference(x_td, experts_tk, w_gate_up_edgi, w_down_eid):
    """Plain reference: out[t, j] = (silu(x_t Wg[e]) * (x_t Wu[e])) Wd[e] with e = experts[t, j]. Returns [T, k, D].

    w_gate_up [E, D, 2, I] holds Wg = w_gate_up[:, :, 0] and Wu = w_gate_up[:, :, 1]. Gathers a weight copy per
    assignment ([T, k, D, 2, I]), so it is for tests only.
    """
    gate_up = jnp.einsum("td,tkdgi->tkgi", x_td, w_gate_up_edgi[experts_tk])
    hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    return jnp.einsum("tki,tkid->tkd", hidden, w_down_eid[experts_tk])


def expert_outputs_ragged(x_td, experts_tk, w_gate_up_edgi, w_down_eid):
    """Each assignment's expert output [T, k, D] with rows sorted by expert and ``jax.lax.ragged_dot``.

    Assignments with an expert id outside [0, E) sort last, past every group, where ``ragged_dot`` writes zeros."""
    t, k = experts_tk.shape
    num_experts, d, _, i = w_gate_up_edgi.shape
    flat_a = experts_tk.reshape(t * k)
    flat_a = jnp.where((flat_a >= 0) & (flat_a < num_experts), flat_a, num_experts)
    order = jnp.argsort(flat_a, stable=True)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat_a].add(1, mode="drop")
    x_sorted = x_td[order // k]
    gate_up = jax.lax.ragged_dot(x_sorted, w_gate_up_edgi.reshape(num_experts, d, 2 * i), group_sizes)
    y_sorted = jax.lax.ragged_dot(jax.nn.silu(gate_up[:, :i]) * gate_up[:, i:], w_down_eid, group_sizes)
    inverse = jnp.zeros((t * k,), jnp.int32).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
    return y_sorted[inverse].reshape(t, k, -1)


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"blocked"`` on CPU, ``"ragged"`` on TPU / GPU; other names pass through after a check."""
    if backend not in MOE_BACKENDS:
        raise ValueError(f"model.moe_backend: unknown backend {backend!r}; valid values: {', '.join(MOE_BACKENDS)}")
    if backend == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged"
    return backend


def experts(
    x_td,
    weights_tk,
    experts_tk,
    w_gate_up_edgi,
    w_down_eid,
    *,
    backend: str = "auto",
    block_size: int = 128,
    expert_weights: ExpertWeights | None = None,
):
    """Dropless MoE expert compute: y[t] = sum_j weights[t, j] * SwiGLU_{experts[t, j]}(x[t]). Returns [T, D].

    x [T, D]; weights [T, k]; experts [T, k] (int); w_gate_up [E, D, 2, I] (gate, up); w_down [E, I, D].
    expert_weights: ``split_experts(w_gate_up, w_down)`` computed once by the caller (the blocked backend splits
    the stacked weights itself otherwise; the ragged backend ignores it).
    An expert id outside [0, E) marks an assignment without an expert here (padding, or one that expert
    parallelism sends elsewhere): it adds nothing to y, gets zero gradients and no matmul work in either backend.
    """
    if resolve_backend(backend) == "blocked":
        if expert_weights is None:
            expert_weights = split_experts(w_gate_up_edgi, w_down_eid)
        return experts_blocked(x_td, weights_tk, experts_tk, expert_weights, block_size=block_size)
    out_tkd = expert_outputs_ragged(x_td, experts_tk, w_gate_up_edgi, w_down_eid)
    return jnp.einsum("tkd,tk->td", out_tkd, weights_tk.astype(out_tkd.dtype))
