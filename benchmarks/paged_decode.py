"""One decode-attention step over a paged KV cache next to today's dense cache attention, and the shared-prefix
(cascade) variant next to the plain paged one, in one run (float32, CPU or whatever jax runs on).

    .venv/bin/python benchmarks/paged_decode.py                  # B 8, lengths 512..16K, 16/4 heads x 128
    .venv/bin/python benchmarks/paged_decode.py --prompt 16384 --group 8 --suffix 256

Rows:
- dense: ``qlx.models.attention.cache_attention`` over the static engine's cache, one bucket of
  ``length_bucket(max length)`` slots per row: reads B x S slots whatever the lengths.
- paged xla: ``qlx.kernels.paged_attention(backend="xla")`` over the same tokens in pages: reads each row's tokens
  rounded up to a block (pages_per_block x page_size).
- group of G sharing a prompt of P tokens, each with its own suffix: paged over each sample's full table (reads
  G x (P + suffix)) against ``shared_prefix_paged_attention`` (reads P once + the G suffixes).
KV bytes are the K and V slots each variant reads per layer (one layer, as timed).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from qlx.kernels import PagedBlockSizes, paged_attention, shared_prefix_paged_attention

from qlx.models.attention import cache_attention
from qlx.rollout.buckets import length_bucket


def median_ms(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--pages-per-block", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=8192, help="shared prompt tokens of the group rows")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--suffix", type=int, default=512, help="tokens each sample of the group generated")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    b, hq, kv, d, ps = args.batch, args.heads, args.kv_heads, args.head_dim, args.page_size
    sizes = PagedBlockSizes(pages_per_block=args.pages_per_block)
    slot_bytes = 2 * kv * d * 4  # K and V of one token, float32

    lengths = np.geomspace(args.min_len, args.max_len, b).astype(np.int32)
    s = length_bucket(int(lengths.max()))
    width = -(-s // ps)
    q = jnp.asarray(rng.standard_normal((b, hq, d), np.float32))
    k = jnp.asarray(rng.standard_normal((b, width * ps, kv, d), np.float32))
    table = np.arange(b * width, dtype=np.int32).reshape(b, width) + 1
    blocks = k.reshape(b, width, ps, kv, d).transpose(3, 0, 1, 2, 4).reshape(kv, b * width, ps, d)
    pages = jnp.concatenate([jnp.zeros((kv, 1, ps, d)), blocks], axis=1)
    dense = jax.jit(lambda q, k, pos: cache_attention(q[:, None], k, k, pos, d**-0.5))
    paged = jax.jit(lambda q, p, n, t: paged_attention(q, p, p, n, t, backend="xla", block_sizes=sizes))
    block = args.pages_per_block * ps
    read = int(np.sum(-(-lengths // block) * block))  # each row's tokens rounded up to a block
    dense_ms = median_ms(dense, q, k[:, :s], jnp.asarray(lengths - 1)[:, None], reps=args.reps)
    paged_ms = median_ms(paged, q, pages, jnp.asarray(lengths), jnp.asarray(table), reps=args.reps)
    rows = [("dense cache (static engine)", dense_ms, b * s), ("paged xla", paged_ms, read)]

    g, p_len, suffix = args.group, args.prompt, args.suffix
    prefix_pages, suffix_pages = -(-p_len // ps), -(-suffix // ps)
    group_pages = jnp.asarray(rng.standard_normal((kv, 1 + prefix_pages + g * suffix_pages, ps, d), np.float32))
    prefix = 1 + np.arange(prefix_pages, dtype=np.int32)
    own = (1 + prefix_pages + np.arange(g * suffix_pages, dtype=np.int32)).reshape(g, suffix_pages)
    full = np.concatenate([np.broadcast_to(prefix, (g, prefix_pages)), own], axis=1)
    qg = jnp.asarray(rng.standard_normal((1, g, hq, d), np.float32))
    p_tokens = prefix_pages * ps
    plain_ms = median_ms(
        paged, qg[0], group_pages, jnp.full((g,), p_tokens + suffix, jnp.int32), jnp.asarray(full), reps=args.reps
    )
    shared = jax.jit(
        lambda q, p, pl, pt, sl, st: shared_prefix_paged_attention(q, p, p, pl, pt, sl, st, block_sizes=sizes)
    )
    shared_args = (
        jnp.array([p_tokens], jnp.int32),
        jnp.asarray(prefix[None]),
        jnp.full((1, g), suffix, jnp.int32),
        jnp.asarray(own[None]),
    )
    shared_ms = median_ms(shared, qg, group_pages, *shared_args, reps=args.reps)
    name = f"group {g} x (prompt {p_len} + {suffix})"
    rows += [
        (f"{name}: paged", plain_ms, g * (p_tokens + suffix)),
        (f"{name}: shared prefix", shared_ms, p_tokens + g * suffix),
    ]

    print(
        f"{jax.devices()[0].device_kind}; B {b}, lengths {lengths.tolist()} (sum {int(lengths.sum())}), bucket {s}; "
        f"{hq}/{kv} heads x {d}, pages of {ps}, {args.pages_per_block} pages per block; float32"
    )
    print("| variant | ms per step (one layer) | KV MB read |\n|---|---:|---:|")
    for label, ms, slots in rows:
        print(f"| {label} | {ms:.2f} | {slots * slot_bytes / 2**20:.1f} |")


if __name__ == "__main__":
    main()
