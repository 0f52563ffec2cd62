"""Assembled-context tokens per second at 128K and 1M-token targets, tokenization included.

For each target the table shows, side by side:

- ``pool``: rendering the world's documents and tokenizing each once (batched) — the one-time cost;
- ``assemble``: contexts assembled from cached token counts and streamed to files (per-context cost);
- ``amortized``: pool + contexts together (tokens assembled / total seconds);
- ``naive``: the peer without cached counts — every context tokenized whole after assembly to know its length;
- ``synthesize``: the whole pipeline (world, pool, plans, assembly, derivation checks, JSONL), end to end.

Usage: ``python benchmarks/synth.py [--tokenizer PATH] [--contexts 8]``. Target: >= 1M tokens/s on a 2-core CPU.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from qlx.data.assemble import assemble_context
from qlx.data.sources import world_source
from qlx.data.synth import SynthConfig, default_tokenizer, synthesize
from qlx.data.tokenizer import load_tokenizer


class Clock:
    """Wall seconds and process CPU seconds (all threads) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bench(tokenizer, target: int, n_contexts: int, workdir: Path) -> dict:
    with Clock() as pool:
        source = world_source(0, tokenizer, workdir, min_pool_tokens=int(1.25 * target) + 20_000)
    store = source.docs
    rng = np.random.default_rng(0)
    evidence = [[store.doc_ids[int(i)] for i in rng.choice(len(store), 4, replace=False)] for _ in range(n_contexts)]
    assembled = 0
    with Clock() as assemble:
        for i, docs in enumerate(evidence):
            with open(workdir / f"ctx{i}.txt", "wb") as sink:
                assembled += assemble_context(store, docs, target, np.random.default_rng(i), sink).length_tokens
    naive_tokens = 0
    with Clock() as naive:
        for i in range(n_contexts):
            naive_tokens += len(tokenizer.encode((workdir / f"ctx{i}.txt").read_text(encoding="utf-8")))
    assert naive_tokens == assembled, "cached counts must equal tokenizing the whole context"
    return {
        "target": target,
        "pool_tokens": store.total_tokens,
        "pool": (store.total_tokens / pool.wall, store.total_tokens / pool.cpu),
        "assemble": (assembled / assemble.wall, assembled / assemble.cpu),
        "amortized": (assembled / (pool.wall + assemble.wall), assembled / (pool.cpu + assemble.cpu)),
        "naive": (assembled / (assemble.wall + naive.wall), assembled / (assemble.cpu + naive.cpu)),
    }


def bench_synthesize(tokenizer, target: int, n: int, workdir: Path) -> tuple[float, float]:
    config = SynthConfig(engine="mix", n=n, min_tokens=target, max_tokens=target, seed=0, inline_max_tokens=1024)
    with Clock() as clock:
        card = synthesize(config, workdir, tokenizer=tokenizer, progress=False)
    return card["total_context_tokens"] / clock.wall, card["total_context_tokens"] / clock.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="tokenizer.json / .model (default: the world-trained BPE)")
    parser.add_argument("--contexts", type=int, default=16, help="contexts assembled per target (and synthesized)")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else default_tokenizer(0)
    print(f"tokenizer vocabulary: {tokenizer.vocab_size}")
    rows = []
    for target in (128 * 1024, 1024 * 1024):
        with tempfile.TemporaryDirectory() as d:
            row = bench(tokenizer, target, args.contexts, Path(d))
        with tempfile.TemporaryDirectory() as d:
            row["synthesize"] = bench_synthesize(tokenizer, target, args.contexts, Path(d))
        rows.append(row)
    columns = ("pool", "assemble", "amortized", "naive", "synthesize")
    print("tokens/s: wall clock | per CPU-second (all threads; robust to a shared machine)")
    print("| target | pool tokens | " + " | ".join(columns) + " |")
    print("|" + "---|" * (2 + len(columns)))
    for r in rows:
        cells = [f"{r[c][0] / 1e6:.2f}M \\| {r[c][1] / 1e6:.2f}M" for c in columns]
        print(f"| {r['target'] // 1024}K | {r['pool_tokens']:,} | " + " | ".join(cells) + " |")
    print(f"{args.contexts} contexts per target; amortized = pool + contexts; target >= 1M tokens/s")


if __name__ == "__main__":
    main()
