"""`flash_attention`: one entry point over the attention backends, in the layout of `jax.nn.dot_product_attention`."""

from __future__ import annotations

import types
import warnings
from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec

from . import blockwise, pallas_gpu, pallas_tpu
from .common import (
    BlockSizes,
    Settings,
    axis_tuple,
    check_mesh_axes,
    check_qkv,
    check_scale,
    check_segment_ids,
    place,
    shard_kv_heads,
    spec_entry,
)
from .reference import mha_reference

BACKENDS = {"xla": blockwise, "pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}
_PLATFORM_BACKEND = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}


def _fits(
    module: types.ModuleType, head_dim: int, dtype, q_len: int, kv_len: int, block_sizes: BlockSizes | None
) -> str:
    """Why `module` cannot run this shape ('' when it can)."""
    try:
        if hasattr(module, "check_head_dim"):
            module.check_head_dim(head_dim)
        _fit_blocks(module, block_sizes, q_len, kv_len, head_dim, dtype)
    except ValueError as err:
        return str(err)
    return ""


def _fit_blocks(
    module: types.ModuleType, block_sizes: BlockSizes | None, q_len: int, kv_len: int, head_dim: int, dtype
) -> BlockSizes:
    if block_sizes is None:
        return module.BlockSizes.default(head_dim, dtype).fit(q_len, kv_len, strict=False)
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a qlx.kernels.BlockSizes, got {type(block_sizes).__name__}")
    if isinstance(block_sizes, module.BlockSizes):  # the backend's own sizes keep their extra settings
        return block_sizes.fit(q_len, kv_len, strict=True)
    sizes = module.BlockSizes(
        block_q=block_sizes.block_q,
        block_kv=block_sizes.block_kv,
        block_q_bwd=block_sizes.block_q_bwd,
        block_kv_bwd=block_sizes.block_kv_bwd,
    )
    return sizes.fit(q_len, kv_len, strict=True)


def resolve_backend(
    backend: str,
    head_dim: int,
    dtype,
    q_len: int,
    kv_len: int,
    block_sizes: BlockSizes | None,
    *,
    positions: bool = False,
) -> types.ModuleType:
    """The kernel module for `backend`. "auto": Pallas on TPU / GPU when it supports the shape, else the XLA blockwise
    kernel (with a warning saying why); a named backend that cannot run the shape raises. Query positions over a KV
    cache (`positions`) run on the XLA blockwise kernel: "auto" falls back to it with a warning."""
    if backend == "auto":
        name = _PLATFORM_BACKEND.get(jax.default_backend())
        if name is None:
            return blockwise
        reason = "q_positions (a KV cache) runs on the xla kernel only" if positions else ""
        reason = reason or _fits(BACKENDS[name], head_dim, dtype, q_len, kv_len, block_sizes)
        if not reason:
            return BACKENDS[name]
        warnings.warn(f"qlx.kernels: using the xla blockwise backend instead of {name}: {reason}", stacklevel=3)
        return blockwise
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto', 'reference', *BACKENDS]}, got {backend!r}")
    module = BACKENDS[backend]
    if hasattr(module, "check_head_dim"):
        module.check_head_dim(head_dim)
    return module


