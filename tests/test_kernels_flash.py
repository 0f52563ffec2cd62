"""flash_attention (XLA blockwise backend on CPU) against jax.nn.dot_product_attention: causal and not, grouped-query
attention, segment ids, several block counts; queries at positions over a KV cache; the log-sum-exp and its gradient;
memory linear in length; flash_attention in a shard_map over batch / head mesh axes; errors."""

import jax
import jax.numpy as jnp
import pytest
from qlx.kernels import blockwise, flash
from qlx.kernels.common import Settings
from test_kernels_common import assert_close, check_against_dense, dense_attention, random_inputs, value_and_vjp

from qlx import kernels


@pytest.mark.parametrize(
    "seed, causal, hq, hkv, segments, block_sizes",
    [
        (1, True, 4, 2, 0, kernels.BlockSizes(16, 16)),  # 4 x 4 tiles
        (2, True, 4, 1, 3, kernels.BlockSizes(8, 32)),  # 8 x 2 tiles, one kv head for all query heads
        (3, False, 4, 4, 0, kernels.BlockSizes(32, 8)),  # 2 x 8 tiles
        (4, False, 6, 2, 4, kernels.BlockSizes(64, 64)),  # a single tile
        (5, True, 2, 2, 2, kernels.BlockSizes(16, 32, block_q_bwd=32, block_kv_bwd=8)),  # other backward tiles
    ],
)
def test_blockwise_matches_dense(seed, causal, hq, hkv, segments, block_sizes):
    q, k, v, do, seg = random_inputs(seed, 2, 64, hq, hkv, 16, segments=segments)

    def attention(q, k, v):
        return kernels.flash_attention(q, k, v, causal=causal, segment_ids=seg, block_sizes=block_sizes, backend="xla")

    check_against_dense(attention, q, k, v, do, causal=causal, segment_ids=seg)


@pytest.mark.parametrize(
    ("hq", "hkv", "block_sizes"),
    [(4, 2, kernels.BlockSizes(8, 16)), (2, 1, kernels.BlockSizes(24, 32, block_q_bwd=8, block_kv_bwd=16))],
)
def test_query_positions_over_a_kv_cache(hq, hkv, block_sizes):
    """A chunk of T = 24 queries over S = 96 cache slots: row 0 at 10..33, row 1 at 50..73 with its last 4 queries
    padding (-1). Key u is visible iff u <= position. Keys from the first block past the largest position on hold NaN
    in V (any visit would poison the output), so the loop must skip them. Forward and gradients against dense
    attention with the same mask; padding rows give 0."""
    t, s = 24, 96
    q, _, _, do, _ = random_inputs(40 + hq, 2, t, hq, hkv, 16)
    _, k, v, _, _ = random_inputs(50 + hq, 2, s, hq, hkv, 16)
    pos = jnp.stack([jnp.arange(10, 10 + t), jnp.where(jnp.arange(t) < t - 4, jnp.arange(50, 50 + t), -1)])
    valid = (pos >= 0)[:, :, None, None]
    do = jnp.where(valid, do, 0.0)
    first_unseen = (73 // block_sizes.block_kv + 1) * block_sizes.block_kv
    v_poisoned = v.at[:, first_unseen:].set(jnp.nan)
    mask = (jnp.arange(s)[None, None, :] <= pos[:, :, None])[:, None]

    def ours(q, k, v):
        return kernels.flash_attention(q, k, v, q_positions=pos, block_sizes=block_sizes, backend="xla")

    def dense(q, k, v):
        return jnp.where(valid, jax.nn.dot_product_attention(q, k, v, mask=mask), 0.0)

    out, grads = value_and_vjp(ours, q, k, v, do)
    ref, ref_grads = value_and_vjp(dense, q, k, v, do)
    assert_close(out, ref, 2e-5, "output")
    assert not jnp.any(out[1, t - 4 :])
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, 1e-4, name)
    assert_close(jax.jit(ours)(q, k, v_poisoned), ref, 2e-5, "output with NaN in never-visible key blocks")


