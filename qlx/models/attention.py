"""The model's single attention dispatch, and the dense reference backend.

Layout is [B, T, H, D] for queries and [B, S, KV, D] for keys/values (grouped-query attention: H is a multiple of
KV; query head h reads kv head h // (H // KV), as Hugging Face's ``repeat_kv``).

Backends (``ModelConfig.attention``):
- ``"reference"``: dense XLA attention, float32 scores and softmax. Masks: causal + segment ids, or, over a KV
  cache, "key slot s is visible to query (b, t) iff s <= q_positions[b, t]". Long causal self-attention is split
  into query chunks that each attend only to their key prefix (:func:`causal_chunked_attention`), which skips most
  of the masked upper triangle (about (n + 1) / 2n of the dense work for n chunks) with the same dense maths.
- ``"flash"``: ``qlx.kernels.flash_attention`` (Pallas on TPU / GPU, XLA blockwise on CPU; O(T x block) memory).
  On a mesh it runs inside a ``shard_map`` over the mesh axes the rules give q's "batch" and "heads" dimensions
  (``qlx.kernels.sharded_flash_attention``): each device calls the kernel on its own batch / head shard, which a
  Pallas kernel needs (the compiler cannot partition it). The sequence is whole on every device.
- ``"ring"``: ``qlx.kernels.ring_attention`` over the mesh axis ``"seq"`` of ``layout.mesh`` (which must exist and
  have ``seq`` > 1, else a ValueError). Causal inputs must already be in the zig-zag layout of
  ``qlx.kernels.balance_tokens(x, mesh.shape["seq"])``: the model permutes tokens once at its input
  (``Qwen3ForCausalLM.hidden_states``). Batch / head mesh axes are those the logical-axis rules give
  ("batch", "heads"), so activations constrained by the model enter the ring without communication.
Attention over a KV cache (``q_positions_bt``) is the same for every backend (:func:`cache_attention`): one query
per row (decode) takes the dense reference; several (prefill, chunked prefill) the XLA blockwise kernel with query
positions, which visits only the key blocks up to each query block's largest position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlx.kernels import flash_attention, ring_attention, sharded_flash_attention
from qlx.mesh import spec_axes
from qlx.models.sharding import Layout, spec_for

BACKENDS = ("reference", "flash", "ring")
RING_AXIS = "seq"
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    t: int,
    s: int,
    *,
    causal: bool = True,
    segment_ids_bt: jax.Array | None = None,
    q_positions_bt: jax.Array | None = None,
) -> jax.Array:
    """Boolean visibility mask [B or 1, T, S].

    Without ``q_positions_bt`` (T == S): key s visible to query t iff (not causal or s <= t) and, with segment ids,
    segment_ids[b, s] == segment_ids[b, t]. With ``q_positions_bt`` (keys are cache slots 0..S-1): key s visible
    iff s <= q_positions[b, t]; a negative position (padding) sees nothing.
    """
    if q_positions_bt is not None:
        return jnp.arange(s)[None, None, :] <= q_positions_bt[:, :, None]
    mask = jnp.ones((1, t, s), dtype=bool)
    if causal:
        mask = jnp.tril(mask)
    if segment_ids_bt is not None:
        mask = mask & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return mask


def reference_attention(
    q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array, sm_scale: float
) -> jax.Array:
    """softmax(q k^T * sm_scale, masked) v per kv group, in float32. Returns [B, T, H, D].

    Computed as (exp(s - max s) v) / sum exp(s - max s): the normalisation divides the [.., D] output rather than
    the [.., S] probabilities. Fully masked rows (padding queries) get a uniform average instead of NaN.
    """
    b, t, h, d = q_bthd.shape
    kv = k_bskd.shape[2]
    q_btkgd = (q_bthd * sm_scale).reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bktgs", q_btkgd, k_bskd, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bts[:, None, :, None, :], scores, _MASKED)
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    out = jnp.einsum("bktgs,bskd->bktgd", weights.astype(v_bskd.dtype), v_bskd, preferred_element_type=jnp.float32)
    out = out / jnp.sum(weights, axis=-1)[..., None]
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, t, h, d).astype(v_bskd.dtype)


def chunk_bounds(t: int, *, min_chunk: int = 128, max_chunks: int = 8) -> list[tuple[int, int]]:
    """Static [start, end) query chunks: as many as fit ``min_chunk`` rows, at most ``max_chunks``."""
    n = max(1, min(max_chunks, t // min_chunk))
    edges = [round(i * t / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def causal_chunked_attention(
    q_bthd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array, *, segment_ids_bt: jax.Array | None, sm_scale: float
) -> jax.Array:
    """Causal self-attention, queries [start, end) of each chunk against keys [0, end) with the dense reference.

    Equal to ``reference_attention`` with the full causal (+ segment) mask: keys past ``end`` are masked for every
    query of the chunk anyway.
    """
    outputs = []
    for start, end in chunk_bounds(q_bthd.shape[1]):
        mask = jnp.arange(end)[None, None, :] <= jnp.arange(start, end)[None, :, None]
        if segment_ids_bt is not None:
            mask = mask & (segment_ids_bt[:, start:end, None] == segment_ids_bt[:, None, :end])
        outputs.append(reference_attention(q_bthd[:, start:end], k_bthd[:, :end], v_bthd[:, :end], mask, sm_scale))
    return jnp.concatenate(outputs, axis=1)


def cache_attention(
    q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, q_positions_bt: jax.Array, sm_scale: float
) -> jax.Array:
    """Queries at ``q_positions_bt`` [B, T] over a KV cache of S slots: key s visible iff s <= position (a negative
    position is padding and sees nothing). Returns [B, T, H, D].

    T == 1 (decode): the dense reference, [B, H, 1, S] scores. T > 1 (prefill, chunked prefill):
    ``flash_attention(q_positions=...)`` on the XLA blockwise kernel, whose query blocks skip the key blocks past
    their largest position, so a chunk at offset P costs O(P + T) per query row instead of O(S). Its tiles must
    divide T and S: T is padded with position -1 queries to a multiple of 128 (of 16 below 128), S with never
    visible slots to a multiple of 128. Padding queries give 0 here (the reference gives a uniform average).
    """
    t, s = q_bthd.shape[1], k_bskd.shape[1]
    if t == 1:
        return reference_attention(
            q_bthd, k_bskd, v_bskd, attention_mask(t, s, q_positions_bt=q_positions_bt), sm_scale
        )
    return blockwise_cache_attention(q_bthd, k_bskd, v_bskd, q_positions_bt, sm_scale)


def blockwise_cache_attention(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    q_positions_bt: jax.Array,
    sm_scale: float,
    *,
    return_lse: bool = False,
):
    """``flash_attention(q_positions=...)`` on the XLA blockwise kernel with T padded by position −1 queries to a
    multiple of 128 (of 16 below 128) and S by never-visible slots to a multiple of 128 (positions stay below S).
    Returns o [B, T, H, D], or (o, lse [B, T, H]) with ``return_lse``."""
    t, s = q_bthd.shape[1], k_bskd.shape[1]
    pad_t, pad_s = -t % (128 if t >= 128 else 16), -s % 128
    q_bthd = jnp.pad(q_bthd, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
    q_positions_bt = jnp.pad(q_positions_bt, ((0, 0), (0, pad_t)), constant_values=-1)
    k_bskd, v_bskd = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (k_bskd, v_bskd))
    out = flash_attention(
        q_bthd, k_bskd, v_bskd, q_positions=q_positions_bt, sm_scale=sm_scale, backend="xla", return_lse=return_lse
    )
    return (out[0][:, :t], out[1][:, :t]) if return_lse else out[:, :t]


def ring_size(layout: Layout | None) -> int:
    """Devices on the ring axis ``"seq"`` of the layout's mesh; ValueError when there is no mesh or seq is 1."""
    mesh = None if layout is None else layout.mesh
    size = 1 if mesh is None or RING_AXIS not in mesh.axis_names else mesh.shape[RING_AXIS]
    if size < 2:
        where = "the model has no mesh" if mesh is None else f"its mesh has {RING_AXIS}={size}"
        raise ValueError(
            f"model.attention='ring' needs a mesh whose {RING_AXIS!r} axis has more than one device, but {where}; "
            "set mesh.seq > 1 or use model.attention='flash'"
        )
    return size


