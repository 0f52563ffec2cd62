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

A :class:`KVCache` whose length axis the layout splits over mesh axes (``"length"`` -> ``seq``, the long-context
rollout layout) is written and attended per shard (:func:`write_and_attend`): each device writes the chunk's tokens
that fall in its slots and attends over them, and the shards' partial results are merged by their log-sum-exp, so
neither the write nor the attention gathers the cache (XLA's own partitioning of the scatter all-gathers it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from qlx.kernels import paged_attention, write_tokens
from qlx.mesh import spec_axes
from qlx.models.attention import attention, blockwise_cache_attention
from qlx.models.sharding import Layout, spec_for

CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")  # the logical axes of one layer's K or V [B, S, KV, D]


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


def length_axes(layout: Layout | None, shape: tuple[int, ...]) -> tuple[str, ...]:
    """The mesh axes the layout splits a [B, S, KV, D] cache's length over (() without a mesh or a split)."""
    if layout is None or layout.mesh is None:
        return ()
    return spec_axes(spec_for(shape, CACHE_AXES, layout.mesh, dict(layout.rules))[1])


def write_and_attend(
    kv: tuple[jax.Array, jax.Array],
    q_bthd: jax.Array,
    k_btkd: jax.Array,
    v_btkd: jax.Array,
    positions_bt: jax.Array,
    *,
    backend: str,
    layout: Layout | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One layer's cache step: write the tokens' K/V at their positions, then attend from their queries over the
    written cache (``attention(q_positions_bt=...)``). Returns (o [B, T, H, D], (K, V)).

    When the layout splits the cache's length over mesh axes (:func:`length_axes`), both run per shard inside a
    ``shard_map`` (:func:`_length_parallel_step`); else as two global ops."""
    if not length_axes(layout, kv[0].shape):
        written = (write_kv(kv[0], k_btkd, positions_bt), write_kv(kv[1], v_btkd, positions_bt))
        k_bskd, v_bskd = (x.astype(q_bthd.dtype) for x in written)
        return attention(q_bthd, k_bskd, v_bskd, backend=backend, q_positions_bt=positions_bt), written
    return _length_parallel_step(kv, q_bthd, k_btkd, v_btkd, positions_bt, layout)


def _length_parallel_step(kv, q_bthd, k_btkd, v_btkd, positions_bt, layout: Layout):
    """:func:`write_and_attend` on a cache split over length shards j = 0..n−1 of S/n slots each.

    Shard j holds slots [j·S/n, (j+1)·S/n): it writes the tokens at local positions p − j·S/n (those outside its
    slots are dropped) and computes (o_j, lse_j) over its slots up to min(p − j·S/n, S/n − 1)
    (:func:`partial_cache_attention`; a query that sees none of them gets o_j = 0, lse_j = −inf); then, with
    m = max_j lse_j and w_j = exp(lse_j − m),

        o = Σ_j w_j o_j / Σ_j w_j       (0 where no shard has a visible key: padding queries)

    The chunk's q, K, V and positions enter whole on every length shard (T tokens, not the cache); batch and kv
    heads stay as the cache's spec shards them (the query heads follow their kv heads)."""
    mesh, cache_spec = layout.mesh, spec_for(kv[0].shape, CACHE_AXES, layout.mesh, dict(layout.rules))
    batch, shards, heads = cache_spec[0], spec_axes(cache_spec[1]), cache_spec[2]
    token_spec, positions_spec = PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None)
    dt, sm_scale = q_bthd.dtype, q_bthd.shape[-1] ** -0.5

    def local(k_cache, v_cache, q, k, v, positions):
        index = 0
        for axis in shards:
            index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
        local_bt = jnp.where(positions >= 0, positions - index * k_cache.shape[1], -1)
        k_cache, v_cache = write_kv(k_cache, k, local_bt), write_kv(v_cache, v, local_bt)
        seen_bt = jnp.minimum(local_bt, k_cache.shape[1] - 1)  # past this shard's slots: it sees all of them
        o, lse = partial_cache_attention(q, k_cache.astype(dt), v_cache.astype(dt), seen_bt, sm_scale)
        top = jax.lax.pmax(lse, shards)
        weight = jnp.where(jnp.isfinite(lse), jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
        total = jax.lax.psum(weight, shards)
        o = jax.lax.psum(o * weight[..., None], shards) / jnp.where(total > 0, total, 1.0)[..., None]
        return o.astype(dt), k_cache, v_cache

    step = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(cache_spec, cache_spec, token_spec, token_spec, token_spec, positions_spec),
        out_specs=(token_spec, cache_spec, cache_spec),
        check_vma=False,
    )
    o, k_cache, v_cache = step(kv[0], kv[1], q_bthd, k_btkd, v_btkd, positions_bt)
    return o, (k_cache, v_cache)


def partial_cache_attention(
    q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, q_positions_bt: jax.Array, sm_scale: float
) -> tuple[jax.Array, jax.Array]:
    """(o [B, T, H, D] float32, lse [B, T, H] float32) of queries at ``q_positions_bt`` (at most S − 1) over S
    cache slots (key s visible iff s <= position): o = Σ_s p_s v_s with p = softmax over the visible keys,
    lse = log Σ_s exp(q·k_s · sm_scale); a query that sees no key gets o = 0 and lse = −inf, so results over
    disjoint slots merge exactly.

    T == 1 (decode): dense [B, KV, 1, G, S] scores. T > 1: the XLA blockwise kernel with its log-sum-exp
    (:func:`qlx.models.attention.blockwise_cache_attention`, as ``cache_attention`` runs a prefill chunk)."""
    b, t, h, d = q_bthd.shape
    s, kv = k_bskd.shape[1], k_bskd.shape[2]
    if t == 1:
        q_btkgd = (q_bthd * sm_scale).reshape(b, t, kv, h // kv, d)
        scores = jnp.einsum("btkgd,bskd->bktgs", q_btkgd, k_bskd, preferred_element_type=jnp.float32)
        visible_bts = jnp.arange(s)[None, None, :] <= q_positions_bt[:, :, None]
        scores = jnp.where(visible_bts[:, None, :, None, :], scores, -jnp.inf)
        lse = jax.nn.logsumexp(scores, axis=-1)
        p = jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
        o = jnp.einsum("bktgs,bskd->bktgd", p.astype(v_bskd.dtype), v_bskd, preferred_element_type=jnp.float32)
        return jnp.transpose(o, (0, 2, 1, 3, 4)).reshape(b, t, h, d), jnp.transpose(lse, (0, 2, 1, 3)).reshape(b, t, h)
    o, lse = blockwise_cache_attention(q_bthd, k_bskd, v_bskd, q_positions_bt, sm_scale, return_lse=True)
    return o.astype(jnp.float32), lse
