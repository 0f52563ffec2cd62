"""Preallocated KV cache for generation: per-layer K/V [B, max_len, KV, D] and per-row lengths.

Calling the model with ``cache=`` writes the new tokens' keys/values at their positions (slot = position) and
attends over the cache, so one call handles a multi-token chunk per row (prefill, chunked prefill) or one token per
row (decode), with rows at different lengths. A negative position marks a padding token: it is not written and sees
nothing. Shapes are static, so every step jit-compiles once.

:class:`PagedKVCache` is the same contract over a paged pool (``qlx.kernels.paged_attention``'s layout, per layer
``[KV, num_pages, page_size, D]``, a page table per row; ``qlx.rollout.kv_pages`` allocates the pages): token t of
row b is slot ``t % page_size`` of page ``page_table[b, t // page_size]``. The model's attention writes through
:meth:`PagedLayerKV.write` and attends through :meth:`PagedLayerKV.attend`: one query per row (decode) runs
``paged_attention`` (it reads only each row's pages that hold tokens); several (a prefill chunk) gather the row's
pages into a dense [B, W·page_size, KV, D] view and run the dense :func:`~qlx.models.attention.cache_attention`,
the same maths as over a :class:`KVCache` of that many slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qlx.kernels import paged_attention, write_tokens
from qlx.models.attention import attention


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
        return dataclasses.replace(self, k=tuple(k), v=tuple(v), lengths=_raised(self.lengths, positions_bt))

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        """Layer i's (K, V), as the model's attention takes them."""
        return self.k[i], self.v[i]

    def prefix(self, span: int) -> KVCache:
        """The first ``span`` slots of every row (a prefill chunk that sees nothing past them runs on less)."""
        return dataclasses.replace(self, k=tuple(k[:, :span] for k in self.k), v=tuple(v[:, :span] for v in self.v))

    def with_prefix(self, prefix: KVCache) -> KVCache:
        """This cache with its first slots replaced by ``prefix`` (a :meth:`prefix` after a call wrote it)."""
        return dataclasses.replace(
            prefix,
            k=tuple(jax.lax.dynamic_update_slice_in_dim(k, p, 0, 1) for k, p in zip(self.k, prefix.k, strict=True)),
            v=tuple(jax.lax.dynamic_update_slice_in_dim(v, p, 0, 1) for v, p in zip(self.v, prefix.v, strict=True)),
        )


def _raised(lengths_b: jax.Array, positions_bt: jax.Array) -> jax.Array:
    return jnp.maximum(lengths_b, jnp.max(positions_bt, axis=1).astype(jnp.int32) + 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLayerKV:
    """One layer's pages k, v [KV, num_pages, page_size, D] and the rows' page table [B, W] (module docstring)."""

    k: jax.Array
    v: jax.Array
    page_table: jax.Array

    def write(self, k_btkd: jax.Array, v_btkd: jax.Array, positions_bt: jax.Array) -> PagedLayerKV:
        """The pages with token t of row b written at positions[b, t] (negative: not written)."""
        return dataclasses.replace(
            self,
            k=write_tokens(self.k, k_btkd, self.page_table, positions_bt),
            v=write_tokens(self.v, v_btkd, self.page_table, positions_bt),
        )

    def attend(self, q_bthd: jax.Array, positions_bt: jax.Array, *, backend: str) -> jax.Array:
        """Attention [B, T, H, D] of queries at ``positions_bt`` over the row's tokens at positions <= theirs.

        T == 1: ``paged_attention`` over lengths position + 1 (0 for a negative position: o = 0). T > 1: the
        row's pages gathered into a dense view, then the model's cache attention (``backend`` its dispatch)."""
        dt = q_bthd.dtype
        if q_bthd.shape[1] == 1:
            lengths_b = jnp.maximum(positions_bt[:, 0] + 1, 0).astype(jnp.int32)
            o = paged_attention(q_bthd[:, 0], self.k.astype(dt), self.v.astype(dt), lengths_b, self.page_table)
            return o[:, None]
        kv, _, page_size, d = self.k.shape
        b, width = self.page_table.shape

        def dense(pages):
            return jnp.transpose(pages[:, self.page_table], (1, 2, 3, 0, 4)).reshape(b, width * page_size, kv, d)

        return attention(
            q_bthd, dense(self.k).astype(dt), dense(self.v).astype(dt), backend=backend, q_positions_bt=positions_bt
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """k, v: one [KV, num_pages, page_size, D] array per layer (pages shared by every row); page_table [B, W] int32
    (padded with page 0); lengths [B] int32: tokens held per row. The :class:`KVCache` interface over pages."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    page_table: jax.Array
    lengths: jax.Array

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    default_positions = KVCache.default_positions

    def updated(self, k, v, positions_bt: jax.Array) -> PagedKVCache:
        """As :meth:`KVCache.updated`."""
        return dataclasses.replace(self, k=tuple(k), v=tuple(v), lengths=_raised(self.lengths, positions_bt))

    def layer(self, i: int) -> PagedLayerKV:
        return PagedLayerKV(self.k[i], self.v[i], self.page_table)

    def prefix(self, span: int) -> PagedKVCache:
        """The rows' first ``ceil(span / page_size)`` page-table columns (the pages stay shared and whole)."""
        return dataclasses.replace(self, page_table=self.page_table[:, : -(-span // self.page_size)])

    def with_prefix(self, prefix: PagedKVCache) -> PagedKVCache:
        """The pages written through ``prefix``, with this cache's full page table."""
        return dataclasses.replace(prefix, page_table=self.page_table)


def write_kv(cache_bskd: jax.Array, new_btkd: jax.Array, positions_bt: jax.Array) -> jax.Array:
    """cache[b, positions[b, t]] = new[b, t] for positions >= 0 (padding and out-of-range positions are dropped)."""
    max_len = cache_bskd.shape[1]
    slots_bt = jnp.where((positions_bt >= 0) & (positions_bt < max_len), positions_bt, max_len)
    rows_bt = jnp.arange(cache_bskd.shape[0])[:, None]
    return cache_bskd.at[rows_bt, slots_bt].set(new_btkd.astype(cache_bskd.dtype), mode="drop")
