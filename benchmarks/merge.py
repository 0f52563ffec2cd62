"""`qlx merge` against mergekit on the same generated checkpoints: input GB/s, peak RSS, and the outputs' difference.

    .venv/bin/python benchmarks/merge.py [--work runs/bench_merge] [--size 1gb|small] [--select-topk 1.0]
        [--mergekit-site .venv/bench-site] [--workers 1]

Generates (once, reused) a random bf16 Qwen3 base and two models = bf16(base + 0.01·noise) — "1gb" is a dense
Qwen3 with vocab 65536, hidden 2048, 6 layers (1.08 GB per checkpoint, largest tensor the 268 MB embedding) — then
runs ``qlx merge --method sce`` and ``mergekit-yaml`` (sce, ``dtype: float32``, ``out_dtype: bfloat16``: float32
arithmetic like qlx) each in its own process, after reading the inputs once so both start from a warm page cache.
Peak RSS is the child's ``ru_maxrss`` from ``os.wait4``. mergekit is a benchmark-only peer: install it into a
separate folder (``pip install --no-deps --target .venv/bench-site mergekit==0.1.5 accelerate datasets dill
immutables multiprocess peft pyarrow xxhash``) and pass it as ``--mergekit-site``; without it only qlx runs.
A dense model is used because mergekit 0.1.5 reads Qwen3-MoE in transformers 5's fused-expert layout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from qlx.config import ModelConfig
from qlx.models.hf import config_to_hf, plan_shards, tensor_index, tensor_specs, write_index
from qlx.models.safetensors_io import Reader, TensorToWrite, write_file

SIZES = {
    "small": dict(vocab_size=8192, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64,
                  intermediate_size=1408),
    "1gb": dict(vocab_size=65536, hidden_size=2048, num_layers=6, num_heads=16, num_kv_heads=4, head_dim=128,
                intermediate_size=5632),
}  # fmt: skip


def generate(directory: Path, config: ModelConfig, seed: int, base: Path | None) -> None:
    """A bf16 checkpoint: N(0, 0.02) tensors (norms 1), or with ``base`` that checkpoint + N(0, 0.01) noise."""
    if (directory / "config.json").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base_infos, reader = (tensor_index(base), Reader()) if base is not None else ({}, None)
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def produce(spec):
        def make():
            noise = rng.standard_normal(spec.hf_shape, np.float32)
            if base is not None:
                return (reader.get(base_infos[spec.name]).astype(np.float32) + 0.01 * noise).astype(bf16)
            if spec.name.endswith("norm.weight"):
                return (1 + 0.1 * noise).astype(bf16)
            return (0.02 * noise).astype(bf16)

        return make

    tensors = [TensorToWrite(s.name, bf16, s.hf_shape, produce(s)) for s in tensor_specs(config)]
    shards = plan_shards(tensors, 2 * 2**30)
    for name, shard in shards:
        write_file(directory / name, shard)
    write_index(directory, shards)
    (directory / "config.json").write_text(json.dumps({**config_to_hf(config), "dtype": "bfloat16"}, indent=2))


def timed(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of a child process; raises when it fails."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[0]} failed with status {status}")
    return seconds, usage.ru_maxrss * 1024


def max_difference(a: Path, b: Path) -> tuple[float, int, int]:
    """(max |a − b| over all tensors as float32, count of differing elements, total elements)."""
    ia, ib, reader = tensor_index(a), tensor_index(b), Reader()
    worst, differ, total = 0.0, 0, 0
    for name, info in ia.items():
        x = reader.get(info).astype(np.float32)
        y = reader.get(ib[name]).astype(np.float32)
        worst = max(worst, float(np.abs(x - y).max()))
        differ += int(np.count_nonzero(x != y))
        total += x.size
    return worst, differ, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_merge"))
    parser.add_argument("--size", choices=SIZES, default="1gb")
    parser.add_argument("--select-topk", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--mergekit-site", type=Path, default=Path(".venv/bench-site"))
    args = parser.parse_args()
    work = args.work / args.size
    config = ModelConfig(family="qwen3", **SIZES[args.size])
    inputs = [work / "base", work / "m1", work / "m2"]
    generate(inputs[0], config, 0, None)
    generate(inputs[1], config, 1, inputs[0])
    generate(inputs[2], config, 2, inputs[0])
    infos = [tensor_index(d) for d in inputs]
    input_bytes = sum(i.end - i.start for index in infos for i in index.values())
    largest = max(i.end - i.start for i in infos[0].values())
    for d in inputs:  # warm the page cache for both tools alike
        for f in sorted(d.glob("*.safetensors")):
            with f.open("rb") as fh:
                while fh.read(1 << 26):
                    pass

    rows = []
    out_qlx = work / "out-qlx"
    qlx_cmd = [sys.executable, "-m", "qlx.cli", "merge", "--method", "sce", "--base", str(inputs[0])]
    qlx_cmd += ["--models", str(inputs[1]), str(inputs[2]), "--out", str(out_qlx), "--overwrite"]
    qlx_cmd += ["--select-topk", str(args.select_topk), "--dtype", "bfloat16", "--workers", str(args.workers)]
    rows.append(("qlx merge", *timed(qlx_cmd)))

    out_mk = work / "out-mergekit"
    site = args.mergekit_site.resolve()
    if (site / "mergekit").is_dir():
        spec = {
            "merge_method": "sce",
            "base_model": str(inputs[0].resolve()),
            "models": [{"model": str(inputs[1].resolve())}, {"model": str(inputs[2].resolve())}],
            "parameters": {"select_topk": args.select_topk},
            "dtype": "float32",
            "out_dtype": "bfloat16",
        }
        (work / "mergekit.yaml").write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": str(site)}
        mk_cmd = [sys.executable, "-c", "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())"]
        mk_cmd += [str(work / "mergekit.yaml"), str(out_mk), "--no-copy-tokenizer", "--allow-crimes"]
        rows.append(("mergekit 0.1.5", *timed(mk_cmd, env)))
    else:
        print(f"mergekit not found in {site}: qlx only", file=sys.stderr)

    gb = input_bytes / 1e9
    print(f"\nSCE select_topk={args.select_topk}, {args.size}: 3 bf16 checkpoints, {gb:.2f} GB read, largest tensor "
          f"{largest / 1e6:.0f} MB; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| tool | seconds | input GB/s | peak RSS GB | peak RSS / largest tensor |\n|---|---|---|---|---|")
    for name, seconds, rss in rows:
        print(f"| {name} | {seconds:.1f} | {gb / seconds:.3f} | {rss / 1e9:.2f} | {rss / largest:.1f} |")
    if len(rows) == 2:
        worst, differ, total = max_difference(out_qlx, out_mk)
        print(f"\nqlx vs mergekit: max |diff| {worst:.3g}, {differ} of {total} elements differ ({differ / total:.2e})")


if __name__ == "__main__":
    main()
