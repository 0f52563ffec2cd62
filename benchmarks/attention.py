"""Attention benchmark: time and peak memory against sequence length, and ring attention side by side with the
`ringattention` package (PyPI 0.1.2). On a GPU machine use benchmarks/attention_gpu.py.

  .venv/bin/python benchmarks/attention.py                 # CPU: scaling 8K..256K, ringattention at 32K
  .venv/bin/python benchmarks/attention.py --skip-scaling  # only the ringattention comparison
  .venv/bin/python benchmarks/attention.py --cache         # chunked prefill over a KV cache: dense vs blockwise

Methods (causal, batch 1, --heads x --head-dim, float32 on CPU):
  reference  jax.nn.dot_product_attention on one device (timed only while its compiled memory fits --reference-gib)
  blockwise  qlx.kernels.flash_attention, XLA blockwise backend, one device
  ring       qlx.kernels.ring_attention over all (fake) devices, natural token layout
--cache times the model's attention over a KV cache (qlx.models.attention) for a whole chunked prefill of
--cache-length tokens in --cache-chunk chunks into a cache of as many slots: the dense masked reference (the path
before query positions) against cache_attention (the blockwise kernel skipping key blocks past each query block).
Peak memory is the compiled program's own estimate (arguments + outputs + temporaries, per device), so it is reported
for every length without running it; times are the best of --repeats runs after a warm-up run (compile excluded).
Writes the tables (markdown) to stdout and a PNG plot + JSON to --out.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, PartitionSpec  # noqa: E402
from tqdm import tqdm  # noqa: E402

from qlx import kernels  # noqa: E402

GIB = 2**30


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072, 262144])
    parser.add_argument("--time-up-to", type=int, default=131072, help="time the forward pass up to this length")
    parser.add_argument("--grad-up-to", type=int, default=32768, help="time forward + backward up to this length")
    parser.add_argument("--reference-gib", type=float, default=6.0, help="time the dense reference below this")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--compare-length", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--compare-dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the ringattention run"
    )
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--cache", action="store_true", help="only the chunked-prefill KV-cache comparison")
    parser.add_argument("--cache-length", type=int, default=8192)
    parser.add_argument("--cache-chunk", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    return parser.parse_args(argv)


def inputs(t: int, heads: int, kv_heads: int, head_dim: int, dtype=jnp.float32, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (1, t, heads, head_dim), dtype),
        jax.random.normal(kk, (1, t, kv_heads, head_dim), dtype),
        jax.random.normal(kv, (1, t, kv_heads, head_dim), dtype),
    )


def with_backward(attention):
    """q, k, v -> (dq, dk, dv) of sum(attention * fixed cotangent): one forward + backward."""

    def loss(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(out * jnp.cos(jnp.arange(out.shape[-1], dtype=out.dtype)))

    return jax.grad(loss, argnums=(0, 1, 2))


def peak_bytes(fn, args) -> int:
    """Per-device peak of the compiled program: arguments + outputs + temporaries (minus donated aliases)."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return (
        stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    )


def best_time(fn, args, repeats: int) -> tuple[float, float]:
    """(best wall seconds, process CPU seconds of that run) after a warm-up (compile) run."""
    jax.block_until_ready(fn(*args))
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        c0, t0 = os.times(), time.perf_counter()
        jax.block_until_ready(fn(*args))
        wall, c1 = time.perf_counter() - t0, os.times()
        best = min(best, (wall, (c1.user + c1.system) - (c0.user + c0.system)))
    return best


def ring_mesh(axis: str = "seq"):
    return jax.make_mesh((jax.device_count(),), (axis,), axis_types=(AxisType.Auto,))


def methods(mesh):
    return {
        "reference": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
        "blockwise": lambda q, k, v: kernels.flash_attention(q, k, v, backend="xla"),
        "ring": lambda q, k, v: kernels.ring_attention(q, k, v, mesh=mesh),
    }


def scaling(args) -> list[dict]:
    mesh = ring_mesh()
    rows = []
    jobs = [(t, name, fn) for t in args.lengths for name, fn in methods(mesh).items()]
    for t, name, fn in tqdm(jobs, desc="scaling", unit="run"):
        qkv = inputs(t, args.heads, args.kv_heads, args.head_dim)
        row = {"length": t, "method": name}
        row["fwd_peak"] = peak_bytes(fn, qkv)
        row["fwd_bwd_peak"] = peak_bytes(with_backward(fn), qkv)
        fits = name != "reference" or row["fwd_bwd_peak"] < args.reference_gib * GIB
        if fits and t <= args.time_up_to:
            row["fwd_s"], row["fwd_cpu_s"] = best_time(jax.jit(fn), qkv, args.repeats)
        if fits and t <= args.grad_up_to:
            row["fwd_bwd_s"], row["fwd_bwd_cpu_s"] = best_time(jax.jit(with_backward(fn)), qkv, args.repeats)
        rows.append(row)
        tqdm.write(format_row(row))
    return rows