def make_settings(
    module: types.ModuleType,
    *,
    causal: bool,
    sm_scale: float,
    block_sizes: BlockSizes | None,
    q_len: int,
    kv_len: int,
    head_dim: int,
    dtype,
    interpret,
) -> Settings:
    """Settings with block sizes fitted to (q_len, kv_len) for `module` (explicit sizes must divide the lengths;
    default sizes are the backend's for `head_dim` and the input `dtype`)."""
    return Settings(
        causal=causal,
        sm_scale=sm_scale,
        block_sizes=_fit_blocks(module, block_sizes, q_len, kv_len, head_dim, dtype),
        interpret=interpret,
    )


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    interpret=False,
):
    """Memory-efficient attention: o = softmax(sm_scale * q k^T + mask) v, never materialising [T, S].

    Args:
      q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv (grouped-query attention: query head h reads
        kv head h // (Hq // Hkv); K/V are not repeated).
      causal: key u is visible to query t only when u <= t (needs T == S).
      segment_ids: [B, T] int (needs T == S); a query sees only keys of its own segment (packed sequences).
      q_positions: [B, T] int, queries over a KV cache of S slots (T may differ from S; needs causal=True, no
        segment_ids, the XLA blockwise kernel): key u is visible to query (b, t) iff u <= q_positions[b, t]; a
        negative position sees nothing. Each query block visits only the key blocks up to its largest position.
      sm_scale: logit scale, default 1 / sqrt(D).
      block_sizes: tile sizes (`qlx.kernels.BlockSizes`); default: the backend's, shrunk to divide the lengths.
      return_lse: also return the log-sum-exp [B, T, Hq] float32 (differentiable) so partial results over disjoint
        key sets can be merged with `merge_partials`.
      backend: "auto" (Pallas on TPU / GPU, XLA blockwise on CPU), "xla", "pallas_tpu", "pallas_gpu", or "reference"
        (dense, O(T x S) memory).
      interpret: run the Pallas kernels in interpret mode (CPU tests): True, or `pltpu.InterpretParams()`.
    Returns:
      o [B, T, Hq, D] in q.dtype, or (o, lse) with return_lse. Rows that see no key get o = 0 and lse = -inf.
    """
    check_qkv(q, k, v, causal=causal and q_positions is None)
    b, t, _, d = q.shape
    s_len = k.shape[1]
    if segment_ids is not None and t != s_len:
        raise ValueError(f"segment_ids needs equal q and k/v lengths, got q seq {t} and k/v seq {s_len}")
    check_segment_ids(segment_ids, b, t)
    check_segment_ids(q_positions, b, t, name="q_positions")
    if q_positions is not None and (segment_ids is not None or not causal or backend not in ("auto", "xla")):
        raise ValueError(
            "q_positions (attention over a KV cache) needs causal=True, no segment_ids and backend 'auto' or 'xla' "
            f"(the XLA blockwise kernel); got causal={causal}, "
            f"segment_ids={'given' if segment_ids is not None else None}, backend={backend!r}"
        )
    sm_scale = check_scale(d, sm_scale)
    if backend == "reference":
        o, lse = mha_reference(q, k, v, segment_ids, segment_ids, causal=causal, sm_scale=sm_scale)
    else:
        module = resolve_backend(backend, d, q.dtype, t, s_len, block_sizes, positions=q_positions is not None)
        settings = make_settings(
            module,
            causal=causal,
            sm_scale=sm_scale,
            block_sizes=block_sizes,
            q_len=t,
            kv_len=s_len,
            head_dim=d,
            dtype=q.dtype,
            interpret=interpret,
        )
        o, lse = module.attention(q, k, v, segment_ids, segment_ids, settings, q_pos=q_positions)
    return (o, lse) if return_lse else o


def sharded_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    batch_axes: str | Sequence[str] | None = None,
    head_axes: str | Sequence[str] | None = None,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str = "auto",
    interpret=False,
) -> jax.Array:
    """`flash_attention` on a mesh: a `jax.shard_map` over the batch and head mesh axes, so every device runs the
    kernel on its own [B / nb, T, Hq / nh, D] shard (a Pallas kernel is a custom call the compiler cannot partition).

    Args:
      q, k, v, causal, segment_ids, sm_scale, block_sizes, backend, interpret: as in `flash_attention` (global arrays).
      mesh: the device mesh.
      batch_axes: mesh axes the batch dimension is sharded over (nb = their product); None: replicated.
      head_axes: mesh axes the query heads are sharded over (nh = their product, which must divide Hq); None:
        replicated. K/V heads shard with their query heads: as they are when nh divides Hkv, else (Hkv dividing nh)
        each kv head repeated nh / Hkv times, never up to Hq.
      The sequence is whole on every device (a sequence-sharded input is gathered; `ring_attention` splits it), and
      other mesh axes repeat the same computation. The input specs are P(batch_axes, None, head_axes, None) and
      P(batch_axes, None) for segment_ids: arrays sharded that way enter without communication.
    Returns:
      o [B, T, Hq, D] in q.dtype, sharded as P(batch_axes, None, head_axes, None).
    """
    check_qkv(q, k, v, causal=causal)
    check_segment_ids(segment_ids, q.shape[0], q.shape[1])
    batch_axes, head_axes = axis_tuple(batch_axes), axis_tuple(head_axes)
    roles = [*[("batch_axes", a) for a in batch_axes], *[("head_axes", a) for a in head_axes]]
    check_mesh_axes(mesh, "sharded_flash_attention", roles)
    k, v = shard_kv_heads(q, k, v, mesh, batch_axes, head_axes)
    spec = PartitionSpec(spec_entry(batch_axes), None, spec_entry(head_axes), None)
    seg_spec = PartitionSpec(spec_entry(batch_axes), None)

    def local(q, k, v, seg):
        return flash_attention(
            q,
            k,
            v,
            causal=causal,
            segment_ids=seg,
            sm_scale=sm_scale,
            block_sizes=block_sizes,
            backend=backend,
            interpret=interpret,
        )

    q, k, v = (place(x, mesh, spec) for x in (q, k, v))
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False)
    return sharded(q, k, v, place(segment_ids, mesh, seg_spec))
