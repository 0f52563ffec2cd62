"""Trace + compile time of the forward+backward pass against depth, scanned layers next to unrolled ones, and the
step time of both at a fixed small depth.

    .venv/bin/python benchmarks/compile.py                            # 12, 48, 96 layers; step time at 4 layers
    .venv/bin/python benchmarks/compile.py --layers 12 48 --reps 20

Compile: a Qwen3-MoE of small width (``--width``, 4 experts of 32; tiny-moe's shapes otherwise) at each depth, for
``model.scan_layers`` true and false; the function is ``jax.value_and_grad`` of a next-token cross-entropy over
[B, T] random tokens with respect to every parameter (``model.remat`` as given), traced, lowered and compiled from
abstract parameters (nothing is allocated). Step: tiny-moe itself at ``--step-layers`` layers, batch
``--batch`` x ``--seq``, the median wall and process-CPU seconds of the compiled step over ``--reps`` calls.
Targets (issue 21): scanned compile grows at most 1.5x from 12 to 96 layers; scanned step time within 5% of unrolled.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import qlx
from qlx.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def loss_fn(graphdef):
    def loss(state, tokens_bt):
        logits = nnx.merge(graphdef, state)(tokens_bt[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1))

    return jax.value_and_grad(loss)


def compile_seconds(config, batch: int, seq: int) -> tuple[float, float]:
    """(trace + lower seconds, compile seconds) of the forward+backward pass, from abstract parameters."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config)))
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    start = time.perf_counter()
    lowered = jax.jit(loss_fn(graphdef)).trace(state, tokens).lower()
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced


def step_seconds(config, batch: int, seq: int, reps: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of one compiled forward+backward step."""
    graphdef, state = nnx.split(build_model(config, seed=0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)), jnp.int32)
    step = jax.jit(loss_fn(graphdef))
    jax.block_until_ready(step(state, tokens))
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(step(state, tokens))
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 48, 96])
    parser.add_argument("--width", type=int, default=64, help="hidden size of the compile-time model")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--step-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    base = dataclasses.replace(qlx.load_config(ROOT / "configs/models/tiny-moe.yaml").model, remat=args.remat)
    small = dataclasses.replace(base, hidden_size=args.width, num_experts=4, moe_intermediate_size=32, vocab_size=256)

    rows = []
    jobs = [(n, scan) for n in args.layers for scan in (True, False)]
    for n, scan in tqdm(jobs, desc="compile", unit="model"):
        rows.append((n, scan, *compile_seconds(dataclasses.replace(small, num_layers=n, scan_layers=scan), 1, 128)))
    steps = {}
    for scan in tqdm((True, False), desc="step", unit="model"):
        config = dataclasses.replace(base, num_layers=args.step_layers, scan_layers=scan)
        steps[scan] = step_seconds(config, args.batch, args.seq, args.reps)

    print(f"\nforward+backward, remat={args.remat!r}, jax {jax.__version__}, {jax.default_backend()}")
    print(
        "| layers | scanned trace+lower s | scanned compile s | scanned total s | unrolled trace+lower s "
        "| unrolled compile s | unrolled total s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    totals = {}
    for n in args.layers:
        (_, _, st, sc), (_, _, ut, uc) = [r for r in rows if r[0] == n]
        totals[n] = (st + sc, ut + uc)
        print(f"| {n} | {st:.2f} | {sc:.2f} | {st + sc:.2f} | {ut:.2f} | {uc:.2f} | {ut + uc:.2f} |")
    lo, hi = min(args.layers), max(args.layers)
    print(
        f"\ngrowth {lo} -> {hi} layers: scanned {totals[hi][0] / totals[lo][0]:.2f}x (target <= 1.5x), "
        f"unrolled {totals[hi][1] / totals[lo][1]:.2f}x"
    )
    (sw, sc), (uw, uc) = steps[True], steps[False]
    print(f"\nstep, tiny-moe x {args.step_layers} layers, batch {args.batch} x {args.seq}, median of {args.reps}:")
    print("| layout | wall ms | CPU ms |\n|---|---:|---:|")
    print(f"| scanned | {sw * 1e3:.1f} | {sc * 1e3:.1f} |\n| unrolled | {uw * 1e3:.1f} | {uc * 1e3:.1f} |")
    print(f"scanned / unrolled: wall {sw / uw:.3f}, CPU {sc / uc:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
