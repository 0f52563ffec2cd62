"""Building blocks shared by the Qwen3 layers: parameter creation with logical axes, and RMSNorm."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(value: jax.Array, logical_axes: Sequence[str | None]) -> nnx.Param:
    """An ``nnx.Param`` holding ``value``, annotated with ``logical_axes`` (sharded later, not eagerly)."""
    return nnx.Param(value, out_sharding=tuple(logical_axes), eager_sharding=False)


def normal_value(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype) -> jax.Array:
    """An array drawn from N(0, std^2) (in float32, then cast) with the next ``rngs.params()`` key."""
    return (std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)).astype(dtype)


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
