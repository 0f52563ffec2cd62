"""Building blocks shared by the Qwen3 layers: parameter creation with logical axes, and RMSNorm."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from qlx.mesh import spec_axes
from qlx.models.sharding import spec_for


def param(value: jax.Array, logical_axes: Sequence[str | None]) -> nnx.Param:
    """An ``nnx.Param`` holding ``value``, annotated with ``logical_axes`` (sharded later, not eagerly)."""
    return nnx.Param(value, out_sharding=tuple(logical_axes), eager_sharding=False)


def next_params_key(rngs: nnx.Rngs) -> jax.Array:
    """The key ``rngs.params()`` returns, fold_in(key, count), and the same count + 1 after it.

    Written out because ``rngs.params()`` stores the count with ``count[...] += 1``, and under a trace (the
    abstract model ``build_model`` builds first, the planner's) flax then reads ``value.sharding`` of a tracer,
    whose AttributeError message jax builds by walking the whole trace so far: a 48-layer model's init took ~15 s
    more, growing with the square of the parameters drawn. ``set_value`` without an index skips that read."""
    stream = rngs.params
    key = jax.random.fold_in(stream.key[...], stream.count[...])
    stream.count.set_value(stream.count[...] + 1)
    return key


def normal_value(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype) -> jax.Array:
    """An array drawn from N(0, std^2) (in float32, then cast) with the next ``rngs.params()`` key."""
    return (std * jax.random.normal(next_params_key(rngs), tuple(shape), jnp.float32)).astype(dtype)


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], logical_axes: Sequence[str | None], std: float, dtype):
    """An ``nnx.Param`` drawn from N(0, std^2), annotated with ``logical_axes`` (sharded later, not eagerly)."""
    return param(normal_value(rngs, shape, std, dtype), logical_axes)


def ones_param(shape: Sequence[int], logical_axes: Sequence[str | None], dtype):
    """An ``nnx.Param`` of ones (norm scales), annotated with ``logical_axes``."""
    return param(jnp.ones(tuple(shape), dtype), logical_axes)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, as Hugging Face Qwen3: statistics in float32, cast back, then scale.

    y = scale * (x / sqrt(mean(x^2, -1) + eps)); x [..., D], scale [D] -> y [..., D] in x's dtype.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale of width ``dim`` (initialised to ones)."""

    def __init__(self, dim: int, eps: float, *, logical_axis: str, param_dtype):
        self.scale = ones_param((dim,), (logical_axis,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def embed_tokens(table_vd: jax.Array, tokens_bt: jax.Array, dtype, layout) -> jax.Array:
    """Rows of the [V, D] embedding table for tokens [B, T], in ``dtype``: [B, T, D] (``layout``: a
    ``qlx.models.sharding.Layout``; sharded as (batch, length, embed) on a mesh).

    On a mesh, a shard_map over the table's layout (``vocab`` x ``embed``, every ``embed`` axis also splitting the
    tokens): each device gathers the ids of its ``embed`` group (all_gather), looks up its [V / tv, D / ed] block
    (zero outside its vocabulary rows, summed over the ``vocab`` axes), and an all_to_all returns each device its
    own tokens' full rows. Its backward is a local scatter-add into the block. Left to XLA's partitioner, the gradient
    of ``jnp.take`` is a dense [V, D] float32 scatter-add on every device, all-reduced whole (Qwen3-30B: 1.16 GiB,
    several copies, each micro-batch). Without a mesh, or when an ``embed`` axis does not split the tokens, plain
    ``jnp.take``.
    """
    mesh = layout.mesh
    if mesh is None:
        return jnp.take(table_vd, tokens_bt, axis=0).astype(dtype)
    rules = dict(layout.rules)
    token_spec = spec_for(tokens_bt.shape, ("batch", "length"), mesh, rules)
    table_spec = spec_for(table_vd.shape, ("vocab", "embed"), mesh, rules)
    token_axes = tuple(a for entry in token_spec for a in spec_axes(entry) if mesh.shape[a] > 1)
    vocab_axes, embed_axes = (tuple(a for a in spec_axes(entry) if mesh.shape[a] > 1) for entry in table_spec)
    if not set(embed_axes) <= set(token_axes):
        return jnp.take(table_vd, tokens_bt, axis=0).astype(dtype)
    table_only = tuple(a for a in token_axes if a not in (*vocab_axes, *embed_axes))

    def local(table_vd, tokens_bt):
        b, t = tokens_bt.shape
        table_vd = jax.lax.pcast(table_vd, table_only, to="varying")  # ∂table: summed over the token-only axes
        ids_n = tokens_bt.reshape(b * t)
        if embed_axes:
            ids_n = jax.lax.all_gather(ids_n, embed_axes, tiled=True)
        rows = table_vd.shape[0]
        start = jax.lax.axis_index(vocab_axes) * rows if vocab_axes else 0
        local_n = ids_n - start
        hit_n = (local_n >= 0) & (local_n < rows)
        x_nd = jnp.where(hit_n[:, None], jnp.take(table_vd, jnp.clip(local_n, 0, rows - 1), axis=0), 0).astype(dtype)
        if vocab_axes:
            x_nd = jax.lax.psum(x_nd, vocab_axes)
        if embed_axes:
            x_nd = jax.lax.all_to_all(x_nd, embed_axes, 0, 1, tiled=True)
        return x_nd.reshape(b, t, -1)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(vocab_axes or None, embed_axes or None), PartitionSpec(*token_spec)),
        out_specs=PartitionSpec(*token_spec, None),
    )(table_vd, tokens_bt)
