"""One MoE layer, forward + backward, on 8 fake CPU devices at mesh {expert: 8}: expert parallelism's transports
(qlx.models.moe_ep) next to XLA's automatic partitioning of the same layer, in one run; plus, with libtpu, the
scratch (temp) bytes per chip of the ragged transport compiled ahead of time for TPU v5p at capacity factors
None (dropless), 2.0 and 1.25.

    .venv/bin/python benchmarks/moe_ep.py                                  # CPU table only (no libtpu)
    TMPDIR=$PWD/.tmp TPU_ACCELERATOR_TYPE=v5p-8 .venv/bin/python benchmarks/moe_ep.py --tpu   # + the v5p table

Rows of the CPU table: "xla (today)" is the layer as it was before expert parallelism (batch rule: data, fsdp; the
experts left to XLA); "xla + batch rule" adds ``expert`` to the batch rule but still leaves the experts to XLA;
"ep dense" / "ep ring" are the shard_map transports. Bytes are the per-device result bytes of the compiled
program's collectives (:func:`qlx.hlo.collective_bytes`), FLOPs the compiled program's per-device cost analysis,
step time the median wall time of a jitted forward + backward (the CPU machine may be shared: see the load).
The TPU table uses the Qwen3-30B-A3B MoE shape (hidden 2048, 128 experts, top-8, width 768, bfloat16) with 21,760
tokens per chip on v5p:2x2x2 (8 chips, expert=8).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from qlx.config import ModelConfig  # noqa: E402
from qlx.hlo import collective_bytes  # noqa: E402
from qlx.mesh import LOGICAL_AXIS_RULES, make_mesh  # noqa: E402
from qlx.models.qwen3 import BTD, MoE  # noqa: E402
from qlx.models.sharding import Layout, state_shardings  # noqa: E402

TODAY_RULES = {**LOGICAL_AXIS_RULES, "batch": ("data", "fsdp")}
VARIANTS = {
    "xla (today)": ("xla", TODAY_RULES),
    "xla + batch rule": ("xla", None),
    "ep dense": ("dense", None),
    "ep ring": ("ring", None),
}


def moe_step(config: ModelConfig, mesh, rules, batch: int, length: int, *, abstract: bool = False):
    """(jitted forward + backward of one MoE layer, its arguments): loss = sum(y^2) / 2 over y = MoE(x)."""
    layout = Layout.create(mesh, rules)

    def create():
        return MoE(config, rngs=nnx.Rngs(0))

    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    shardings = state_shardings(abstract_state, mesh, rules)
    x_sharding = layout.sharding((batch, length, config.hidden_size), BTD)
    if abstract:
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
        x = jax.ShapeDtypeStruct((batch, length, config.hidden_size), jnp.dtype(config.dtype), sharding=x_sharding)
    else:
        state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
        x = jax.device_put(
            jnp.asarray(np.random.default_rng(0).normal(size=(batch, length, config.hidden_size)), config.dtype),
            x_sharding,
        )

    def loss(state, x):
        y, *_ = nnx.merge(graphdef, state)(x, layout=layout)
        return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (state, x)


def median_seconds(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cpu_table(args) -> None:
    config = ModelConfig(
        family="qwen3_moe",
        vocab_size=256,
        hidden_size=args.hidden,
        num_layers=1,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.width,
        moe_block_size=64,
    )
    mesh = make_mesh({"expert": 8, "fsdp": 1})
    rows = []
    for name, (transport, rules) in tqdm(VARIANTS.items(), desc="variants"):
        variant = dataclasses.replace(config, moe_ep_transport=transport)
        step, step_args = moe_step(variant, mesh, rules, args.batch, args.length)
        compiled = step.lower(*step_args).compile()
        traffic = collective_bytes(compiled.as_text())
        flops = compiled.cost_analysis()["flops"]
        rows.append((name, sum(traffic.values()), traffic, flops, median_seconds(step, step_args, args.reps)))
    base_bytes, base_time = rows[0][1], rows[0][4]
    load = os.getloadavg()[0]
    print(
        f"\nOne MoE layer fwd+bwd, {args.batch}x{args.length} tokens, hidden {args.hidden}, {args.experts} experts "
        f"top-{args.top_k}, width {args.width}, float32; 8 fake CPU devices, mesh expert=8; load {load:.1f}\n"
    )
    print(
        "| variant | collective MiB / device | vs today | all-gather | all-reduce | reduce-scatter | all-to-all "
        "| collective-permute | GFLOP / device | step ms | vs today |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    mib = 2**20
    for name, total, traffic, flops, seconds in rows:
        parts = " | ".join(
            f"{traffic[op] / mib:.2f}"
            for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
        )
        print(
            f"| {name} | {total / mib:.2f} | {total / base_bytes:.2f}x | {parts} | {flops / 1e9:.3f} "
            f"| {seconds * 1e3:.1f} | {seconds / base_time:.2f}x |"
        )


def tpu_table(args) -> None:
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    mesh = make_mesh({"expert": 8, "fsdp": 1}, devices=devices)
    config = ModelConfig(
        family="qwen3_moe",
        vocab_size=256,
        hidden_size=2048,
        num_layers=1,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        moe_backend="ragged",
        moe_ep_transport="ragged",
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
    tokens = args.tpu_tokens
    rows = []
    for factor in tqdm((None, 2.0, 1.25), desc="v5p compiles"):
        step, step_args = moe_step(
            dataclasses.replace(config, moe_capacity_factor=factor), mesh, None, 8, tokens, abstract=True
        )
        start = time.perf_counter()
        memory = step.lower(*step_args).compile().memory_analysis()
        rows.append((factor, memory.temp_size_in_bytes, time.perf_counter() - start))
    print(
        f"\nOne MoE layer fwd+bwd, ragged transport, TPU v5p:2x2x2 (expert=8), {tokens} tokens per chip, 30B-A3B "
        "MoE shape, bfloat16 (compiled ahead of time)\n"
    )
    print("| capacity factor | temp GiB / chip | compile s |")
    print("|---|---|---|")
    for factor, temp, seconds in rows:
        print(f"| {'None (dropless)' if factor is None else factor} | {temp / 2**30:.2f} | {seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tpu", action="store_true", help="also compile for TPU v5p (needs libtpu)")
    parser.add_argument("--tpu-tokens", type=int, default=21760, help="tokens per chip for the v5p table")
    args = parser.parse_args()
    cpu_table(args)
    if args.tpu:
        tpu_table(args)


if __name__ == "__main__":
    main()
