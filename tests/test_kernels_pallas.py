"""The Pallas kernels (TPU Mosaic, GPU Triton) in interpret mode on CPU at small sizes, against
jax.nn.dot_product_attention; and their lowering to real TPU / CUDA kernels (no hardware needed to lower)."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu
from qlx.kernels import pallas_gpu, pallas_tpu
from qlx.kernels.common import Settings
from test_kernels_common import check_against_dense, random_inputs

from qlx import kernels


@pytest.mark.parametrize(
    "seed, causal, hq, hkv, segments, sizes",
    [
        (21, True, 4, 2, 3, kernels.BlockSizes(16, 16, block_q_bwd=32, block_kv_bwd=16)),  # 4 x 4 fwd, 2 x 4 bwd
        (22, False, 2, 1, 0, kernels.BlockSizes(16, 16, block_q_bwd=32, block_kv_bwd=16)),
        # the dq kernel tiled apart from the dkv kernel: 4 x 2 dq tiles, 2 x 4 dkv tiles
        (25, True, 4, 1, 2, pallas_gpu.BlockSizes(32, 16, 32, 16, block_q_dq=16, block_kv_dq=32, num_stages=3)),
    ],
)
def test_gpu_kernels_interpret(seed, causal, hq, hkv, segments, sizes):
    q, k, v, do, seg = random_inputs(seed, 1, 64, hq, hkv, 16, segments=segments)

    def attention(q, k, v):
        return kernels.flash_attention(
            q, k, v, causal=causal, segment_ids=seg, block_sizes=sizes, backend="pallas_gpu", interpret=True
        )

    check_against_dense(attention, q, k, v, do, causal=causal, segment_ids=seg)


@pytest.mark.parametrize(
    "seed, causal, hq, hkv, segments",
    [(23, True, 2, 1, 3), (24, False, 4, 2, 0)],
)
def test_tpu_kernels_interpret(seed, causal, hq, hkv, segments):
    """TPU semantics are simulated (InterpretParams: uninitialised VMEM is nan, out-of-bounds reads raise)."""
    q, k, v, do, seg = random_inputs(seed, 1, 256, hq, hkv, 64, segments=segments)
    sizes = kernels.BlockSizes(128, 128)  # 2 x 2 tiles: one skipped above the causal diagonal

    def attention(q, k, v):
        return kernels.flash_attention(
            q,
            k,
            v,
            causal=causal,
            segment_ids=seg,
            block_sizes=sizes,
            backend="pallas_tpu",
            interpret=pltpu.InterpretParams(),
        )

    check_against_dense(attention, q, k, v, do, causal=causal, segment_ids=seg)


@pytest.mark.parametrize("platform, module", [("tpu", pallas_tpu), ("cuda", pallas_gpu)])
def test_kernels_lower_for_hardware(platform, module):
    """Forward + backward lower to Mosaic / Triton kernels (three custom calls: forward, dq, dkv) in bf16 with GQA."""
    settings = Settings(True, 128**-0.5, module.BlockSizes())

    def loss(q, k, v, seg):
        o, lse = module.attention(q, k, v, seg, seg, settings)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(lse)

    q = jax.ShapeDtypeStruct((1, 1024, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    target = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
        platforms=[platform],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(target)],
    )(q, kv, kv, seg)
    assert exported.mlir_module().count(f"@{target}") == 3


def triton_calls(fn, *args) -> list[dict]:
    """{name, grid_x, num_warps, num_stages} of every Triton custom call `fn` lowers to for CUDA, in program order."""
    exported = export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args)
    text = re.sub(r'ir = "(?:[^"\\]|\\.)*"', "ir", exported.mlir_module())  # drop the serialised kernels
    calls = []
    for config in re.findall(r"@__gpu\$xla\.gpu\.triton\(.*?mhlo\.backend_config = \{(.*?)\}", text):
        fields = dict(re.findall(r"(grid_x|name|num_warps|num_stages) = \"?(\w+)", config))
        calls.append({key: value if key == "name" else int(value) for key, value in fields.items()})
    return calls


def test_gpu_block_sizes_reach_the_triton_calls():
    """Explicit pallas_gpu.BlockSizes keep their own fields through flash_attention: the dq kernel's grid follows
    block_q_dq, the dkv kernel's block_kv_bwd, and num_warps / num_stages reach every call."""
    sizes = pallas_gpu.BlockSizes(64, 32, 32, 16, block_q_dq=128, block_kv_dq=64, num_warps=2, num_stages=3)

    def loss(q, k, v):
        return jnp.sum(kernels.flash_attention(q, k, v, block_sizes=sizes, backend="pallas_gpu").astype(jnp.float32))

    q = jax.ShapeDtypeStruct((1, 512, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)
    calls = {c["name"]: c for c in triton_calls(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)}
    assert {name: c["grid_x"] for name, c in calls.items()} == {
        "qlx_flash_forward": 512 // 64,
        "qlx_flash_dq": 512 // 128,
        "qlx_flash_dkv": 512 // 16,
    }
    assert {(c["num_warps"], c["num_stages"]) for c in calls.values()} == {(2, 3)}


@pytest.mark.parametrize("head_dim, dtype, block_q", [(128, jnp.bfloat16, 128), (256, jnp.float32, 64)])
def test_gpu_default_tiles_follow_head_dim_and_dtype(head_dim, dtype, block_q):
    """Without block_sizes, flash_attention tiles the GPU kernel by pallas_gpu.BlockSizes.default(head_dim, dtype)."""
    q = jax.ShapeDtypeStruct((1, 1024, 2, head_dim), dtype)
    (forward,) = triton_calls(lambda q, k, v: kernels.flash_attention(q, k, v, backend="pallas_gpu"), q, q, q)
    assert forward["grid_x"] == 1024 // block_q == 1024 // pallas_gpu.BlockSizes.default(head_dim, dtype).block_q
