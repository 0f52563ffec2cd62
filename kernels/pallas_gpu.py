"""Flash attention as Pallas kernels for GPU (Triton lowering); `interpret=True` runs them on CPU for tests.

Works in the [B, T, H, D] layout directly (a block is [block, D] of one head). Three kernels:
  forward  grid (T/bq, B, Hq): loop over the kv blocks left of the diagonal with an online softmax -> o, lse
  dq       grid (T/bq, B, Hq): same loop, P = exp(s - lse), dS = P (dO V^T - delta), dQ += dS K (own tiles: *_dq)
  dkv      grid (S/bk, B, Hkv): loop over the G query heads of this kv head and the query blocks that see this kv
           block: dV += P^T dO, dK += dS^T Q (grouped-query gradients summed in-kernel, K/V never repeated)
Tiles straddling the causal diagonal build the causal mask; the others skip it; tiles above it are never visited.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .common import DEAD_ROW, MASK_VALUE, Settings, attention_with_vjp, backward_lse, kv_range, q_range
from .common import BlockSizes as _BaseBlockSizes
from .reference import mha_reference as reference

__all__ = ["BlockSizes", "HEAD_DIMS", "attention", "backward", "check_head_dim", "forward", "reference"]

HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class BlockSizes(_BaseBlockSizes):
    """Triton tiles: powers of two, at least 16 (tensor-core dot shapes). block_q_bwd x block_kv_bwd tile the dkv
    kernel, block_q_dq x block_kv_dq the dq kernel (None: the dkv kernel's). Plus the Triton launch settings
    (num_warps None: 4 for head_dim <= 64, else 8; num_stages: software-pipelining depth of the inner loops)."""

    block_q: int = 128
    block_kv: int = 128
    block_q_bwd: int | None = 128
    block_kv_bwd: int | None = 64
    block_q_dq: int | None = None
    block_kv_dq: int | None = None
    num_warps: int | None = None
    num_stages: int = 2

    multiple = 16
    power_of_two = True

    def __post_init__(self):
        super().__post_init__()
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"pallas_gpu.BlockSizes.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"pallas_gpu.BlockSizes.num_stages must be a positive int, got {self.num_stages!r}")

    @classmethod
    def default(cls, head_dim: int, dtype) -> BlockSizes:
        """Tiles measured fastest on an H200 for bf16 at head_dim 128 (BUILD_NOTES); wider rows (head_dim x bytes)
        get smaller tiles so the pipelined K/V tiles fit the shared memory (a [128, 128] float32 tile is 64 KiB)."""
        row_bytes = head_dim * jnp.dtype(dtype).itemsize
        if row_bytes <= 256:
            return cls()
        if row_bytes <= 512:
            return cls(block_q=128, block_kv=64, block_q_bwd=64, block_kv_bwd=64)
        return cls(block_q=64, block_kv=32, block_q_bwd=32, block_kv_bwd=32)

    @property
    def q_dq(self) -> int:
        return self.block_q_dq or self.q_bwd

    @property
    def kv_dq(self) -> int:
        return self.block_kv_dq or self.kv_bwd

    def fit(self, q_len: int, kv_len: int, *, strict: bool) -> BlockSizes:
        fitted = super().fit(q_len, kv_len, strict=strict)
        return dataclasses.replace(
            fitted,
            block_q_dq=self._fit_one("block_q_dq", self.q_dq, q_len, "q", strict),
            block_kv_dq=self._fit_one("block_kv_dq", self.kv_dq, kv_len, "k/v", strict),
        )


def check_head_dim(head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(
            f"head_dim {head_dim} (q.shape[3]) is not supported by the pallas_gpu backend: valid head_dim {HEAD_DIMS}; "
            f"use backend='xla' for other sizes"
        )


def _compiler_params(sizes: BlockSizes, head_dim: int) -> plgpu.CompilerParams:
    num_warps = sizes.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=sizes.num_stages)


def _mask(s, q_start, kv_start, q_seg, kv_seg, causal_tile: bool):
    """s [bq, bk] scores of queries q_start.. and keys kv_start..; invisible ones -> MASK_VALUE."""
    visible = None
    if causal_tile:
        bq, bk = s.shape
        visible = (q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)) >= (
            kv_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        )
    if q_seg is not None:
        same = q_seg[:, None] == kv_seg[None, :]
        visible = same if visible is None else visible & same
    return s if visible is None else jnp.where(visible, s, MASK_VALUE)


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *, settings: Settings, num_kv):
    bq, bk = settings.block_sizes.block_q, settings.block_sizes.block_kv
    i = pl.program_id(0)
    q = q_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def step(causal_tile: bool):
        def body(j, carry):
            m, l, acc = carry
            kv_slice = pl.ds(j * bk, bk)
            s = plgpu.dot(q, k_ref[kv_slice, :], trans_b=True) * settings.sm_scale
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[kv_slice]
            s = _mask(s, i * bq, j * bk, q_seg, kv_seg, causal_tile)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[:, None])
            l = alpha * l + jnp.sum(p, axis=1)
            acc = alpha[:, None] * acc + plgpu.dot(p.astype(v_ref.dtype), v_ref[kv_slice, :])
            return m_new, l, acc

        return body

    carry = (
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
    )
    if settings.causal:
        n_full, n_hi = kv_range(i, bq, bk, num_kv)
        carry = lax.fori_loop(0, n_full, step(False), carry)
        carry = lax.fori_loop(n_full, n_hi, step(True), carry)
    else:
        carry = lax.fori_loop(0, num_kv, step(False), carry)
    m, l, acc = carry
    dead = m <= DEAD_ROW
    o_ref[...] = jnp.where(dead[:, None], 0.0, acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(dead, -jnp.inf, m + jnp.log(l))


def _dq_kernel(
    q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, settings: Settings, num_kv
):
    bq, bk = settings.block_sizes.q_dq, settings.block_sizes.kv_dq
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def step(causal_tile: bool):
        def body(j, dq):
            kv_slice = pl.ds(j * bk, bk)
            k = k_ref[kv_slice, :]
            s = plgpu.dot(q, k, trans_b=True) * settings.sm_scale
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[kv_slice]
            s = _mask(s, i * bq, j * bk, q_seg, kv_seg, causal_tile)
            p = jnp.exp(s - lse[:, None])
            dp = plgpu.dot(do, v_ref[kv_slice, :], trans_b=True)
            ds = (p * (dp - delta[:, None]) * settings.sm_scale).astype(k.dtype)
            return dq + plgpu.dot(ds, k)

        return body

    dq = jnp.zeros(dq_ref.shape, jnp.float32)
    if settings.causal:
        n_full, n_hi = kv_range(i, bq, bk, num_kv)
        dq = lax.fori_loop(0, n_full, step(False), dq)
        dq = lax.fori_loop(n_full, n_hi, step(True), dq)
    else:
        dq = lax.fori_loop(0, num_kv, step(False), dq)
    dq_ref[...] = dq


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    q_seg_ref,
    kv_seg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    settings: Settings,
    num_q,
    groups,
):
    bq, bk = settings.block_sizes.q_bwd, settings.block_sizes.kv_bwd
    j, b, h_kv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]

    def step(causal_tile: bool, h):
        def body(i, carry):
            dk, dv = carry
            q_slice = pl.ds(i * bq, bq)
            q, do = q_ref[b, q_slice, h, :], do_ref[b, q_slice, h, :]
            s = plgpu.dot(q, k, trans_b=True) * settings.sm_scale
            q_seg = None if q_seg_ref is None else q_seg_ref[b, q_slice]
            s = _mask(s, i * bq, j * bk, q_seg, kv_seg, causal_tile)
            p = jnp.exp(s - lse_ref[b, h, q_slice][:, None])
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
            dp = plgpu.dot(do, v, trans_b=True)
            ds = (p * (dp - delta_ref[b, h, q_slice][:, None]) * settings.sm_scale).astype(q.dtype)
            return dk + plgpu.dot(ds, q, trans_a=True), dv

        return body

    def head(g, carry):
        h = h_kv * groups + g
        if settings.causal:
            i_lo, i_full = q_range(j, bq, bk, num_q)
            carry = lax.fori_loop(i_lo, i_full, step(True, h), carry)
            return lax.fori_loop(i_full, num_q, step(False, h), carry)
        return lax.fori_loop(0, num_q, step(False, h), carry)

    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _seg_specs(q_seg, kv_seg, q_block, kv_block, q_index, kv_index):
    if q_seg is None:
        return [None, None]
    return [pl.BlockSpec(q_block, q_index), pl.BlockSpec(kv_block, kv_index)]


def forward(q, k, v, q_seg, kv_seg, settings: Settings):
    """(o [B, T, Hq, D], lse [B, T, Hq] float32) by the Triton forward kernel."""
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    bq, bk = settings.block_sizes.block_q, settings.block_sizes.block_kv
    groups = hq // hkv
    kernel = functools.partial(_forward_kernel, settings=settings, num_kv=s_len // bk)
    o, lse = pl.pallas_call(
        kernel,
        grid=(t // bq, b, hq),
        in_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)),
            pl.BlockSpec((None, s_len, None, d), lambda i, b_, h: (b_, 0, lax.div(h, groups), 0)),
            pl.BlockSpec((None, s_len, None, d), lambda i, b_, h: (b_, 0, lax.div(h, groups), 0)),
            *_seg_specs(q_seg, kv_seg, (None, bq), (None, s_len), lambda i, b_, h: (b_, i), lambda i, b_, h: (b_, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i)),
        ],
        out_shape=[q, jax.ShapeDtypeStruct((b, hq, t), jnp.float32)],
        compiler_params=_compiler_params(settings.block_sizes, d),
        interpret=settings.interpret,
        name="qlx_flash_forward",
    )(q, k, v, q_seg, kv_seg)
    return o, lse.transpose(0, 2, 1)


def backward(q, k, v, q_seg, kv_seg, do, lse, delta, settings: Settings):
    """(dq, dk, dv) float32 by the Triton dq and dkv kernels."""
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    groups = hq // hkv
    lse_bht = backward_lse(lse).transpose(0, 2, 1)
    delta_bht = delta.transpose(0, 2, 1)
    params = _compiler_params(settings.block_sizes, d)
    bq, bk = settings.block_sizes.q_dq, settings.block_sizes.kv_dq
    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b_, h: (b_, i, h, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, settings=settings, num_kv=s_len // bk),
        grid=(t // bq, b, hq),
        in_specs=[
            q_spec,
            pl.BlockSpec((None, s_len, None, d), lambda i, b_, h: (b_, 0, lax.div(h, groups), 0)),
            pl.BlockSpec((None, s_len, None, d), lambda i, b_, h: (b_, 0, lax.div(h, groups), 0)),
            *_seg_specs(q_seg, kv_seg, (None, bq), (None, s_len), lambda i, b_, h: (b_, i), lambda i, b_, h: (b_, 0)),
            q_spec,
            pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i)),
            pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i)),
        ],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        compiler_params=params,
        interpret=settings.interpret,
        name="qlx_flash_dq",
    )(q, k, v, q_seg, kv_seg, do, lse_bht, delta_bht)
    bq, bk = settings.block_sizes.q_bwd, settings.block_sizes.kv_bwd
    whole = pl.BlockSpec()
    kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, b_, h: (b_, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, settings=settings, num_q=t // bq, groups=groups),
        grid=(s_len // bk, b, hkv),
        in_specs=[
            whole,
            kv_spec,
            kv_spec,
            *_seg_specs(q_seg, kv_seg, None, (None, bk), None, lambda j, b_, h: (b_, j)),
            whole,
            whole,
            whole,
        ],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, jnp.float32)] * 2,
        compiler_params=params,
        interpret=settings.interpret,
        name="qlx_flash_dkv",
    )(q, k, v, q_seg, kv_seg, do, lse_bht, delta_bht)
    return dq, dk, dv


attention = attention_with_vjp(forward, backward)