def format_row(row: dict) -> str:
    def seconds(key):
        return f"{row[key]:.2f} ({row[key.replace('_s', '_cpu_s')]:.1f} cpu)" if key in row else "-"

    return (
        f"| {row['length'] // 1024}K | {row['method']} | {seconds('fwd_s')} | {seconds('fwd_bwd_s')} | "
        f"{row['fwd_peak'] / 2**20:,.0f} | {row['fwd_bwd_peak'] / 2**20:,.0f} |"
    )


def print_scaling(rows: list[dict]):
    print(f"\n### Time and peak memory vs length (causal, {jax.device_count()} devices for ring)\n")
    print("| length | method | forward s (cpu s) | fwd+bwd s (cpu s) | peak MiB/device fwd | peak MiB/device fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(format_row(row))


def load_ringattention():
    """The ringattention package's JAX implementation, or the reason it cannot be used."""
    try:
        import jax._src.xla_bridge as xla_bridge

        jax.lib.xla_bridge = xla_bridge  # removed from jax.lib; ringattention 0.1.2 still reads it at import
        import ringattention
    except Exception as err:  # any import failure is reported, and our numbers are still printed
        return None, f"{type(err).__name__}: {err}"
    return ringattention.ringattention_jax, ""


def theirs(ring_fn, mesh, chunk: int, dtype):
    blockwise_kwargs = dict(
        causal_block_size=1,
        deterministic=True,
        dropout_rng=None,
        attn_pdrop=0.0,
        query_chunk_size=chunk,
        key_chunk_size=chunk,
        policy=jax.checkpoint_policies.nothing_saveable,
        dtype=dtype,
        precision=None,
        prevent_cse=True,
    )
    local = partial(
        ring_fn,
        attn_bias=None,
        segment_ids=None,
        cache_idx=None,
        axis_name="seq",
        float32_logits=True,
        blockwise_kwargs=blockwise_kwargs,
    )
    spec = PartitionSpec(None, "seq", None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)


def compare(args) -> dict:
    mesh = ring_mesh()
    ring_size = mesh.shape["seq"]
    dtype = jnp.dtype(args.compare_dtype)
    qkv = inputs(args.compare_length, args.heads, args.heads, args.head_dim, dtype)
    contenders = {"qlx ring_attention": lambda q, k, v: kernels.ring_attention(q, k, v, mesh=mesh)}
    ring_fn, reason = load_ringattention()
    if ring_fn is None:
        print(f"\nringattention could not be imported ({reason}); printing qlx numbers only")
    else:
        contenders["ringattention 0.1.2"] = theirs(ring_fn, mesh, chunk=512, dtype=dtype)
    jobs = {
        (name, kind): fn if kind == "fwd" else with_backward(fn)
        for name, fn in contenders.items()
        for kind in ("fwd", "fwd+bwd")
    }
    compiled = {key: jax.jit(fn) for key, fn in jobs.items()}
    results = {key: {"peak": peak_bytes(fn, qkv)} for key, fn in jobs.items()}
    for key in tqdm(compiled, desc="warm-up", unit="fn"):
        jax.block_until_ready(compiled[key](*qkv))
    for _ in tqdm(range(args.repeats), desc="compare (interleaved)", unit="round"):
        for key, fn in compiled.items():
            c0, t0 = os.times(), time.perf_counter()
            jax.block_until_ready(fn(*qkv))
            wall, c1 = time.perf_counter() - t0, os.times()
            best = results[key].get("time", (float("inf"), 0.0))
            results[key]["time"] = min(best, (wall, (c1.user + c1.system) - (c0.user + c0.system)))
    print(
        f"\n### Ring attention at {args.compare_length // 1024}K tokens, causal, {args.heads} heads x {args.head_dim}, "
        f"{dtype.name}, {ring_size} devices (best of {args.repeats}, interleaved)\n"
    )
    print("| implementation | pass | wall s | cpu s | peak MiB/device |")
    print("|---|---|---|---|---|")
    for (name, kind), res in results.items():
        wall, cpu = res["time"]
        print(f"| {name} | {kind} | {wall:.2f} | {cpu:.1f} | {res['peak'] / 2**20:,.0f} |")
    if ring_fn is not None:
        for kind in ("fwd", "fwd+bwd"):
            ours, other = results[("qlx ring_attention", kind)]["time"], results[("ringattention 0.1.2", kind)]["time"]
            print(f"\nspeed-up {kind}: {other[0] / ours[0]:.2f}x wall, {other[1] / ours[1]:.2f}x cpu", end="")
    busiest_theirs = ring_size - 0.5  # natural layout: the last device sees every block (its own one half-masked)
    print(
        f"\n\nbusiest device on {ring_size} real devices, in (T/{ring_size})^2 block pairs: ringattention "
        f"{busiest_theirs}, qlx zig-zag {ring_size / 2} ({busiest_theirs / (ring_size / 2):.2f}x less); fake CPU "
        "devices share the cores, so this balance gain is not in the times above"
    )
    return {f"{name} {kind}": res for (name, kind), res in results.items()}


def cache_prefill(args) -> dict:
    """Seconds for every chunk of a chunked prefill over a KV cache: dense masked reference vs cache_attention."""
    from qlx.models.attention import attention_mask, cache_attention, reference_attention

    length, chunk, scale = args.cache_length, args.cache_chunk, args.head_dim**-0.5
    q_all, k, v = inputs(length, args.heads, args.kv_heads, args.head_dim)
    contenders = {
        "dense (before)": lambda q, k, v, pos: reference_attention(
            q, k, v, attention_mask(chunk, length, q_positions_bt=pos), scale
        ),
        "cache_attention": lambda q, k, v, pos: cache_attention(q, k, v, pos, scale),
    }
    chunks = [(q_all[:, p : p + chunk], jnp.arange(p, p + chunk)[None]) for p in range(0, length, chunk)]
    results = {}
    for name, fn in tqdm(contenders.items(), desc="cache prefill", unit="method"):
        compiled = jax.jit(fn)
        peak = peak_bytes(fn, (chunks[0][0], k, v, chunks[0][1]))
        jax.block_until_ready(compiled(chunks[0][0], k, v, chunks[0][1]))
        best = (float("inf"), float("inf"))
        for _ in range(args.repeats):
            c0, t0 = os.times(), time.perf_counter()
            for q, pos in chunks:
                jax.block_until_ready(compiled(q, k, v, pos))
            wall, c1 = time.perf_counter() - t0, os.times()
            best = min(best, (wall, (c1.user + c1.system) - (c0.user + c0.system)))
        results[name] = {"time": best, "peak": peak}
    print(
        f"\n### Chunked prefill over a KV cache: {length // 1024}K tokens in chunks of {chunk}, {args.heads} heads / "
        f"{args.kv_heads} kv heads x {args.head_dim}, float32, one device (best of {args.repeats}; "
        f"load average {os.getloadavg()[0]:.1f})\n"
    )
    print("| attention | all chunks wall s | cpu s | peak MiB (one chunk) |")
    print("|---|---|---|---|")
    for name, res in results.items():
        print(f"| {name} | {res['time'][0]:.2f} | {res['time'][1]:.1f} | {res['peak'] / 2**20:,.0f} |")
    before, after = results["dense (before)"]["time"], results["cache_attention"]["time"]
    print(f"\nspeed-up: {before[0] / after[0]:.2f}x wall, {before[1] / after[1]:.2f}x cpu")
    return results


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("reference", "blockwise", "ring"):
        mine = [r for r in rows if r["method"] == name]
        timed = [r for r in mine if "fwd_s" in r]
        ax_time.plot([r["length"] for r in timed], [r["fwd_s"] for r in timed], "o-", label=name)
        ax_mem.plot([r["length"] for r in mine], [r["fwd_bwd_peak"] / GIB for r in mine], "o-", label=name)
    for ax, label in ((ax_time, "forward wall time (s)"), (ax_mem, "peak GiB/device, forward + backward")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("causal attention on CPU (ring: 8 fake devices; memory from the compiled programs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} devices, {os.cpu_count()} cpus"
    )
    results = {}
    if args.cache:
        results["cache"] = cache_prefill(args)
    elif not args.skip_scaling:
        results["scaling"] = scaling(args)
        print_scaling(results["scaling"])
        plot(results["scaling"], args.out / "attention.png")
        print(f"\nplot: {args.out / 'attention.png'}")
    if not (args.cache or args.skip_compare):
        results["compare"] = compare(args)
    (args.out / "attention.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
