"""The Pallas kernels (TPU Mosaic, GPU Triton) in interpret mode on CPU at small sizes, against
jax.nn.dot_product_attention; and their lowering to real TPU / CUDA kernels (no hardware needed to lower)."""

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
    "seed, causal, hq, hkv, segments",
    [(21, True, 4, 2, 3), (22, False, 2, 1, 0)],
)
def test_gpu_kernels_interpret(seed, causal, hq, hkv, segments):
    q, k, v, do, seg = random_inputs(seed, 1, 64, hq, hkv, 16, segments=segments)
    sizes = kernels.BlockSizes(16, 16, block_q_bwd=32, block_kv_bwd=16)  # 4 x 4 forward tiles, 2 x 4 backward

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
