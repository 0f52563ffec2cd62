"""Zig-zag token layout that balances causal ring attention.

The sequence is cut into 2R equal chunks (R = ring size). Device r holds chunks r and 2R-1-r, so in the balanced
order the chunks read [0, 2R-1, 1, 2R-2, ..., R-1, R]. Every device then owns one early and one late chunk: at each
ring step it does the same work (half of a full block pair), and no device computes a fully masked block.
Example, T = 8, R = 2: natural [0 1 2 3 4 5 6 7] -> balanced [0 1 6 7 | 2 3 4 5] (device 0 | device 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType


def chunk_order(ring_size: int) -> np.ndarray:
    """Natural chunk index of each balanced chunk slot: [0, 2R-1, 1, 2R-2, ..., R-1, R]."""
    if not isinstance(ring_size, int) or ring_size < 1:
        raise ValueError(f"ring_size must be a positive int, got {ring_size!r}")
    return np.stack([np.arange(ring_size), 2 * ring_size - 1 - np.arange(ring_size)], axis=1).reshape(-1)


def _permute_chunks(x, order: np.ndarray, axis: int, name: str):
    x = jnp.asarray(x)
    axis = axis % x.ndim
    n, chunks = x.shape[axis], len(order)
    if n % chunks:
        raise ValueError(
            f"{name}: axis {axis} has length {n}, which must be divisible by 2 x ring size = {chunks} "
            f"(pad the sequence to a multiple of {chunks})"
        )
    shape = x.shape
    x = x.reshape(*shape[:axis], chunks, n // chunks, *shape[axis + 1 :])
    index = (slice(None),) * axis + (jnp.asarray(order),)
    return x.at[index].get(out_sharding=_explicit_sharding(x), unique_indices=True).reshape(shape)


def _explicit_sharding(x):
    """x's sharding when it lives on a mesh with Explicit axes (a gather there needs its output sharding spelled out:
    the chunks keep the input's sharding), else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    return sharding


def balance_tokens(x: jax.Array, ring_size: int, axis: int = 1) -> jax.Array:
    """Natural -> balanced (zig-zag) order along `axis` (default: the seq axis of [B, T, ...])."""
    return _permute_chunks(x, chunk_order(ring_size), axis, "balance_tokens")


def unbalance_tokens(x: jax.Array, ring_size: int, axis: int = 1) -> jax.Array:
    """Balanced (zig-zag) -> natural order along `axis`; the inverse of `balance_tokens`."""
    return _permute_chunks(x, np.argsort(chunk_order(ring_size)), axis, "unbalance_tokens")


def balanced_positions(seq_len: int, ring_size: int) -> jax.Array:
    """[seq_len] int32: the natural position of the token at each balanced slot (feed these to RoPE)."""
    return balance_tokens(jnp.arange(seq_len, dtype=jnp.int32), ring_size, axis=0)
