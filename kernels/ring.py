"""Ring attention: the sequence sharded over one mesh axis, K/V travelling around the ring.

Each of the R devices on `axis` holds L = T / R tokens of q, k, v. Step 0 attends the local block to itself; at step s
the device holds the K/V block of device r - s (passed on with ppermute while the current block is computed) and
attends to it with the flash kernel; partial results merge through their log-sum-exp. The backward pass (custom_vjp)
recomputes the same tiles from the final lse: dQ stays local, dK/dV accumulators travel with their K/V block and
arrive home after R hops. Only kv heads travel (grouped-query attention), so communication is Hkv / Hq of q's size.

Causal balance (zig-zag layout, see layout.py): device r holds chunks (r, 2R-1-r) of size c = L / 2. Against the
block of device j != r exactly half the tile pairs are visible, with no mask:
  j < r: all L queries see the first chunk (j) of the block, not its second (2R-1-j)   -> [L x c]
  j > r: only the second query chunk (2R-1-r) sees the block, all of it              -> [c x L]
so every device does the same work at every step and the diagonal step is a plain causal call.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from .common import (
    BlockSizes,
    Settings,
    axis_tuple,
    check_mesh_axes,
    check_qkv,
    check_scale,
    check_segment_ids,
    merge_partials,
    place,
    shard_kv_heads,
    softmax_delta,
    spec_entry,
)
from .flash import make_settings, resolve_backend


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static description of one ring: settings for the diagonal step and, when causal, the two half steps."""

    axis: str
    size: int
    causal: bool
    backend: types.ModuleType
    diag: Settings
    lower: Settings | None  # causal, block j < r: all queries x first kv chunk
    upper: Settings | None  # causal, block j > r: second query chunk x all keys

    def shift(self, tree):
        """Send every array of `tree` to the next device on the ring (r -> r + 1)."""
        perm = [(r, (r + 1) % self.size) for r in range(self.size)]
        return jax.tree.map(lambda x: lax.ppermute(x, self.axis, perm), tree)


def _half(x, first: bool):
    if x is None:
        return None
    c = x.shape[1] // 2
    return x[:, :c] if first else x[:, c:]


def _pad_rows(x, fill, before: bool):
    """Concatenate a block of `fill` as big as x along the seq axis (axis 1), before or after x."""
    pad = jnp.full(x.shape, fill, x.dtype)
    return jnp.concatenate([pad, x] if before else [x, pad], axis=1)


def _step_forward(ring: _Ring, s, q, q_seg, k, v, kv_seg):
    """(o float32, lse) of the local queries against the K/V block that started on device r - s (s >= 1)."""
    fwd = ring.backend.forward
    if not ring.causal:
        o, lse = fwd(q, k, v, q_seg, kv_seg, ring.diag)
        return o.astype(jnp.float32), lse

    def lower():
        o, lse = fwd(q, _half(k, True), _half(v, True), q_seg, _half(kv_seg, True), ring.lower)
        return o.astype(jnp.float32), lse

    def upper():
        o, lse = fwd(_half(q, False), k, v, _half(q_seg, False), kv_seg, ring.upper)
        return _pad_rows(o.astype(jnp.float32), 0.0, before=True), _pad_rows(lse, -jnp.inf, before=True)

    r = lax.axis_index(ring.axis)
    return lax.cond((r - s) % ring.size < r, lower, upper)


def _step_backward(ring: _Ring, s, q, q_seg, k, v, kv_seg, do, lse, delta):
    """(dq, dk, dv) float32 contributions of the K/V block that started on device r - s (s >= 1)."""
    bwd = ring.backend.backward
    if not ring.causal:
        return bwd(q, k, v, q_seg, kv_seg, do, lse, delta, ring.diag)

    def lower():
        dq, dk, dv = bwd(q, _half(k, True), _half(v, True), q_seg, _half(kv_seg, True), do, lse, delta, ring.lower)
        return dq, _pad_rows(dk, 0.0, before=False), _pad_rows(dv, 0.0, before=False)

    def upper():
        second = functools.partial(_half, first=False)
        dq, dk, dv = bwd(second(q), k, v, second(q_seg), kv_seg, second(do), second(lse), second(delta), ring.upper)
        return _pad_rows(dq, 0.0, before=True), dk, dv

    r = lax.axis_index(ring.axis)
    return lax.cond((r - s) % ring.size < r, lower, upper)


