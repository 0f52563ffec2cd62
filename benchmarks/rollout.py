"""Rollout of a recipe-shaped workload on the continuous engine next to today's static engine, in one run.

    .venv/bin/python benchmarks/rollout.py                                   # tiny-moe, 8 groups x G 4
    .venv/bin/python benchmarks/rollout.py --model configs/models/mid-moe.yaml --groups 16 --group-size 8

Workload (the recipe's shape scaled to a CPU, issue 19 item 9): ``groups`` prompts, each sampled ``group_size``
times; prompt lengths uniform in [min_prompt, 4 x min_prompt]; each sample's max_new_tokens log-normal (median
``median_new``, sigma 0.6 between prompts and 0.4 within a group, as same-prompt lengths correlate), capped at 8x
the median. Sampling is greedy (no stop ids), so every sample runs to its length and both engines must give the
same tokens ("identical" row).

Engines, at equal KV memory (``slots`` sequences of ``length_bucket(longest prompt + cap)`` tokens):
- static: ``qlx.rollout.generate_rows`` over batches of ``slots`` rows in submission order; each sample prefills
  its prompt, and a batch runs until its longest row ends.
- continuous: ``qlx.rollout.continuous.ContinuousEngine`` with ``slots`` decode slots and the same number of KV
  tokens in pages; a group's prompt is prefilled once.
Each engine runs the workload once to compile and once timed. Slot occupancy: generated tokens / (decode steps x
slots) (static: sum over batches of rows x its longest row). Prefill FLOPs ~ 2 x parameters x prompt tokens
(attention not counted).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

import qlx
from qlx.models import build_model
from qlx.rollout import SamplingSpec, generate_rows
from qlx.rollout.buckets import length_bucket, round_up
from qlx.rollout.continuous import ContinuousEngine, EngineConfig

ROOT = Path(__file__).resolve().parents[1]


def workload(args, rng):
    """(prompts, per-sample specs grouped by prompt)."""
    prompts, groups = [], []
    cap = 8 * args.median_new
    for g in range(args.groups):
        prompts.append(rng.integers(0, 512, int(rng.integers(args.min_prompt, 4 * args.min_prompt + 1))).tolist())
        mu = np.log(args.median_new) + 0.6 * rng.standard_normal()
        lengths = np.clip(np.exp(mu + 0.4 * rng.standard_normal(args.group_size)).astype(int), 1, cap)
        groups.append(
            [SamplingSpec(max_new_tokens=int(n), temperature=0.0, stream=g * 100 + i) for i, n in enumerate(lengths)]
        )
    return prompts, groups


def run_static(model, prompts, groups, slots):
    rows = [(p, s) for p, specs in zip(prompts, groups, strict=True) for s in specs]
    out, steps = [], 0
    for start in range(0, len(rows), slots):
        batch = rows[start : start + slots]
        result = generate_rows(model, [p for p, _ in batch], [s for _, s in batch])
        out += result.sequences()
        steps += int(result.lengths.max())
    return out, dict(steps=steps, prefill_tokens=sum(len(p) for p, _ in rows))


def run_continuous(model, prompts, groups, config):
    engine = ContinuousEngine(model, config)
    handles = [engine.submit(p, specs) for p, specs in zip(prompts, groups, strict=True)]
    engine.run()
    return [seq for h in handles for seq in h.result().sequences()], engine.stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "configs/models/tiny-moe.yaml"))
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--median-new", type=int, default=16)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = build_model(qlx.load_config(args.model).model, seed=0)
    n_params = sum(x.size for x in jax.tree.leaves(model))
    prompts, groups = workload(args, np.random.default_rng(args.seed))
    new_tokens = sum(s.max_new_tokens for specs in groups for s in specs)
    longest = max(len(p) for p in prompts) + 8 * args.median_new
    cache_len = length_bucket(longest)
    config = EngineConfig(
        max_slots=args.slots,
        page_size=args.page_size,
        num_pages=args.slots * cache_len // args.page_size + 1,
        burst=args.burst,
        max_len=round_up(longest, args.page_size),
        prefill_chunk=min(512, length_bucket(max(len(p) for p in prompts))),
        reserve_tokens=2 * args.median_new,
    )

    timings = {}
    for name, fn in (
        ("static", lambda: run_static(model, prompts, groups, args.slots)),
        ("continuous", lambda: run_continuous(model, prompts, groups, config)),
    ):
        fn()  # compile
        start = time.perf_counter()
        timings[name] = (*fn(), time.perf_counter() - start)

    static_out, static_info, static_s = timings["static"]
    cont_out, stats, cont_s = timings["continuous"]
    static_occ = new_tokens / (static_info["steps"] * args.slots)
    print(
        f"workload: {args.groups} groups x G {args.group_size}, prompts {min(map(len, prompts))}-"
        f"{max(map(len, prompts))}, {new_tokens} new tokens (median cap {args.median_new}, max "
        f"{max(s.max_new_tokens for g in groups for s in g)}); {args.slots} slots, KV {config.num_pages - 1} pages x "
        f"{args.page_size} = {args.slots} x {cache_len} tokens; {jax.devices()[0].platform}"
    )
    print("| engine | seconds | output tok/s | slot occupancy | prefill tokens | prefill GFLOPs (2 N P) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, occ, prefill in (
        ("static (generate_rows)", static_s, static_occ, static_info["prefill_tokens"]),
        ("continuous", cont_s, stats.slot_occupancy, stats.prefill_tokens),
    ):
        print(
            f"| {name} | {seconds:.2f} | {new_tokens / seconds:,.0f} | {occ:.0%} | {prefill:,} | "
            f"{2 * n_params * prefill / 1e9:.2f} |"
        )
    print(f"continuous occupancy while groups queued: {stats.occupancy_while_queued:.0%}")
    print(
        f"speed-up {static_s / cont_s:.2f}x; greedy outputs identical: {cont_out == static_out}; swaps "
        f"{stats.swapped_out_groups}, recomputed tokens {stats.recomputed_tokens}"
    )


if __name__ == "__main__":
    main()