def batch_and_head_axes(q_bthd: jax.Array, layout: Layout) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The mesh axes the rules give q's "batch" and "heads" dimensions (after dropping axes that do not divide them):
    the sharding the model constrains q to, so attention entering a shard_map over them moves nothing."""
    spec = spec_for(q_bthd.shape, ("batch", "length", "heads", None), layout.mesh, dict(layout.rules))
    return spec_axes(spec[0]), spec_axes(spec[2])


def flash_self_attention(
    q_bthd: jax.Array,
    k_btkd: jax.Array,
    v_btkd: jax.Array,
    *,
    layout: Layout | None,
    causal: bool,
    segment_ids_bt: jax.Array | None,
    sm_scale: float,
) -> jax.Array:
    """``flash_attention``; on the layout's mesh, per batch / head shard inside a shard_map. Returns [B, T, H, D]."""
    if layout is None or layout.mesh is None:
        return flash_attention(q_bthd, k_btkd, v_btkd, causal=causal, segment_ids=segment_ids_bt, sm_scale=sm_scale)
    batch_axes, head_axes = batch_and_head_axes(q_bthd, layout)
    return sharded_flash_attention(
        q_bthd,
        k_btkd,
        v_btkd,
        mesh=layout.mesh,
        batch_axes=batch_axes,
        head_axes=head_axes,
        causal=causal,
        segment_ids=segment_ids_bt,
        sm_scale=sm_scale,
    )


