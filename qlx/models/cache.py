"""Preallocated KV cache for generation: per-layer K/V [B, max_len, KV, D] and per-row lengths.

Calling the model with ``cache=`` writes the new tokens' keys/values at their positions (slot = position) and
attends over the cache, so one call handles a multi-token chunk per row (prefill, chunked prefill) or one token per
row (decode), with rows at different lengths. A negative position marks a padding token: it is not written and sees
nothing. Shapes are static, so every step jit-compiles once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: one [B, max_len, KV, D] array per decoder layer; lengths [B] (int32): tokens held per row."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def default_positions(self, num_tokens: int) -> jax.Array:
        """Positions [B, T] that append ``num_tokens`` tokens after each row's current length."""
        return self.lengths[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]

    def updated(self, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], positions_bt: jax.Array) -> KVCache:
        """The cache holding the written layers ``k``/``v``, each row's length raised past its largest position."""
        written = jnp.max(positions_bt, axis=1).astype(jnp.int32) + 1
        return KVCache(k=tuple(k), v=tuple(v), lengths=jnp.maximum(self.lengths, written))


def write_kv(cache_bskd: jax.Array, new_btkd: jax.Array, positions_bt: jax.Array) -> jax.Array:
    """cache[b, positions[b, t]] = new[b, t] for positions >= 0 (padding and out-of-range positions are dropped)."""
    max_len = cache_bskd.shape[1]
    slots_bt = jnp.where((positions_bt >= 0) & (positions_bt < max_len), positions_bt, max_len)
    rows_bt = jnp.arange(cache_bskd.shape[0])[:, None]
    return cache_bskd.at[rows_bt, slots_bt].set(new_btkd.astype(cache_bskd.dtype), mode="drop")
