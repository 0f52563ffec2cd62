"""Dropless MoE expert compute for CPU: rows sorted by expert into fixed-size blocks, blocks scanned with matmuls.

Each of the T*k (token, expert) assignments is placed in a padded buffer where every block of ``block_size`` rows
belongs to a single expert (each expert's rows are padded up to a multiple of the block size). The number of blocks
is static, ``ceil(T*k / block_size) + E`` (an upper bound), so shapes never depend on the routing; blocks past the
used ones are skipped with ``lax.cond``. A scan over blocks runs the SwiGLU expert MLP with plain dense matmuls on
that block's expert weights (gate and up fused into one [D, 2I] matmul), which XLA's CPU backend executes near
dense-matmul speed (``lax.ragged_dot`` runs about 50x slower there). The backward pass is a hand-written scan
(``jax.custom_vjp``) over the saved gate/up pre-activations that accumulates weight gradients in place, instead of
differentiating the dynamic weight slices (which would add a full [E, D, I] gradient per block).

Pieces: :func:`block_layout` (routing -> padded layout), :func:`blocked_expert_mlp` (the scan, custom VJP),
:func:`blocked_expert_mlp_reference` (the same maths on gathered per-block weights, for tests), and
:func:`expert_outputs_blocked` (per-assignment outputs [T, k, D]).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Where each assignment sits in the padded, expert-sorted row buffer of NB blocks x block_size rows.

    row_token_p [NB * bs]: token feeding each padded row (T, a zero row, for padding).
    slot_a [T * k]: padded row of assignment a = t * k + j.
    block_expert_n [NB]: expert owning each block (unused trailing blocks repeat the last expert).
    num_used_blocks []: blocks holding at least one assignment; the rest are skipped.
    """

    row_token_p: jax.Array
    slot_a: jax.Array
    block_expert_n: jax.Array
    num_used_blocks: jax.Array