def test_lse_and_its_gradient():
    """lse = log sum exp of the visible scaled scores; a loss on (o, lse) differentiates like the dense formula."""
    q, k, v, do, seg = random_inputs(6, 1, 48, 4, 2, 8, segments=2)
    dlse = jax.random.normal(jax.random.key(60), (1, 48, 4))
    scale = 0.3

    def dense_lse(q, k):
        s = jnp.einsum("bthd,buhd->bhtu", q, jnp.repeat(k, 2, axis=2)) * scale
        visible = jnp.tril(jnp.ones((48, 48), bool)) & (seg[:, None, :, None] == seg[:, None, None, :])
        return jax.nn.logsumexp(jnp.where(visible, s, -jnp.inf), axis=-1).transpose(0, 2, 1)

    def with_lse_cotangent(attention):
        def f(q, k, v):
            o, lse = attention(q, k, v)
            return jnp.concatenate([o, lse[..., None]], axis=-1)

        return f

    def ours(q, k, v):
        return kernels.flash_attention(
            q, k, v, segment_ids=seg, sm_scale=scale, block_sizes=kernels.BlockSizes(16, 8), return_lse=True
        )

    def dense(q, k, v):
        mask = seg[:, None, :, None] == seg[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, mask=mask, scale=scale), dense_lse(q, k)

    cotangent = jnp.concatenate([do, dlse[..., None]], axis=-1)
    out, grads = value_and_vjp(with_lse_cotangent(ours), q, k, v, cotangent)
    ref, ref_grads = value_and_vjp(with_lse_cotangent(dense), q, k, v, cotangent)
    assert_close(out[..., -1], ref[..., -1], 2e-5, "lse")
    assert_close(out[..., :-1], ref[..., :-1], 2e-5, "output")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close(g, r, 1e-4, name)


def test_rows_without_visible_keys_give_zero_output_and_gradient():
    """A query whose segment matches no key: o = 0, lse = -inf, zero gradients, no nan (needed by ring merges)."""
    q, k, v, do, _ = random_inputs(7, 1, 32, 2, 2, 8)
    q_seg = jnp.concatenate([jnp.zeros((1, 16), jnp.int32), jnp.full((1, 16), 5, jnp.int32)], axis=1)
    kv_seg = jnp.zeros((1, 32), jnp.int32)
    settings = Settings(False, 0.25, blockwise.BlockSizes(8, 8))

    def f(q, k, v):
        o, lse = blockwise.attention(q, k, v, q_seg, kv_seg, settings)
        return jnp.concatenate([o, lse[..., None]], axis=-1)

    cotangent = jnp.concatenate([do, jax.random.normal(jax.random.key(70), (1, 32, 2, 1))], axis=-1)
    out, (dq, dk, dv) = value_and_vjp(f, q, k, v, cotangent)
    o, lse = out[..., :-1], out[..., -1]
    assert jnp.all(o[:, 16:] == 0) and jnp.all(jnp.isneginf(lse[:, 16:]))
    assert jnp.all(dq[:, 16:] == 0) and not any(jnp.any(jnp.isnan(g)) for g in (dq, dk, dv))
    ref = jax.nn.dot_product_attention(q[:, :16], k, v, scale=0.25)
    assert_close(o[:, :16], ref, 2e-5, "visible rows")


def test_bfloat16_inputs():
    q, k, v, _, seg = random_inputs(8, 1, 64, 4, 2, 32, segments=3)
    out = jax.jit(lambda q, k, v: kernels.flash_attention(q, k, v, segment_ids=seg))(
        *(x.astype(jnp.bfloat16) for x in (q, k, v))
    )
    assert out.dtype == jnp.bfloat16
    assert_close(out, dense_attention(q, k, v, causal=True, segment_ids=seg), 2e-2, "bfloat16 output")


def test_memory_grows_linearly_with_length():
    """Compiled temp memory of forward + backward: x2 per doubling for blockwise, x4 for the dense reference."""

    def temp_bytes(backend, t):
        q = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)

        def loss(q, k, v):
            return jnp.sum(kernels.flash_attention(q, k, v, backend=backend, block_sizes=kernels.BlockSizes(128, 128)))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    blockwise_ratio = temp_bytes("xla", 4096) / temp_bytes("xla", 2048)
    dense_ratio = temp_bytes("reference", 4096) / temp_bytes("reference", 2048)
    assert blockwise_ratio < 2.5, blockwise_ratio
    assert dense_ratio > 3.5, dense_ratio


