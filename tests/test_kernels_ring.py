"""ring_attention over 2, 4 and 8 fake CPU devices against jax.nn.dot_product_attention (forward and gradients):
causal and not, grouped-query attention, segment ids, both token layouts, batch / head sharding, Auto and Explicit
meshes, and a Pallas kernel inside the ring; plus the error messages."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType
from test_kernels_common import check_against_dense, random_inputs

from qlx import kernels


def auto_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def test_ring2_causal_gqa_segments_sharded_batch_and_heads():
    mesh = auto_mesh((2, 2, 2), ("data", "seq", "tensor"))
    q, k, v, do, seg = random_inputs(31, 2, 64, 4, 2, 16, segments=3)

    def attention(q, k, v):
        return kernels.ring_attention(
            q,
            k,
            v,
            mesh=mesh,
            segment_ids=seg,
            batch_axes="data",
            head_axis="tensor",
            block_sizes=kernels.BlockSizes(8, 8),  # 2 x 2 tiles per half-shard step
        )

    check_against_dense(attention, q, k, v, do, causal=True, segment_ids=seg)


def test_ring4_noncausal_one_kv_head_repeated_over_the_head_axis():
    mesh = auto_mesh((4, 2), ("seq", "tensor"))
    q, k, v, do, _ = random_inputs(32, 1, 64, 4, 1, 16)

    def attention(q, k, v):
        return kernels.ring_attention(q, k, v, mesh=mesh, causal=False, head_axis="tensor")

    check_against_dense(attention, q, k, v, do, causal=False)


def test_ring8_balanced_layout_on_an_explicit_mesh():
    """The model's path: tokens permuted once by balance_tokens, ring attention on the balanced layout."""
    mesh = jax.make_mesh((8,), ("seq",))  # Explicit axes (the default of jax.make_mesh)
    q, k, v, do, seg = random_inputs(33, 1, 256, 2, 2, 16, segments=4)

    def attention(q, k, v):
        bal = [kernels.balance_tokens(x, 8) for x in (q, k, v, seg)]
        o = kernels.ring_attention(*bal[:3], mesh=mesh, segment_ids=bal[3], layout="balanced")
        return kernels.unbalance_tokens(o, 8)

    with jax.set_mesh(mesh):
        check_against_dense(attention, q, k, v, do, causal=True, segment_ids=seg)


def test_ring2_with_the_pallas_gpu_kernel_interpreted():
    mesh = auto_mesh((2,), ("seq",))
    q, k, v, do, _ = random_inputs(34, 1, 64, 2, 1, 16)

    def attention(q, k, v):
        return kernels.ring_attention(q, k, v, mesh=mesh, backend="pallas_gpu", interpret=True)

    check_against_dense(attention, q, k, v, do, causal=True)


@pytest.mark.parametrize(
    "q_shape, kv_heads, kwargs, message",
    [
        ((2, 64, 4, 8), 2, {"axis": "sp"}, r"axis='sp' is not an axis of the mesh; mesh axes are \('data', 'seq'\)"),
        ((2, 60, 4, 8), 2, {}, r"sequence length 60 \(q.shape\[1\]\) must be divisible by 2 x ring size = 8"),
        ((3, 64, 4, 8), 2, {"batch_axes": "data"}, r"batch 3 \(q.shape\[0\]\) must be divisible by the 2 devices"),
        ((2, 64, 4, 8), 2, {"head_axis": "data", "batch_axes": None}, None),
        ((2, 64, 3, 8), 1, {"head_axis": "data"}, r"query heads 3 \(q.shape\[2\]\) must be divisible by the 2"),
        ((2, 64, 6, 8), 3, {"head_axis": "data"}, r"kv heads 3 \(k.shape\[2\]\) must divide or be a multiple"),
        ((2, 64, 4, 8), 2, {"layout": "striped"}, "layout must be 'natural' or 'balanced'"),
        ((2, 64, 6, 8), 4, {}, r"query heads \(6, q.shape\[2\]\) must be a multiple of kv heads"),
        (
            (2, 192, 4, 8),
            2,
            {"block_sizes": kernels.BlockSizes(16, 16)},
            r"devices of 'seq': each device attends blocks of 48 tokens \(T / R\) and half blocks of 24 .* "
            r"sequence length 24 cannot be tiled by block_kv=16",
        ),
    ],
)
def test_errors_name_the_problem(q_shape, kv_heads, kwargs, message):
    mesh = auto_mesh((2, 4), ("data", "seq"))
    q = jax.random.normal(jax.random.key(35), q_shape)
    k = jax.random.normal(jax.random.key(36), (*q_shape[:2], kv_heads, q_shape[3]))
    if message is None:  # a valid call: heads sharded over a 2-device axis, kv heads 2
        out = jax.jit(lambda q, k: kernels.ring_attention(q, k, k, mesh=mesh, **kwargs))(q, k)
        assert out.shape == q.shape and not jnp.any(jnp.isnan(out))
        return
    with pytest.raises(ValueError, match=message):
        kernels.ring_attention(q, k, k, mesh=mesh, **kwargs)