def num_blocks(num_assignments: int, num_experts: int, block_size: int) -> int:
    """Static block count: sum_e ceil(n_e / bs) <= ceil(A / bs) + E for any split of A rows over E experts."""
    return -(-num_assignments // block_size) + num_experts


def block_layout(experts_tk: jax.Array, num_experts: int, block_size: int) -> BlockLayout:
    """Sort the T*k assignments by expert (stable) and pad every expert's group to a multiple of block_size."""
    t, k = experts_tk.shape
    a = t * k
    nb = num_blocks(a, num_experts, block_size)
    flat_a = experts_tk.reshape(a).astype(jnp.int32)
    order = jnp.argsort(flat_a, stable=True)
    sorted_experts = flat_a[order]
    sizes_e = jnp.zeros((num_experts,), jnp.int32).at[flat_a].add(1)
    blocks_e = -(-sizes_e // block_size)
    block_end_e = jnp.cumsum(blocks_e)
    block_start_e = block_end_e - blocks_e
    row_start_e = jnp.cumsum(sizes_e) - sizes_e
    rank = jnp.arange(a, dtype=jnp.int32) - row_start_e[sorted_experts]
    slot_sorted = block_start_e[sorted_experts] * block_size + rank
    slot_a = jnp.zeros((a,), jnp.int32).at[order].set(slot_sorted)
    row_token_p = jnp.full((nb * block_size,), t, jnp.int32).at[slot_sorted].set(order // k)
    block_expert_n = jnp.searchsorted(block_end_e, jnp.arange(nb, dtype=jnp.int32), side="right")
    return BlockLayout(
        row_token_p=row_token_p,
        slot_a=slot_a,
        block_expert_n=jnp.minimum(block_expert_n, num_experts - 1).astype(jnp.int32),
        num_used_blocks=block_end_e[-1],
    )


def blocked_expert_mlp_reference(x_nbd, w_gate_up_edf, w_down_eid, block_expert_n):
    """Plain reference of :func:`blocked_expert_mlp`: with [g | u] = x_n Wgu[e_n], y_n = (silu(g) * u) Wd[e_n].

    Gathers one weight copy per block ([NB, D, 2I]), so it is for tests only.
    """
    gate, up = jnp.split(jnp.einsum("nbd,ndf->nbf", x_nbd, w_gate_up_edf[block_expert_n]), 2, axis=-1)
    return jnp.einsum("nbi,nid->nbd", jax.nn.silu(gate) * up, w_down_eid[block_expert_n])


@jax.custom_vjp
def blocked_expert_mlp(x_nbd, w_gate_up_edf, w_down_eid, block_expert_n, num_used_blocks):
    """SwiGLU expert MLP per block: x [NB, bs, D], w_gate_up [E, D, 2I] (gate | up), w_down [E, I, D] -> [NB, bs, D].

    Block n uses expert block_expert_n[n]; blocks n >= num_used_blocks return zeros without compute.
    """
    return _scan_forward(x_nbd, w_gate_up_edf, w_down_eid, block_expert_n, num_used_blocks, keep_activations=False)[0]


def _scan_forward(x_nbd, w_gate_up_edf, w_down_eid, block_expert_n, num_used_blocks, *, keep_activations: bool):
    """y [NB, bs, D] and, if ``keep_activations``, the pre-activations [g | u] [NB, bs, 2I] for the backward pass."""
    f = w_gate_up_edf.shape[-1]

    def body(_, inputs):
        n, x_bd, e = inputs

        def compute():
            gu_bf = x_bd @ w_gate_up_edf[e]
            gate, up = jnp.split(gu_bf, 2, axis=-1)
            return (jax.nn.silu(gate) * up) @ w_down_eid[e], gu_bf

        def skip():
            return jnp.zeros_like(x_bd), jnp.zeros((x_bd.shape[0], f), x_bd.dtype)

        y_bd, gu_bf = jax.lax.cond(n < num_used_blocks, compute, skip)
        return None, (y_bd, gu_bf) if keep_activations else (y_bd, None)

    steps = jnp.arange(x_nbd.shape[0], dtype=jnp.int32)
    _, (y_nbd, gu_nbf) = jax.lax.scan(body, None, (steps, x_nbd, block_expert_n))
    return y_nbd, gu_nbf


def _fwd(x_nbd, w_gate_up_edf, w_down_eid, block_expert_n, num_used_blocks):
    y_nbd, gu_nbf = _scan_forward(
        x_nbd, w_gate_up_edf, w_down_eid, block_expert_n, num_used_blocks, keep_activations=True
    )
    return y_nbd, (x_nbd, gu_nbf, w_gate_up_edf, w_down_eid, block_expert_n, num_used_blocks)


def _bwd(residuals, dy_nbd):
    """Per used block, from the saved [g | u]: h = silu(g) * u; dWd += h^T dy; dh = dy Wd^T;
    [dg | du] = [dh * u * silu'(g) | dh * silu(g)]; dx = [dg | du] Wgu^T; dWgu += x^T [dg | du].
    Weight gradients accumulate in float32 in place (scan carry)."""
    x_nbd, gu_nbf, w_gate_up_edf, w_down_eid, block_expert_n, num_used_blocks = residuals

    def body(grads, inputs):
        n, x_bd, gu_bf, dy_bd, e = inputs

        def compute(grads):
            d_gate_up, d_down = grads
            gate, up = jnp.split(gu_bf, 2, axis=-1)
            sig = jax.nn.sigmoid(gate)
            act = gate * sig
            dh = dy_bd @ w_down_eid[e].T
            dgu_bf = jnp.concatenate([dh * up * (sig * (1 + gate * (1 - sig))), dh * act], axis=-1)
            dx_bd = dgu_bf @ w_gate_up_edf[e].T
            f32 = jnp.float32
            d_down = d_down.at[e].add(jnp.matmul((act * up).T, dy_bd, preferred_element_type=f32))
            d_gate_up = d_gate_up.at[e].add(jnp.matmul(x_bd.T, dgu_bf, preferred_element_type=f32))
            return (d_gate_up, d_down), dx_bd

        return jax.lax.cond(n < num_used_blocks, compute, lambda g: (g, jnp.zeros_like(x_bd)), grads)

    zeros = (jnp.zeros(w_gate_up_edf.shape, jnp.float32), jnp.zeros(w_down_eid.shape, jnp.float32))
    steps = jnp.arange(x_nbd.shape[0], dtype=jnp.int32)
    (d_gate_up, d_down), dx_nbd = jax.lax.scan(body, zeros, (steps, x_nbd, gu_nbf, dy_nbd, block_expert_n))
    return dx_nbd, d_gate_up.astype(w_gate_up_edf.dtype), d_down.astype(w_down_eid.dtype), None, None


blocked_expert_mlp.defvjp(_fwd, _bwd)


def expert_outputs_blocked(x_td, experts_tk, w_gate_edi, w_up_edi, w_down_eid, *, block_size: int):
    """Each assignment's expert output [T, k, D]: out[t, j] = SwiGLU_{experts[t, j]}(x[t]), via the blocked scan."""
    t, k = experts_tk.shape
    d = x_td.shape[-1]
    layout = block_layout(experts_tk, w_gate_edi.shape[0], block_size)
    x_ext = jnp.concatenate([x_td, jnp.zeros((1, d), x_td.dtype)], axis=0)
    x_nbd = x_ext[layout.row_token_p].reshape(-1, block_size, d)
    w_gate_up_edf = jnp.concatenate([w_gate_edi, w_up_edi], axis=-1)
    y_nbd = blocked_expert_mlp(x_nbd, w_gate_up_edf, w_down_eid, layout.block_expert_n, layout.num_used_blocks)
    return y_nbd.reshape(-1, d)[layout.slot_a].reshape(t, k, d)
