"""Blockwise flash attention in plain XLA: the CPU path and the fallback of the Pallas kernels.

Forward: a scan over query blocks; for each, a loop over the kv blocks it can see with an online softmax
(m = running max, l = running sum of exp(s - m), acc = running sum of exp(s - m) v). Causal tiles above the diagonal
are never visited (the loop bounds stop at the diagonal) and only the tiles straddling it build a causal mask.
Backward (custom_vjp): a scan over kv blocks; for each, a loop over the query blocks that see it, recomputing
P = exp(s - lse) tile by tile: dV += P^T dO, dS = P (dO V^T - delta), dK += dS^T Q, dQ[i] += dS K (dQ is the
only O(seq) accumulator).
Memory is O(seq x block): the largest live arrays are one [block_q, block_kv] tile per (batch, head) plus O(seq)
accumulators. Grouped-query attention stacks the G query heads of a kv head into the rows of one tile, so K/V are
never repeated.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from .common import MASK_VALUE, Settings, attention_with_vjp, backward_lse, finish_rows, kv_range, q_range
from .common import BlockSizes as _BaseBlockSizes
from .reference import mha_reference as reference

__all__ = ["BlockSizes", "attention", "backward", "forward", "reference"]


@dataclasses.dataclass(frozen=True)
class BlockSizes(_BaseBlockSizes):
    """Blockwise XLA tiles: any sizes dividing the sequence. 512 x 512 keeps a CPU core busy per tile."""

    block_q: int = 512
    block_kv: int = 512


def _rows_to_blocks(x, block: int, hkv: int):
    """[B, T, Hq, *F] -> [T // block, B, Hkv, G * block, *F] (row r of a block = query head g, position r % block)."""
    b, t, hq = x.shape[:3]
    feat = x.shape[3:]
    g = hq // hkv
    x = x.reshape(b, t // block, block, hkv, g, *feat)
    x = jnp.moveaxis(x, (1, 0, 3, 4, 2), (0, 1, 2, 3, 4))
    return x.reshape(t // block, b, hkv, g * block, *feat)


def _blocks_to_rows(x, block: int, hq: int):
    """Inverse of _rows_to_blocks: [N, B, Hkv, G * block, *F] -> [B, N * block, Hq, *F]."""
    n, b, hkv = x.shape[:3]
    feat = x.shape[4:]
    x = x.reshape(n, b, hkv, hq // hkv, block, *feat)
    x = jnp.moveaxis(x, (0, 1, 2, 3, 4), (1, 0, 3, 4, 2))
    return x.reshape(b, n * block, hq, *feat)


def _kv_to_blocks(x, block: int):
    """[B, S, Hkv, D] -> [S // block, B, Hkv, block, D]."""
    b, s, hkv, d = x.shape
    return x.reshape(b, s // block, block, hkv, d).transpose(1, 0, 3, 2, 4)


def _seg_to_blocks(seg, block: int):
    """[B, T] -> [T // block, B, block] (None stays None)."""
    if seg is None:
        return None
    b, t = seg.shape
    return seg.reshape(b, t // block, block).transpose(1, 0, 2)


def _mask(
    s, i, j, block_q: int, block_kv: int, q_seg_i, kv_seg_j, causal_tile: bool, *, fill, transposed=False, q_pos_i=None
):
    """Set invisible scores of tile (i, j) to `fill`. s [B, Hkv, G * bq, bk] (or [B, Hkv, bk, G * bq] when
    transposed); segments [B, bq], [B, bk]. Causal: key position <= query position, the query positions being
    q_pos_i [B, bq] when given (a KV cache) and i * bq + row otherwise."""
    if not causal_tile and q_seg_i is None:
        return s
    b, hkv = s.shape[:2]
    groups = (s.shape[3] if transposed else s.shape[2]) // block_q
    # visibility over [B, 1, bq, bk] (query-major) or [B, 1, bk, bq] (key-major); the G axis is added below
    q_axis, kv_axis = (1, 0) if transposed else (0, 1)
    tile = (block_kv, block_q) if transposed else (block_q, block_kv)
    visible = jnp.ones((1, 1, *tile), bool)
    if causal_tile:
        if q_pos_i is None:
            q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, tile, q_axis)
        else:
            q_pos = q_pos_i[:, None, None, :] if transposed else q_pos_i[:, None, :, None]
        kv_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, tile, kv_axis)
        visible = visible & (q_pos >= kv_pos)
    if q_seg_i is not None:
        q_ids, kv_ids = q_seg_i[:, None, None, :], kv_seg_j[:, None, :, None]
        visible = visible & (q_ids == kv_ids if transposed else jnp.swapaxes(q_ids == kv_ids, 2, 3))
    if groups == 1:
        return jnp.where(visible, s, fill)
    if transposed:
        s = s.reshape(b, hkv, block_kv, groups, block_q)
        return jnp.where(visible[:, :, :, None, :], s, fill).reshape(b, hkv, block_kv, groups * block_q)
    s = s.reshape(b, hkv, groups, block_q, block_kv)
    return jnp.where(visible[:, :, None], s, fill).reshape(b, hkv, groups * block_q, block_kv)


def _dot(a, b, spec: str):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _position_kv_range(q_pos_i, block_kv: int, num_kv: int):
    """Causal kv blocks for a query block at positions q_pos_i [B, bq] (any order; < 0 sees nothing): blocks
    [0, n_full) are visible to every row, [n_full, n_hi) to some; blocks from n_hi on to none (never visited)."""
    n_hi = jnp.clip(lax.div(jnp.max(q_pos_i) + block_kv, block_kv), 0, num_kv)
    n_full = jnp.clip(lax.div(jnp.min(q_pos_i) + 1, block_kv), 0, n_hi)
    return n_full, n_hi


def forward(q, k, v, q_seg, kv_seg, settings: Settings, q_pos=None):
    """(o [B, T, Hq, D], lse [B, T, Hq] float32) of softmax(scale * q k^T + mask) v, tile by tile.

    With q_pos [B, T] (queries over a KV cache of S slots, causal): key u is visible to query t iff u <= q_pos[b, t],
    and each query block visits only the kv blocks up to its largest position.

    Scores stay unscaled in the tile (masked ones at MASK_VALUE / scale); the scale is applied inside the row max and
    the exp, which saves XLA:CPU a full read+write pass over every tile."""
    bs = settings.block_sizes
    bq, bk = bs.block_q, bs.block_kv
    scale, raw_mask = settings.sm_scale, MASK_VALUE / settings.sm_scale
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    nk = k.shape[1] // bk
    k_blocks, v_blocks = _kv_to_blocks(k, bk), _kv_to_blocks(v, bk)
    kv_seg_blocks = _seg_to_blocks(kv_seg, bk)
    rows = (hq // hkv) * bq

    def q_block(_, xs):
        i, q_i, q_seg_i, q_pos_i = xs

        def kv_step(causal_tile: bool):
            def body(j, carry):
                m, l, acc = carry
                kv_seg_j = None if kv_seg_blocks is None else kv_seg_blocks[j]
                s = _dot(q_i, k_blocks[j], "bhqd,bhkd->bhqk")
                s = _mask(s, i, j, bq, bk, q_seg_i, kv_seg_j, causal_tile, fill=raw_mask, q_pos_i=q_pos_i)
                m_new = jnp.maximum(m, scale * jnp.max(s, axis=-1))
                alpha = jnp.exp(m - m_new)
                p = jnp.exp(s * scale - m_new[..., None])
                l = alpha * l + jnp.sum(p, axis=-1)
                acc = alpha[..., None] * acc + _dot(p.astype(v.dtype), v_blocks[j], "bhqk,bhkd->bhqd")
                return m_new, l, acc

            return body

        carry = (
            jnp.full((b, hkv, rows), MASK_VALUE, jnp.float32),
            jnp.zeros((b, hkv, rows), jnp.float32),
            jnp.zeros((b, hkv, rows, d), jnp.float32),
        )
        if settings.causal:
            n_full, n_hi = kv_range(i, bq, bk, nk) if q_pos_i is None else _position_kv_range(q_pos_i, bk, nk)
            carry = lax.fori_loop(0, n_full, kv_step(False), carry)
            carry = lax.fori_loop(n_full, n_hi, kv_step(True), carry)
        else:
            carry = lax.fori_loop(0, nk, kv_step(False), carry)
        m, l, acc = carry
        o, lse = finish_rows(acc, m, l)
        return None, (o.astype(q.dtype), lse)

    xs = (jnp.arange(t // bq), _rows_to_blocks(q, bq, hkv), _seg_to_blocks(q_seg, bq), _seg_to_blocks(q_pos, bq))
    _, (o_blocks, lse_blocks) = lax.scan(q_block, None, xs)
    return _blocks_to_rows(o_blocks, bq, hq), _blocks_to_rows(lse_blocks, bq, hq)


def backward(q, k, v, q_seg, kv_seg, do, lse, delta, settings: Settings, q_pos=None):
    """(dq, dk, dv) in float32 from the row statistics lse and delta = sum(o * do) - dlse, tile by tile.

    With q_pos (see `forward`) every kv block visits every query block, all tiles masked by position.

    Tiles are computed key-major (s^T = K Q^T, [bk, G * bq]) so that every matmul has its contraction on the last
    axis of the left operand (dV += P^T dO and dK += dS^T Q become plain products; XLA:CPU runs transposed-left
    products several times slower); dQ is accumulated transposed, dQ^T += K^T dS^T, and transposed once at the end."""
    bs = settings.block_sizes
    bq, bk = bs.q_bwd, bs.kv_bwd
    scale, raw_mask = settings.sm_scale, MASK_VALUE / settings.sm_scale
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    nq = t // bq
    rows = (hq // hkv) * bq
    q_blocks, do_blocks = _rows_to_blocks(q, bq, hkv), _rows_to_blocks(do, bq, hkv)
    lse_blocks = _rows_to_blocks(backward_lse(lse), bq, hkv)[:, :, :, None, :]
    delta_blocks = _rows_to_blocks(delta, bq, hkv)[:, :, :, None, :]
    q_seg_blocks, q_pos_blocks = _seg_to_blocks(q_seg, bq), _seg_to_blocks(q_pos, bq)

    def kv_block(dq_t, xs):
        j, k_j, k_t_j, v_j, kv_seg_j = xs

        def q_step(causal_tile: bool):
            def body(i, carry):
                dq_t, dk, dv = carry
                q_i, do_i = q_blocks[i], do_blocks[i]
                q_seg_i = None if q_seg_blocks is None else q_seg_blocks[i]
                q_pos_i = None if q_pos_blocks is None else q_pos_blocks[i]
                s_t = _dot(k_j, q_i, "bhkd,bhqd->bhkq")
                s_t = _mask(
                    s_t, i, j, bq, bk, q_seg_i, kv_seg_j, causal_tile, fill=raw_mask, transposed=True, q_pos_i=q_pos_i
                )
                p_t = jnp.exp(s_t * scale - lse_blocks[i])
                dv = dv + _dot(p_t.astype(do.dtype), do_i, "bhkq,bhqd->bhkd")
                dp_t = _dot(v_j, do_i, "bhkd,bhqd->bhkq")
                ds_t = (p_t * (dp_t - delta_blocks[i]) * scale).astype(q.dtype)
                dk = dk + _dot(ds_t, q_i, "bhkq,bhqd->bhkd")
                dq_t = dq_t.at[i].add(_dot(k_t_j, ds_t, "bhdk,bhkq->bhdq"))
                return dq_t, dk, dv

            return body

        zeros = jnp.zeros((b, hkv, bk, d), jnp.float32)
        carry = (dq_t, zeros, zeros)
        if q_pos is not None:
            carry = lax.fori_loop(0, nq, q_step(True), carry)
        elif settings.causal:
            i_lo, i_full = q_range(j, bq, bk, nq)
            carry = lax.fori_loop(i_lo, i_full, q_step(True), carry)
            carry = lax.fori_loop(i_full, nq, q_step(False), carry)
        else:
            carry = lax.fori_loop(0, nq, q_step(False), carry)
        dq_t, dk, dv = carry
        return dq_t, (dk, dv)

    k_blocks = _kv_to_blocks(k, bk)
    xs = (jnp.arange(k.shape[1] // bk), k_blocks, jnp.swapaxes(k_blocks, 3, 4), _kv_to_blocks(v, bk))
    xs = (*xs, _seg_to_blocks(kv_seg, bk))
    dq_t, (dk_blocks, dv_blocks) = lax.scan(kv_block, jnp.zeros((nq, b, hkv, d, rows), jnp.float32), xs)

    def kv_rows(x):
        return x.transpose(1, 0, 3, 2, 4).reshape(k.shape)

    return _blocks_to_rows(jnp.swapaxes(dq_t, 3, 4), bq, hq), kv_rows(dk_blocks), kv_rows(dv_blocks)


attention = attention_with_vjp(forward, backward)
