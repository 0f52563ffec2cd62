"""Pieces every attention backend shares: block sizes, static settings, input checks, block ranges, the custom_vjp.

Conventions (all backends):
  q [B, T, Hq, D], k and v [B, S, Hkv, D] with Hq % Hkv == 0 (query head h reads kv head h // (Hq // Hkv));
  segment ids q_seg [B, T], kv_seg [B, S] (int; a query sees a key only when their ids are equal);
  a backend's `forward(q, k, v, q_seg, kv_seg, settings) -> (o [B, T, Hq, D] in q.dtype, lse [B, T, Hq] float32)`
  and `backward(q, k, v, q_seg, kv_seg, do, lse, delta, settings) -> (dq, dk, dv)` in float32, where
  delta = sum_d(o * do) - dlse. A query row with no visible key gets o = 0 and lse = -inf.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# Masked scores are set to this finite value (not -inf) so an all-masked tile gives exp(0) = 1 instead of nan; the
# running max then wipes such terms out as soon as a visible key arrives (alpha = exp(MASK_VALUE - m) = 0).
MASK_VALUE = -1e30
# A running max still at or below this after all tiles means the row saw no visible key.
DEAD_ROW = MASK_VALUE / 2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: the forward pass computes block_q x block_kv score tiles, the backward pass
    block_q_bwd x block_kv_bwd tiles (None: the forward sizes). Backends subclass this with their own defaults and
    hardware constraints (`multiple`: every block size must be a multiple of it, `power_of_two`)."""

    block_q: int = 512
    block_kv: int = 512
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None

    multiple: ClassVar[int] = 1
    power_of_two: ClassVar[bool] = False

    def __post_init__(self):
        """Every block_* field is a positive int (or None, where its type allows it)."""
        for field in dataclasses.fields(self):
            value, optional = getattr(self, field.name), "None" in str(field.type)
            if not field.name.startswith("block_") or (value is None and optional):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                optional = " or None" if optional else ""
                raise ValueError(
                    f"{type(self).__module__}.BlockSizes.{field.name} must be a positive int{optional}, got {value!r}"
                )

    @classmethod
    def default(cls, head_dim: int, dtype) -> BlockSizes:
        """The backend's default tiles for this head_dim and input dtype (a backend whose tiles must depend on them
        overrides this)."""
        del head_dim, dtype
        return cls()

    @property
    def q_bwd(self) -> int:
        return self.block_q_bwd or self.block_q

    @property
    def kv_bwd(self) -> int:
        return self.block_kv_bwd or self.block_kv

    def valid(self, block: int, length: int) -> bool:
        """Whether `block` tiles a sequence of `length` on this backend."""
        return length % block == 0 and block % self.multiple == 0 and (not self.power_of_two or _is_power_of_two(block))

    def fit(self, q_len: int, kv_len: int, *, strict: bool) -> BlockSizes:
        """Block sizes for these lengths. Sizes above a length shrink to it. With strict=False (default sizes) a size
        that does not divide its length becomes the largest valid divisor below it; with strict=True it is an error."""
        sizes = {}
        for name, want, length, tensor in (
            ("block_q", self.block_q, q_len, "q"),
            ("block_kv", self.block_kv, kv_len, "k/v"),
            ("block_q_bwd", self.q_bwd, q_len, "q"),
            ("block_kv_bwd", self.kv_bwd, kv_len, "k/v"),
        ):
            sizes[name] = self._fit_one(name, want, length, tensor, strict)
        return dataclasses.replace(self, **sizes)

    def _fit_one(self, name: str, want: int, length: int, tensor: str, strict: bool) -> int:
        block = min(want, length)
        if self.valid(block, length):
            return block
        candidates = [b for b in range(block, 0, -1) if self.valid(b, length)]
        floor = min(length, 16)
        if strict or not candidates or candidates[0] < floor:
            options = [b for b in range(length, 0, -1) if self.valid(b, length)][:6]
            raise ValueError(
                f"{tensor} sequence length {length} cannot be tiled by {name}={want} on {type(self).__module__}: "
                f"blocks must divide the length"
                + (f", be multiples of {self.multiple}" if self.multiple > 1 else "")
                + (", be powers of two" if self.power_of_two else "")
                + (f"; valid sizes here: {options}" if options else "; no valid size exists")
                + (f"; or pad the sequence to a multiple of {max(self.multiple, 64)}" if not strict else "")
            )
        return candidates[0]


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class Settings:
    """Static (hashable) settings of one attention call."""

    causal: bool
    sm_scale: float
    block_sizes: BlockSizes
    interpret: Any = False


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> None:
    """Raise a ValueError naming the tensor when q [B, T, Hq, D], k, v [B, S, Hkv, D] do not fit together."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q batch {q.shape[0]} != k/v batch {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q head_dim {q.shape[3]} != k/v head_dim {k.shape[3]}")
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv:
        valid = [h for h in range(1, hq + 1) if hq % h == 0]
        raise ValueError(
            f"query heads ({hq}, q.shape[2]) must be a multiple of kv heads ({hkv}, k.shape[2]); "
            f"valid kv head counts for {hq} query heads: {valid}"
        )
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"causal attention needs equal q and k/v lengths, got q seq {q.shape[1]} and k/v seq {k.shape[1]}"
        )


def check_scale(head_dim: int, sm_scale: float | None) -> float:
    """sm_scale as a positive float (default 1 / sqrt(head_dim))."""
    scale = head_dim**-0.5 if sm_scale is None else float(sm_scale)
    if not scale > 0:
        raise ValueError(f"sm_scale must be positive, got {sm_scale!r}")
    return scale


def check_segment_ids(segment_ids: jax.Array | None, batch: int, length: int, name: str = "segment_ids") -> None:
    if segment_ids is None:
        return
    if segment_ids.shape != (batch, length):
        raise ValueError(f"{name} must be [batch, seq] = {(batch, length)}, got {segment_ids.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got {segment_ids.dtype}")


def axis_tuple(axes: str | Sequence[str] | None) -> tuple[str, ...]:
    """Mesh axes as a tuple: None -> (), "data" -> ("data",)."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def spec_entry(axes: tuple[str, ...]):
    """The PartitionSpec entry sharding one dimension over `axes` (None, one name, or a tuple)."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def check_mesh_axes(mesh, caller: str, roles: Sequence[tuple[str, str | None]]) -> None:
    """Every (role, axis) names an axis of `mesh`, and no axis plays two roles."""
    names = tuple(mesh.axis_names)
    for role, name in roles:
        if name is not None and name not in names:
            raise ValueError(f"{caller} {role}={name!r} is not an axis of the mesh; mesh axes are {names}")
    used = [name for _, name in roles if name is not None]
    if len(set(used)) != len(used):
        raise ValueError(f"{caller}: the mesh axes of {', '.join(f'{r}={n!r}' for r, n in roles if n)} must differ")


def shard_kv_heads(q, k, v, mesh, batch_axes: tuple[str, ...], head_axes: tuple[str, ...]):
    """(k, v) ready to shard with q over the batch and head mesh axes (the shapes checked, errors name the tensor).

    Query heads split into n = size(head_axes) contiguous groups; shard i needs kv heads h // G of its query heads h
    (G = Hq / Hkv). When n divides Hkv, k/v shard as they are; when Hkv divides n, each kv head is repeated n / Hkv
    times (to n heads, never to Hq), so shard i holds exactly kv head i // (n / Hkv)."""
    b, _, hq, _ = q.shape
    hkv = k.shape[2]
    batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
    if b % batch_shards:
        raise ValueError(f"batch {b} (q.shape[0]) must be divisible by the {batch_shards} devices of {batch_axes}")
    if not head_axes:
        return k, v
    heads = math.prod(mesh.shape[a] for a in head_axes)
    where = repr(head_axes[0]) if len(head_axes) == 1 else str(head_axes)
    if hq % heads:
        raise ValueError(f"query heads {hq} (q.shape[2]) must be divisible by the {heads} devices of {where}")
    if hkv % heads == 0:
        return k, v
    if heads % hkv:
        raise ValueError(f"kv heads {hkv} (k.shape[2]) must divide or be a multiple of the {heads} devices of {where}")
    return jnp.repeat(k, heads // hkv, axis=2), jnp.repeat(v, heads // hkv, axis=2)


def place(x, mesh, spec: PartitionSpec):
    """Reshard x to `spec` when the mesh has Explicit axes (shard_map then requires the types to match); on Auto
    meshes shard_map reshards by itself. None stays None."""
    if x is not None and any(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.reshard(x, NamedSharding(mesh, spec))
    return x


def kv_range(i, block_q: int, block_kv: int, num_kv: int):
    """Causal kv blocks for query block i: blocks [0, n_full) are fully visible, [n_full, n_hi) straddle the diagonal.
    (Tile (i, j) is visible at all iff its first key j*bk <= its last query (i+1)*bq - 1.)"""
    n_full = lax.div(i * block_q + 1, block_kv)
    n_hi = jnp.minimum(lax.div((i + 1) * block_q + block_kv - 1, block_kv), num_kv)
    return n_full, n_hi


def q_range(j, block_q: int, block_kv: int, num_q: int):
    """Causal query blocks for kv block j: blocks [i_lo, i_full) straddle the diagonal, [i_full, num_q) see it all."""
    i_lo = lax.div(j * block_kv, block_q)
    i_full = jnp.minimum(lax.div((j + 1) * block_kv + block_q - 2, block_q), num_q)
    return i_lo, i_full


def finish_rows(acc, m, l):
    """Online-softmax epilogue: o = acc / l and lse = m + log(l); rows that saw no visible key get o = 0, lse = -inf."""
    dead = m <= DEAD_ROW
    o = jnp.where(dead[..., None], 0.0, acc / l[..., None])
    lse = jnp.where(dead, -jnp.inf, m + jnp.log(l))
    return o, lse


def backward_lse(lse):
    """lse for a backward pass: exp(s - lse) must be 0 in rows with no visible key (lse = -inf), so -inf -> +inf."""
    return jnp.where(jnp.isneginf(lse), jnp.inf, lse)


def softmax_delta(o, do, dlse):
    """delta [B, T, H] = sum_d o * do - dlse: the row term of dS = P * (dP - delta) (the lse cotangent folds in)."""
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse.astype(jnp.float32)


def merge_partials(o_a, lse_a, o_b, lse_b):
    """Merge two attention results over disjoint key sets: o [B, T, H, D], lse [B, T, H] (float32).

    lse = log(exp(lse_a) + exp(lse_b)); o = (exp(lse_a - lse) o_a + exp(lse_b - lse) o_b). Rows with lse = -inf on
    both sides stay o = 0, lse = -inf. Returns (o in o_a.dtype, lse)."""
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    total = w_a + w_b
    lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    o = (w_a * scale)[..., None] * o_a.astype(jnp.float32) + (w_b * scale)[..., None] * o_b.astype(jnp.float32)
    return o.astype(o_a.dtype), lse


Forward = Callable[..., tuple[jax.Array, jax.Array]]
Backward = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def attention_with_vjp(forward: Forward, backward: Backward):
    """The custom_vjp entry of a backend: (q, k, v, q_seg, kv_seg, settings, q_pos=None) -> (o, lse), differentiable
    in q, k, v (and through lse), with the backward pass recomputing scores tile by tile from (q, k, v, lse).
    q_pos [B, T] (query positions over a KV cache) is passed on to forward / backward only when given."""

    def positions(q_pos):
        return {} if q_pos is None else {"q_pos": q_pos}

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def attention(q, k, v, q_seg, kv_seg, q_pos, settings: Settings):
        return forward(q, k, v, q_seg, kv_seg, settings, **positions(q_pos))

    def attention_fwd(q, k, v, q_seg, kv_seg, q_pos, settings):
        o, lse = forward(q, k, v, q_seg, kv_seg, settings, **positions(q_pos))
        return (o, lse), (q, k, v, q_seg, kv_seg, q_pos, o, lse)

    def attention_bwd(settings, residuals, cotangents):
        q, k, v, q_seg, kv_seg, q_pos, o, lse = residuals
        do, dlse = cotangents
        delta = softmax_delta(o, do, dlse)
        dq, dk, dv = backward(q, k, v, q_seg, kv_seg, do, lse, delta, settings, **positions(q_pos))
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None

    attention.defvjp(attention_fwd, attention_bwd)

    def call(q, k, v, q_seg, kv_seg, settings: Settings, q_pos=None):
        return attention(q, k, v, q_seg, kv_seg, q_pos, settings)

    return call
