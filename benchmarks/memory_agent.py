"""Document tokens read per second and peak memory of the memory agent: ``qlx.memory.run`` (one compiled scan over
the chunks) next to ``qlx.memory.run_reference`` (a Python loop calling ``qlx.rollout.generate_rows`` per turn, the
structure of MemAgent's loop), same model, same documents, greedy, in one run.

    .venv/bin/python benchmarks/memory_agent.py                                  # tiny-dense: 64K, 256K, 1M
    .venv/bin/python benchmarks/memory_agent.py --config configs/models/mid-moe.yaml --lengths 65536 262144

Every (side, length) runs in its own subprocess, after a warm-up call on a 2-chunk document that compiles what the
timed call needs, so the time excludes compilation and "peak RSS" is that process's own peak resident memory (on
CPU, device memory is host memory; on an accelerator the script also reports the device's ``peak_bytes_in_use``).
``run``'s compiled device memory (``qlx.memory.memory_analysis``: arguments + outputs + temporaries of its window
and final executables) is printed too: it does not depend on the document's length. The outputs of the two sides
(every turn's response ids, every carried memory, the answers) are compared for each length.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _setup(args):
    import qlx
    from qlx.data.synth import default_tokenizer
    from qlx.memory import MemoryAgentConfig
    from qlx.models import build_model

    tokenizer = default_tokenizer(0)
    model_config = qlx.load_config(args.config, overrides=args.set).model
    model_config = dataclasses.replace(  # the template's ids in the vocabulary, a turn's window in the positions
        model_config,
        vocab_size=max(model_config.vocab_size, tokenizer.vocab_size),
        max_position_embeddings=max(model_config.max_position_embeddings, 2 * args.chunk),
    )
    model = build_model(model_config, seed=0)
    config = MemoryAgentConfig(
        chunk_tokens=args.chunk,
        memory_tokens=args.memory,
        final_tokens=16,
        max_question_tokens=32,
        max_instruction_tokens=8,
        template="memagent",
        chat_mode=None,
        temperature=0.0,
        window_chunks=args.window,
        prefill_chunk=args.prefill_chunk,
    )
    return tokenizer, model, config


def _documents(tokenizer, vocab: int, length: int, batch: int) -> list[np.ndarray]:
    rng = np.random.default_rng(length)
    return [rng.integers(0, min(vocab, tokenizer.vocab_size), length, dtype=np.int32) for _ in range(batch)]


def _digest(rollout) -> str:
    h = hashlib.sha256()
    mask = rollout.response_mask
    h.update(np.where(mask, rollout.response_ids, 0).tobytes())
    h.update(json.dumps([rollout.memories, rollout.answers]).encode())
    return h.hexdigest()[:16]


def worker(args) -> None:
    import jax

    from qlx.memory import run, run_reference

    tokenizer, model, config = _setup(args)
    fn = run if args.worker == "run" else run_reference
    questions = [f"Which code follows marker {i}?" for i in range(args.batch)]
    vocab = model.config.vocab_size
    fn(model, tokenizer, questions, _documents(tokenizer, vocab, 2 * args.chunk, args.batch), config)  # compile
    docs = _documents(tokenizer, vocab, args.length, args.batch)
    start = time.perf_counter()
    rollout = fn(model, tokenizer, questions, docs, config)
    seconds = time.perf_counter() - start
    stats = jax.devices()[0].memory_stats() or {}
    out = {
        "seconds": seconds,
        "tokens_per_s": args.length * args.batch / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_peak_mib": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
        "digest": _digest(rollout),
        "turns": int(rollout.num_chunks.max()),
    }
    if args.worker == "run":
        from qlx.memory import memory_analysis

        m = memory_analysis(model, tokenizer, questions, docs, config)
        out["compiled_mib"] = max(m["window"]["total"], m["final"]["total"]) / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/models/tiny-dense.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 262144, 1048576], help="document tokens")
    parser.add_argument("--batch", type=int, default=4, help="documents (one trajectory each)")
    parser.add_argument("--chunk", type=int, default=4096, help="chunk_tokens")
    parser.add_argument("--memory", type=int, default=32, help="memory_tokens (generation cap of an update turn)")
    parser.add_argument("--window", type=int, default=8, help="window_chunks")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--worker", choices=["run", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import jax

    print(
        f"config {args.config} {args.set}; {args.batch} documents, chunk {args.chunk}, memory cap {args.memory}, "
        f"window {args.window} chunks, greedy; jax {jax.__version__} on {jax.devices()[0].platform}",
        flush=True,
    )
    common = list(argv if argv is not None else sys.argv[1:])
    results = {}
    for length in args.lengths:
        for side in ("run", "reference"):
            cmd = [sys.executable, __file__, *common, "--worker", side, "--length", str(length)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{side} at {length} tokens failed ({proc.returncode})")
            results[side, length] = json.loads(line[0][len("RESULT ") :])
            r = results[side, length]
            print(f"{side} {length:,} tokens: {r['tokens_per_s']:,.0f} doc tokens/s, {r['seconds']:.1f} s", flush=True)
    print(
        "\n| doc tokens | turns | run tokens/s | reference tokens/s | run / reference | run peak RSS MiB | "
        "reference peak RSS MiB | run compiled MiB | same outputs |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for length in args.lengths:
        a, b = results["run", length], results["reference", length]
        print(
            f"| {length:,} | {a['turns']} | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
            f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x | {a['peak_rss_mib']:,.0f} | {b['peak_rss_mib']:,.0f} | "
            f"{a['compiled_mib']:.1f} | {'yes' if a['digest'] == b['digest'] else 'NO'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