def _ring_forward(ring: _Ring, q, k, v, seg):
    o, lse = ring.backend.forward(q, k, v, seg, seg, ring.diag)
    o = o.astype(jnp.float32)
    if ring.size == 1:
        return o, lse

    def merge_step(s, kv, o, lse):
        o_s, lse_s = _step_forward(ring, s, q, seg, *kv)
        return merge_partials(o, lse, o_s, lse_s)

    def body(s, carry):
        o, lse, kv = carry
        kv_next = ring.shift(kv)
        o, lse = merge_step(s, kv, o, lse)
        return o, lse, kv_next

    o, lse, kv = lax.fori_loop(1, ring.size - 1, body, (o, lse, ring.shift((k, v, seg))))
    return merge_step(ring.size - 1, kv, o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_local(q, k, v, seg, ring: _Ring):
    o, _ = _ring_forward(ring, q, k, v, seg)
    return o.astype(q.dtype)


def _ring_local_fwd(q, k, v, seg, ring):
    o, lse = _ring_forward(ring, q, k, v, seg)
    o = o.astype(q.dtype)
    return o, (q, k, v, seg, o, lse)


def _ring_local_bwd(ring: _Ring, residuals, do):
    q, k, v, seg, o, lse = residuals
    delta = softmax_delta(o, do, jnp.zeros_like(lse))
    dq, dk, dv = ring.backend.backward(q, k, v, seg, seg, do, lse, delta, ring.diag)
    if ring.size > 1:

        def grads_step(s, kv, acc):
            dq_s, dk_s, dv_s = _step_backward(ring, s, q, seg, *kv, do, lse, delta)
            return dq_s, ring.shift((acc[0] + dk_s, acc[1] + dv_s))

        def body(s, carry):
            dq, kv, acc = carry
            kv_next = ring.shift(kv)
            dq_s, acc = grads_step(s, kv, acc)
            return dq + dq_s, kv_next, acc

        carry = (dq, ring.shift((k, v, seg)), ring.shift((dk, dv)))
        dq, kv, acc = lax.fori_loop(1, ring.size - 1, body, carry)
        dq_s, (dk, dv) = grads_step(ring.size - 1, kv, acc)
        dq = dq + dq_s
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring_local.defvjp(_ring_local_fwd, _ring_local_bwd)


def _exchange_chunks(x, ring: _Ring, *, to_balanced: bool):
    """Natural <-> zig-zag order inside the shard_map, with two ppermutes of half a shard each.

    In natural order device d holds chunks (2d, 2d+1); in zig-zag order device r holds (r, 2R-1-r), one even and one
    odd chunk. The even chunks form one permutation of the devices and the odd chunks another, so each half-shard
    moves with a single ppermute; `where` on the device parity picks the slot it lands in (or leaves from)."""
    if x is None:
        return None
    size = ring.size

    def zigzag_device(chunk):  # the device holding `chunk` in zig-zag order
        return chunk if chunk < size else 2 * size - 1 - chunk

    even_first = lax.axis_index(ring.axis) % 2 == 0  # zig-zag slot 0 of device r holds chunk r
    first, second = _half(x, True), _half(x, False)
    if to_balanced:
        even = lax.ppermute(first, ring.axis, [(d, zigzag_device(2 * d)) for d in range(size)])
        odd = lax.ppermute(second, ring.axis, [(d, zigzag_device(2 * d + 1)) for d in range(size)])
        parts = (jnp.where(even_first, even, odd), jnp.where(even_first, odd, even))
    else:
        even, odd = jnp.where(even_first, first, second), jnp.where(even_first, second, first)
        parts = (
            lax.ppermute(even, ring.axis, [(zigzag_device(2 * d), d) for d in range(size)]),
            lax.ppermute(odd, ring.axis, [(zigzag_device(2 * d + 1), d) for d in range(size)]),
        )
    return jnp.concatenate(parts, axis=1)


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    axis: str = "seq",
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    layout: str = "natural",
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str = "auto",
    batch_axes: str | Sequence[str] | None = None,
    head_axis: str | None = None,
    interpret=False,
) -> jax.Array:
    """Sequence-parallel attention over the mesh axis `axis` (jax.shard_map; call it inside or outside jit).

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (Hq a multiple of Hkv); global arrays.
      mesh: the device mesh; `axis` names the ring (R = mesh.shape[axis] devices, each holding T / R tokens).
      causal: causal masking by natural token position.
      segment_ids: [B, T] int, packed-sequence ids (in the same layout as q).
      layout: "natural": q, k, v, segment_ids and the output are in natural token order; for causal attention the
        tokens are permuted to the zig-zag layout and back inside the shard_map (each half-shard moves with one
        ppermute, for q, k, v, segment_ids and the output). "balanced": they are already
        in the zig-zag layout of `balance_tokens(x, R)` and the output is too (no permutation; the model permutes
        tokens once at the input and gives RoPE `balanced_positions(T, R)`). Non-causal attention ignores layout.
      batch_axes: mesh axes the batch dimension is sharded over (e.g. ("data", "fsdp")); None: batch replicated.
      head_axis: mesh axis the head dimension is sharded over (e.g. "tensor"); None: heads replicated. Hq must
        divide by its size; kv heads too, or its size must be a multiple of Hkv (K/V heads are then repeated up to
        the axis size, never to Hq).
      Other mesh axes are replicated: every device along them computes the same result. The input specs are
      P(batch_axes, axis, head_axis, None) for q/k/v and P(batch_axes, axis) for segment_ids; arrays sharded that way
      enter without communication.
      sm_scale, block_sizes, backend, interpret: as in `flash_attention` (block sizes apply to each local call:
        T / R x T / R on the diagonal step, half blocks of T / (2R) tokens on the others).
    Returns:
      o [B, T, Hq, D] in q.dtype, in the layout of the inputs, sharded as P(batch_axes, axis, head_axis, None).
    """
    check_qkv(q, k, v, causal=True)
    b, t, _, d = q.shape
    check_segment_ids(segment_ids, b, t)
    if layout not in ("natural", "balanced"):
        raise ValueError(f"layout must be 'natural' or 'balanced', got {layout!r}")
    batch_axes = axis_tuple(batch_axes)
    roles = [("axis", axis), *[("batch_axes", a) for a in batch_axes], ("head_axis", head_axis)]
    check_mesh_axes(mesh, "ring_attention", roles)
    size = mesh.shape[axis]
    chunks = 2 * size if causal else size
    if t % chunks:
        raise ValueError(
            f"sequence length {t} (q.shape[1]) must be divisible by {'2 x ' if causal else ''}ring size = {chunks} "
            f"(mesh axis {axis!r} has {size} devices{'; causal attention splits each shard into 2 chunks' * causal}); "
            f"pad the sequence to a multiple of {chunks} x the block size"
        )
    k, v = shard_kv_heads(q, k, v, mesh, batch_axes, axis_tuple(head_axis))

    length = t // size
    sm_scale = check_scale(d, sm_scale)
    module = resolve_backend(backend, d, q.dtype, length // 2 if causal and size > 1 else length, length, block_sizes)

    def settings(q_len, kv_len, step_causal):
        return make_settings(
            module,
            causal=step_causal,
            sm_scale=sm_scale,
            block_sizes=block_sizes,
            q_len=q_len,
            kv_len=kv_len,
            head_dim=d,
            dtype=q.dtype,
            interpret=interpret,
        )

    half = causal and size > 1
    try:
        ring = _Ring(
            axis=axis,
            size=size,
            causal=causal,
            backend=module,
            diag=settings(length, length, causal),
            lower=settings(length, length // 2, False) if half else None,
            upper=settings(length // 2, length, False) if half else None,
        )
    except ValueError as err:
        halves = f" and half blocks of {length // 2} (T / 2R)" if half else ""
        raise ValueError(
            f"ring_attention over the {size} devices of {axis!r}: each device attends blocks of {length} tokens "
            f"(T / R){halves}, which the block sizes must tile: {err}"
        ) from err
    permute = causal and layout == "natural" and size > 1
    batch = spec_entry(batch_axes)
    spec = PartitionSpec(batch, axis, head_axis, None)
    seg_spec = PartitionSpec(batch, axis)

    def local(q, k, v, seg):
        if permute:
            q, k, v, seg = (_exchange_chunks(x, ring, to_balanced=True) for x in (q, k, v, seg))
        o = _ring_local(q, k, v, seg, ring)
        return _exchange_chunks(o, ring, to_balanced=False) if permute else o

    q, k, v = (place(x, mesh, spec) for x in (q, k, v))
    segment_ids = place(segment_ids, mesh, seg_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False)(
        q, k, v, segment_ids
    )
