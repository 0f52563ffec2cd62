"""Flash attention as Pallas kernels for TPU (Mosaic lowering); `interpret=pltpu.InterpretParams()` (or True) runs them
on CPU for tests.

Kernels work in the [B, H, T, D] layout (the caller's [B, T, H, D] is transposed once) with a sequential innermost
grid axis that accumulates in VMEM scratch:
  forward  grid (B, Hq, T/bq, S/bk):      online softmax over kv blocks -> o, lse
  dq       grid (B, Hq, T/bq, S/bk):      P = exp(s - lse), dS = P (dO V^T - delta), dQ += dS K
  dkv      grid (B, Hkv, S/bk, G, T/bq):  in the transposed orientation s^T = K Q^T: dV += P^T dO, dK += dS^T Q, summed
                                          over the G query heads of the kv head (K/V never repeated)
Causal tiles above the diagonal are skipped (pl.when) and their index maps repeat the previous block so no DMA is
issued; only tiles straddling the diagonal build the causal mask. Row statistics (lse, delta) travel as [B, H, 8, T]
(sublane-replicated rows); query segment ids as [B, T, 128] (lane-replicated columns) next to kv segment ids [B, 8, S].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .common import DEAD_ROW, MASK_VALUE, Settings, attention_with_vjp, backward_lse
from .common import BlockSizes as _BaseBlockSizes
from .reference import mha_reference as reference

__all__ = ["BlockSizes", "attention", "backward", "check_head_dim", "forward", "reference"]

LANES = 128
SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # a [m, d] . b [n, d] -> [m, n]
_NN = (((1,), (0,)), ((), ()))  # a [m, k] . b [k, n] -> [m, n]


@dataclasses.dataclass(frozen=True)
class BlockSizes(_BaseBlockSizes):
    """Mosaic tiles: multiples of 128 (the lane width)."""

    block_q: int = 512
    block_kv: int = 512
    block_q_bwd: int | None = 256
    block_kv_bwd: int | None = 512

    multiple = LANES


def check_head_dim(head_dim: int) -> None:
    if not (head_dim == 64 or head_dim % LANES == 0):
        raise ValueError(
            f"head_dim {head_dim} (q.shape[3]) is not supported by the pallas_tpu backend: valid head_dim is 64 or a "
            f"multiple of {LANES}; use backend='xla' for other sizes"
        )


def _lanes(x, n: int):
    """[rows, 128] lane-replicated -> [rows, n]."""
    return jnp.tile(x, (1, n // LANES)) if n >= LANES else x[:, :n]


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _causal_visible(shape, row_start, col_start, *, rows_are_queries: bool):
    rows = row_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = col_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    return rows >= cols if rows_are_queries else cols >= rows


def _apply_mask(s, visible_causal, row_seg_ref, col_seg_ref):
    """s [r, c]; row segment ids lane-replicated [r, 128], column segment ids sublane-replicated [8, c]."""
    visible = visible_causal
    if row_seg_ref is not None:
        same = _lanes(row_seg_ref[...], s.shape[1]) == col_seg_ref[:1, :]
        visible = same if visible is None else visible & same
    return s if visible is None else jnp.where(visible, s, MASK_VALUE)


def _run_tiles(tile, causal: bool, q_start, q_block: int, kv_start, kv_block: int):
    """Call tile(causal_tile) for a visible tile: with the causal mask only when the tile straddles the diagonal."""
    if not causal:
        tile(False)
        return
    visible = kv_start <= q_start + q_block - 1
    straddles = kv_start + kv_block - 1 > q_start
    pl.when(visible & straddles)(lambda: tile(True))
    pl.when(visible & jnp.logical_not(straddles))(lambda: tile(False))


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, settings):
    bq, bk = settings.block_sizes.block_q, settings.block_sizes.block_kv
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def tile(causal_tile: bool):
        s = _dot(q_ref[...], k_ref[...], _NT) * settings.sm_scale
        causal = _causal_visible(s.shape, i * bq, j * bk, rows_are_queries=True) if causal_tile else None
        s = _apply_mask(s, causal, q_seg_ref, kv_seg_ref)
        m_prev = m_scr[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _lanes(m_next, bk))
        alpha = jnp.exp(m_prev - m_next)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        pv = _dot(p.astype(v_ref.dtype), v_ref[...], _NN)
        acc_scr[...] = acc_scr[...] * _lanes(alpha, acc_scr.shape[1]) + pv

    _run_tiles(tile, settings.causal, i * bq, bq, j * bk, bk)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        m, l = m_scr[...], l_scr[...]
        dead = m <= DEAD_ROW
        d = acc_scr.shape[1]
        o = acc_scr[...] / _lanes(jnp.where(dead, 1.0, l), d)
        o_ref[...] = jnp.where(_lanes(dead, d), 0.0, o).astype(o_ref.dtype)
        lse = jnp.where(dead, -jnp.inf, m + jnp.log(l))
        lse_ref[...] = jnp.transpose(lse)[:SUBLANES, :]


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr, *, settings):
    bq, bk = settings.block_sizes.q_bwd, settings.block_sizes.kv_bwd
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def tile(causal_tile: bool):
        k = k_ref[...]
        s = _dot(q_ref[...], k, _NT) * settings.sm_scale
        causal = _causal_visible(s.shape, i * bq, j * bk, rows_are_queries=True) if causal_tile else None
        s = _apply_mask(s, causal, q_seg_ref, kv_seg_ref)
        p = jnp.exp(s - jnp.expand_dims(lse_ref[0], -1))
        dp = _dot(do_ref[...], v_ref[...], _NT)
        ds = p * (dp - jnp.expand_dims(delta_ref[0], -1)) * settings.sm_scale
        dq_scr[...] += _dot(ds.astype(k.dtype), k, _NN)

    _run_tiles(tile, settings.causal, i * bq, bq, j * bk, bk)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_scr[...]


def _dkv_kernel(
    q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, settings
):
    bq, bk = settings.block_sizes.q_bwd, settings.block_sizes.kv_bwd
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def tile(causal_tile: bool):
        q, do = q_ref[...], do_ref[...]
        s_t = _dot(k_ref[...], q, _NT) * settings.sm_scale  # [bk, bq]
        causal = _causal_visible(s_t.shape, j * bk, i * bq, rows_are_queries=False) if causal_tile else None
        s_t = _apply_mask(s_t, causal, kv_seg_ref, q_seg_ref)
        p_t = jnp.exp(s_t - lse_ref[:1, :])
        dv_scr[...] += _dot(p_t.astype(do.dtype), do, _NN)
        dp_t = _dot(v_ref[...], do, _NT)
        ds_t = p_t * (dp_t - delta_ref[:1, :]) * settings.sm_scale
        dk_scr[...] += _dot(ds_t.astype(q.dtype), q, _NN)

    _run_tiles(tile, settings.causal, i * bq, bq, j * bk, bk)

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = dk_scr[...]
        dv_ref[...] = dv_scr[...]


def _to_bhtd(x):
    return x.transpose(0, 2, 1, 3)


def _rows(x):
    """[B, T, H] -> [B, H, 8, T] sublane-replicated."""
    b, t, h = x.shape
    return jnp.broadcast_to(x.transpose(0, 2, 1)[:, :, None, :], (b, h, SUBLANES, t))


def _seg_columns(seg):
    return None if seg is None else jnp.broadcast_to(seg[:, :, None], (*seg.shape, LANES))


def _seg_rows(seg):
    return None if seg is None else jnp.broadcast_to(seg[:, None, :], (seg.shape[0], SUBLANES, seg.shape[1]))


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _last_kv_block(i, block_q: int, block_kv: int):
    """Last kv block a causal query block i sees (index maps repeat it for skipped tiles: no new DMA)."""
    return lax.div((i + 1) * block_q - 1, block_kv)


def forward(q, k, v, q_seg, kv_seg, settings: Settings):
    """(o [B, T, Hq, D], lse [B, T, Hq] float32) by the Mosaic forward kernel."""
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    bq, bk = settings.block_sizes.block_q, settings.block_sizes.block_kv
    groups = hq // hkv

    def kv_block(i, j):
        return jnp.minimum(j, _last_kv_block(i, bq, bk)) if settings.causal else j

    seg_specs = [None, None]
    if q_seg is not None:
        seg_specs = [
            pl.BlockSpec((None, bq, LANES), lambda b_, h, i, j: (b_, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b_, h, i, j: (b_, 0, kv_block(i, j))),
        ]
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, i, j: (b_, lax.div(h, groups), kv_block(i, j), 0))
    o, lse = pl.pallas_call(
        functools.partial(_forward_kernel, settings=settings),
        grid=(b, hq, t // bq, s_len // bk),
        in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
        out_specs=[q_spec, pl.BlockSpec((None, None, SUBLANES, bq), lambda b_, h, i, j: (b_, h, 0, i))],
        out_shape=[
            jax.ShapeDtypeStruct((b, hq, t, d), q.dtype),
            jax.ShapeDtypeStruct((b, hq, SUBLANES, t), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=settings.interpret,
        name="qlx_flash_forward",
    )(_to_bhtd(q), _to_bhtd(k), _to_bhtd(v), _seg_columns(q_seg), _seg_rows(kv_seg))
    return _to_bhtd(o), lse[:, :, 0, :].transpose(0, 2, 1)


def backward(q, k, v, q_seg, kv_seg, do, lse, delta, settings: Settings):
    """(dq, dk, dv) float32 by the Mosaic dq and dkv kernels."""
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    bq, bk = settings.block_sizes.q_bwd, settings.block_sizes.kv_bwd
    groups = hq // hkv
    q_t, k_t, v_t, do_t = _to_bhtd(q), _to_bhtd(k), _to_bhtd(v), _to_bhtd(do)
    lse_rows, delta_rows = _rows(backward_lse(lse)), _rows(delta)

    def kv_block(i, j):
        return jnp.minimum(j, _last_kv_block(i, bq, bk)) if settings.causal else j

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, i, j: (b_, lax.div(h, groups), kv_block(i, j), 0))
    row_spec = pl.BlockSpec((None, None, SUBLANES, bq), lambda b_, h, i, j: (b_, h, 0, i))
    seg_specs = [None, None]
    if q_seg is not None:
        seg_specs = [
            pl.BlockSpec((None, bq, LANES), lambda b_, h, i, j: (b_, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b_, h, i, j: (b_, 0, kv_block(i, j))),
        ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, settings=settings),
        grid=(b, hq, t // bq, s_len // bk),
        in_specs=[q_spec, kv_spec, kv_spec, *seg_specs, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct((b, hq, t, d), jnp.float32),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=settings.interpret,
        name="qlx_flash_dq",
    )(q_t, k_t, v_t, _seg_columns(q_seg), _seg_rows(kv_seg), do_t, lse_rows, delta_rows)

    def q_block(i, j):
        return jnp.maximum(i, lax.div(j * bk, bq)) if settings.causal else i

    def q_head(h_kv, g):
        return h_kv * groups + g

    q_spec_t = pl.BlockSpec((None, None, bq, d), lambda b_, h, j, g, i: (b_, q_head(h, g), q_block(i, j), 0))
    kv_spec_t = pl.BlockSpec((None, None, bk, d), lambda b_, h, j, g, i: (b_, h, j, 0))
    row_spec_t = pl.BlockSpec((None, None, SUBLANES, bq), lambda b_, h, j, g, i: (b_, q_head(h, g), 0, q_block(i, j)))
    seg_specs_t = [None, None]
    if q_seg is not None:
        seg_specs_t = [
            pl.BlockSpec((None, SUBLANES, bq), lambda b_, h, j, g, i: (b_, 0, q_block(i, j))),
            pl.BlockSpec((None, bk, LANES), lambda b_, h, j, g, i: (b_, j, 0)),
        ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, settings=settings),
        grid=(b, hkv, s_len // bk, groups, t // bq),
        in_specs=[q_spec_t, kv_spec_t, kv_spec_t, *seg_specs_t, q_spec_t, row_spec_t, row_spec_t],
        out_specs=[kv_spec_t, kv_spec_t],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, s_len, d), jnp.float32)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=settings.interpret,
        name="qlx_flash_dkv",
    )(q_t, k_t, v_t, _seg_rows(q_seg), _seg_columns(kv_seg), do_t, lse_rows, delta_rows)
    return _to_bhtd(dq), _to_bhtd(dk), _to_bhtd(dv)


attention = attention_with_vjp(forward, backward)