@pytest.mark.parametrize(
    ("hkv", "backend"), [(2, "xla"), (1, "pallas_gpu")], ids=["kv-heads-sharded", "kv-head-repeated,pallas-interpreted"]
)
def test_sharded_flash_attention_on_batch_and_head_axes(hkv, backend):
    """shard_map over data=2 (batch) x tensor=2 (heads) of a data/seq/tensor mesh; a seq-sharded q is gathered."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "seq", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    q, k, v, do, seg = random_inputs(11 + hkv, 2, 64, 4, hkv, 16, segments=3)
    q = jax.device_put(q, jax.NamedSharding(mesh, jax.P("data", "seq", "tensor")))

    def attention(q, k, v):
        return kernels.sharded_flash_attention(
            q,
            k,
            v,
            mesh=mesh,
            batch_axes="data",
            head_axes="tensor",
            segment_ids=seg,
            block_sizes=kernels.BlockSizes(16, 16),
            backend=backend,
            interpret=backend != "xla",
        )

    check_against_dense(attention, q, k, v, do, causal=True, segment_ids=seg)


def test_sharded_flash_attention_errors_name_the_axis():
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    q, k = jax.random.normal(jax.random.key(12), (2, 16, 12, 8)), jax.random.normal(jax.random.key(13), (2, 16, 3, 8))
    with pytest.raises(ValueError, match=r"head_axes='heads' is not an axis of the mesh"):
        kernels.sharded_flash_attention(q, q, q, mesh=mesh, head_axes="heads")
    with pytest.raises(ValueError, match=r"query heads 12 \(q.shape\[2\]\) must be divisible by the 8 devices"):
        kernels.sharded_flash_attention(q, q, q, mesh=mesh, head_axes=("data", "tensor"))
    with pytest.raises(ValueError, match=r"kv heads 3 \(k.shape\[2\]\) must divide or be a multiple of the 4"):
        kernels.sharded_flash_attention(q, k, k, mesh=mesh, head_axes="tensor")


def test_auto_backend_is_blockwise_on_cpu():
    assert flash.resolve_backend("auto", 64, jnp.float32, 128, 128, None) is blockwise


@pytest.mark.parametrize(
    "shapes, kwargs, message",
    [
        (((1, 16, 6, 8), (1, 16, 4, 8)), {}, r"query heads \(6, q.shape\[2\]\) must be a multiple of kv heads"),
        (((1, 16, 4, 48), (1, 16, 2, 48)), {"backend": "pallas_gpu"}, r"head_dim 48 .* pallas_gpu .* valid head_dim"),
        (((1, 16, 4, 96), (1, 16, 2, 96)), {"backend": "pallas_tpu"}, r"head_dim 96 .* pallas_tpu"),
        (((1, 96, 4, 8), (1, 96, 2, 8)), {"block_sizes": kernels.BlockSizes(64, 32)}, "q sequence length 96"),
        (((1, 16, 4, 8), (1, 24, 2, 8)), {}, "causal attention needs equal q and k/v lengths"),
        (((1, 16, 4, 8), (1, 16, 2, 8)), {"backend": "cuda"}, "backend must be one of"),
        (((1, 16, 4, 8), (1, 16, 2, 8)), {"segment_ids": jnp.arange(15)[None]}, r"segment_ids must be \["),
        (((1, 8, 4, 8), (1, 16, 2, 8)), {"q_positions": jnp.arange(16)[None]}, r"q_positions must be \[batch, seq\]"),
        (
            ((1, 8, 4, 8), (1, 16, 2, 8)),
            {"q_positions": jnp.arange(8)[None], "backend": "reference"},
            r"q_positions .* needs causal=True, no segment_ids and backend 'auto' or 'xla'.*backend='reference'",
        ),
        (((1, 16, 4), (1, 16, 2)), {}, r"q must be \[batch, seq, heads, head_dim\]"),
    ],
)
def test_errors_name_the_problem(shapes, kwargs, message):
    q_shape, kv_shape = shapes
    q, k = jax.random.normal(jax.random.key(9), q_shape), jax.random.normal(jax.random.key(10), kv_shape)
    with pytest.raises(ValueError, match=message):
        kernels.flash_attention(q, k, k, **kwargs)