def ring_self_attention(
    q_bthd: jax.Array,
    k_btkd: jax.Array,
    v_btkd: jax.Array,
    *,
    layout: Layout | None,
    causal: bool,
    segment_ids_bt: jax.Array | None,
    sm_scale: float,
) -> jax.Array:
    """Ring attention on the layout's mesh (causal inputs in the balanced layout). Returns [B, T, H, D].

    batch_axes / head_axis are the mesh axes the rules give q's "batch" / "heads" dimensions (after dropping axes
    that do not divide them), the sharding the model constrains q to.
    """
    ring_size(layout)
    batch_axes, heads = batch_and_head_axes(q_bthd, layout)
    if len(heads) > 1:
        raise ValueError(f"model.attention='ring' shards heads over one mesh axis, but the rules give 'heads' {heads}")
    return ring_attention(
        q_bthd,
        k_btkd,
        v_btkd,
        mesh=layout.mesh,
        axis=RING_AXIS,
        causal=causal,
        segment_ids=segment_ids_bt,
        layout="balanced",
        sm_scale=sm_scale,
        batch_axes=batch_axes,
        head_axis=heads[0] if heads else None,
    )


def attention(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    *,
    backend: str = "reference",
    causal: bool = True,
    segment_ids_bt: jax.Array | None = None,
    q_positions_bt: jax.Array | None = None,
    sm_scale: float | None = None,
    layout: Layout | None = None,
) -> jax.Array:
    """Grouped-query attention through the backend named by ``model.attention``. Returns [B, T, H, D].

    q [B, T, H, D]; k, v [B, S, KV, D]; sm_scale defaults to D ** -0.5. Give either ``causal``/``segment_ids_bt``
    (self-attention over the same T tokens) or ``q_positions_bt`` (queries at those positions over a KV cache of S
    slots). Attention over a KV cache (decode, chunked prefill) is :func:`cache_attention` for every backend.
    ``layout`` (the model's mesh and rules) places ``"flash"`` (shard_map over batch / heads) and ``"ring"`` (needs
    it; its causal inputs are in the balanced layout).
    """
    if backend not in BACKENDS:
        raise ValueError(f"model.attention: unknown backend {backend!r}; valid values: {', '.join(BACKENDS)}")
    sm_scale = q_bthd.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    t, s = q_bthd.shape[1], k_bskd.shape[1]
    if q_positions_bt is not None:
        if segment_ids_bt is not None:
            raise ValueError("attention over a KV cache (q_positions_bt) does not take segment_ids_bt")
        return cache_attention(q_bthd, k_bskd, v_bskd, q_positions_bt, sm_scale)
    if backend == "reference":
        if causal:
            return causal_chunked_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt=segment_ids_bt, sm_scale=sm_scale)
        mask = attention_mask(t, s, causal=False, segment_ids_bt=segment_ids_bt)
        return reference_attention(q_bthd, k_bskd, v_bskd, mask, sm_scale)
    self_attention = flash_self_attention if backend == "flash" else ring_self_attention
    return self_attention(
        q_bthd, k_bskd, v_bskd, layout=layout, causal=causal, segment_ids_bt=segment_ids_bt, sm_scale=sm_scale
    )
