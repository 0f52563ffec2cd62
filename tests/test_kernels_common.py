"""Shared checks for the attention-kernel tests (imported by the other test_kernels_* files), and tests of the pieces
every backend shares: block sizes, partial-result merging, the zig-zag layout helpers.

Every comparison is against `jax.nn.dot_product_attention` in float32 on fresh random inputs: the forward within
2e-5 and the gradients within 1e-4, relative to the largest reference entry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qlx.kernels import blockwise, common, pallas_gpu, pallas_tpu

from qlx import kernels

FWD_TOL = 2e-5
GRAD_TOL = 1e-4


def random_inputs(seed: int, b: int, t: int, hq: int, hkv: int, d: int, *, segments: int = 0):
    """q [b, t, hq, d], k, v [b, t, hkv, d], an output cotangent do, and (segments > 0) sorted packed-sequence ids."""
    kq, kk, kv, kd, ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(kq, (b, t, hq, d), jnp.float32)
    k = jax.random.normal(kk, (b, t, hkv, d), jnp.float32)
    v = jax.random.normal(kv, (b, t, hkv, d), jnp.float32)
    do = jax.random.normal(kd, (b, t, hq, d), jnp.float32)
    seg = jnp.sort(jax.random.randint(ks, (b, t), 0, segments), axis=1) if segments else None
    return q, k, v, do, seg


def dense_attention(q, k, v, *, causal: bool, segment_ids=None):
    mask = None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, mask=mask)


def assert_close(actual, expected, tol: float, what: str):
    err = float(jnp.max(jnp.abs(actual.astype(jnp.float32) - expected.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32))))
    assert np.isfinite(err) and err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x max |reference| {scale:.3g}"


def value_and_vjp(attention, q, k, v, do):
    """(attention(q, k, v), its (q, k, v) cotangents for `do`), compiled as one program."""

    def f(q, k, v, do):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(do)

    return jax.jit(f)(q, k, v, do)


def check_against_dense(attention, q, k, v, do, *, causal: bool, segment_ids=None):
    """attention(q, k, v) -> o must match jax.nn.dot_product_attention in value and in (q, k, v) gradients."""
    out, grads = value_and_vjp(attention, q, k, v, do)
    ref, ref_grads = value_and_vjp(
        lambda q, k, v: dense_attention(q, k, v, causal=causal, segment_ids=segment_ids), q, k, v, do
    )
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close(out, ref, FWD_TOL, "output")
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert grad.shape == ref_grad.shape
        assert_close(grad, ref_grad, GRAD_TOL, name)


@pytest.mark.parametrize(
    "cls, block, length, expected",
    [
        (blockwise.BlockSizes, 512, 96, 96),  # shrinks to the length
        (blockwise.BlockSizes, 512, 1000, 500),  # largest divisor below the default
        (pallas_tpu.BlockSizes, 512, 768, 384),  # largest multiple of 128 that divides
        (pallas_gpu.BlockSizes, 128, 96, 32),  # largest power of two that divides
    ],
)
def test_default_block_sizes_fit_the_length(cls, block, length, expected):
    sizes = cls(block_q=block, block_kv=block).fit(length, length, strict=False)
    assert sizes.block_q == sizes.block_kv == expected
    assert length % sizes.q_bwd == 0 and length % sizes.kv_bwd == 0


def test_block_size_errors_name_the_tensor_and_valid_sizes():
    with pytest.raises(ValueError, match=r"q sequence length 96 cannot be tiled by block_q=64.*valid sizes here"):
        blockwise.BlockSizes(64, 32).fit(96, 96, strict=True)
    with pytest.raises(ValueError, match="pad the sequence"):
        blockwise.BlockSizes().fit(1009, 1009, strict=False)  # a prime length has no useful divisor
    with pytest.raises(ValueError, match="multiples of 128"):
        pallas_tpu.BlockSizes(64, 128).fit(256, 256, strict=True)
    with pytest.raises(ValueError, match="block_kv must be a positive int"):
        kernels.BlockSizes(block_q=128, block_kv=0)
    with pytest.raises(ValueError, match="num_warps must be 1, 2, 4, 8 or 16"):
        pallas_gpu.BlockSizes(num_warps=3)
    with pytest.raises(ValueError, match="block_kv_dq must be a positive int or None"):
        pallas_gpu.BlockSizes(block_kv_dq=0)
    with pytest.raises(ValueError, match=r"k/v sequence length 256 cannot be tiled by block_kv_dq=48"):
        pallas_gpu.BlockSizes(block_kv_dq=48).fit(256, 256, strict=True)


def test_gpu_default_tiles_shrink_as_rows_widen():
    """The GPU tiles (K/V tiles live in shared memory, pipelined) never grow with head_dim x dtype bytes; the dq
    kernel's tiles default to the dkv kernel's."""
    previous = None
    for head_dim, dtype in [(64, jnp.bfloat16), (128, jnp.bfloat16), (256, jnp.bfloat16), (256, jnp.float32)]:
        sizes = pallas_gpu.BlockSizes.default(head_dim, dtype).fit(4096, 4096, strict=False)
        assert (sizes.q_dq, sizes.kv_dq) == (sizes.q_bwd, sizes.kv_bwd)
        tiles = (sizes.block_q * sizes.block_kv, sizes.q_bwd * sizes.kv_bwd)
        if previous is not None:
            assert all(now <= before for now, before in zip(tiles, previous, strict=True))
        previous = tiles
    assert (
        pallas_gpu.BlockSizes.default(256, jnp.float32).block_kv
        < pallas_gpu.BlockSizes.default(128, jnp.bfloat16).block_kv
    )


def test_merge_partials_over_disjoint_keys_equals_full_attention():
    q, k, v, _, _ = random_inputs(11, 2, 32, 4, 2, 16)
    attention = jax.jit(lambda q, k, v: kernels.flash_attention(q, k, v, causal=False, return_lse=True))
    halves = [attention(q, k[:, s], v[:, s]) for s in (slice(0, 12), slice(12, 32))]
    o, lse = kernels.merge_partials(*halves[0], *halves[1])
    full_o, full_lse = attention(q, k, v)
    assert_close(o, dense_attention(q, k, v, causal=False), FWD_TOL, "merged output")
    assert_close(lse, full_lse, FWD_TOL, "merged lse")
    # an empty side (lse = -inf) leaves the other side unchanged, and two empty sides stay empty without nan
    empty_lse = jnp.full_like(lse, -jnp.inf)
    o2, lse2 = kernels.merge_partials(full_o, full_lse, jnp.zeros_like(full_o), empty_lse)
    assert_close(o2, full_o, 1e-6, "merge with empty")
    o3, lse3 = kernels.merge_partials(jnp.zeros_like(o), empty_lse, jnp.zeros_like(o), empty_lse)
    assert not jnp.any(jnp.isnan(o3)) and jnp.all(o3 == 0) and jnp.all(jnp.isneginf(lse3))


def test_zigzag_layout_helpers():
    assert kernels.chunk_order(2).tolist() == [0, 3, 1, 2]
    assert kernels.balanced_positions(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    x = jax.random.normal(jax.random.key(3), (2, 24, 3))
    for ring in (1, 2, 3, 6):
        balanced = kernels.balance_tokens(x, ring)
        assert jnp.array_equal(kernels.unbalance_tokens(balanced, ring), x)
        assert jnp.array_equal(balanced, x[:, kernels.balanced_positions(24, ring)])
    # every device of a causal ring gets the same number of visible (query, key) pairs: chunk pair sums are equal
    ring = 4
    pos = np.asarray(kernels.balanced_positions(64, ring)).reshape(ring, -1)
    work = [int(np.sum(p[:, None] >= np.arange(64)[None, :])) for p in pos]
    assert len(set(work)) == 1
    with pytest.raises(ValueError, match="divisible by 2 x ring size = 8"):
        kernels.balance_tokens(x[:, :20], 4)


def test_softmax_delta_folds_the_lse_cotangent():
    shapes = [(2, 5, 3, 4), (2, 5, 3, 4), (2, 5, 3)]
    o, do, dlse = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes))
    expected = jnp.einsum("btkd,btkd->btk", o, do) - dlse
    assert_close(common.softmax_delta(o, do, dlse), expected, 1e-6, "delta")
