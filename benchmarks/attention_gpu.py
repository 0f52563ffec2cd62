"""Attention on one GPU: the Pallas (Triton) kernel checked against float32 dense attention, then timed against the
card's measured bf16 matmul rate and, side by side in the same run, cuDNN's fused attention and JAX's own Pallas
kernels (the Triton `ops.gpu.attention.mha`, MHA only, so K/V are repeated for it; the Hopper Mosaic GPU
`ops.gpu.attention_mgpu`, whose backward pass has no causal mask, so forward only).

  python benchmarks/attention_gpu.py                       # checks, 32K..128K table, 32K tile sweep (~4 min, H100)
  python benchmarks/attention_gpu.py --skip-check --lengths 32768

Shapes are Qwen3-30B-A3B's attention: batch 1, 32 query heads, 4 kv heads, head_dim 128, causal, bf16.
FLOPs counted: forward 2 T^2 H D (the causal half of q k^T and p v), forward + backward 3.5x that (the backward
recomputes q k^T and adds dp, dv, dk, dq). Times are medians of --repeats runs after a warm-up (compile excluded).
Every cell that fails prints its error in the table (the traceback goes to the log) and the run goes on.
Writes the tables (markdown) to stdout and JSON + a PNG plot (TFLOP/s against length) to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
from qlx.kernels import pallas_gpu
from tqdm import tqdm

from qlx import kernels

HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128


CHECK_CASES = [
    # dtype, causal, T, Hq, Hkv, D, packed sequences
    ("float32", True, 1024, 8, 2, 128, 3),
    ("float32", False, 1024, 4, 4, 64, 0),
    ("bfloat16", True, 4096, 32, 4, 128, 0),
    ("bfloat16", True, 2048, 8, 2, 128, 5),
    ("bfloat16", False, 2048, 4, 1, 64, 0),
    ("bfloat16", True, 1024, 4, 2, 256, 0),
    ("bfloat16", True, 512, 4, 1, 32, 2),
    ("float32", True, 512, 4, 2, 256, 2),
]
# Cases run again with these tiles (the dq kernel tiled apart from the dkv kernel, deeper pipelines).
CHECK_TILES = [
    (2, dict(block_q_dq=128, block_kv_dq=128)),
    (3, dict(block_q=128, block_kv=64, block_q_dq=64, block_kv_dq=128, num_warps=4)),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--sweep-length", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--check-runs", type=int, nargs="+", help="indices into the check runs (default: all)")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--plot-from", type=Path, help="only redraw the plot from a saved attention_gpu.json")
    return parser.parse_args(argv)


def normal(seed: int, shape, dtype):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def qkv(seed: int, t: int, hq: int, hkv: int, d: int, dtype):
    return (
        normal(seed, (1, t, hq, d), dtype),
        normal(seed + 1, (1, t, hkv, d), dtype),
        normal(seed + 2, (1, t, hkv, d), dtype),
    )


def segments(seed: int, t: int, count: int):
    """[1, t] int32 ids of `count` packed sequences with random boundaries."""
    cuts = jnp.sort(jax.random.choice(jax.random.key(seed), jnp.arange(1, t), (count - 1,), replace=False))
    return jnp.searchsorted(cuts, jnp.arange(t), side="right")[None].astype(jnp.int32)


def median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def grads_of(attention):
    """q, k, v -> (o, dq, dk, dv) of sum(o * a fixed random cotangent)."""

    def run(q, k, v, do):
        o, vjp = jax.vjp(attention, q, k, v)
        return (o, *vjp(do.astype(o.dtype)))

    return run


def rel_err(x, ref) -> float:
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def check(args, log) -> list[dict]:
    """pallas_gpu (compiled) forward and gradients vs jax.nn.dot_product_attention in float32 at full precision."""
    rows = []
    runs = [(n, None) for n in range(len(CHECK_CASES))] + [(n, tiles) for n, tiles in CHECK_TILES]
    runs = runs if args.check_runs is None else [runs[i] for i in args.check_runs]
    for n, tiles in tqdm(runs, desc="check", unit="case"):
        dtype, causal, t, hq, hkv, d, packed = CHECK_CASES[n]
        q, k, v = qkv(100 + 10 * n, t, hq, hkv, d, jnp.dtype(dtype))
        do = normal(105 + 10 * n, q.shape, jnp.float32)
        seg = segments(107 + 10 * n, t, packed) if packed else None
        sizes = None if tiles is None else pallas_gpu.BlockSizes(**tiles)
        row = {"dtype": dtype, "causal": causal, "t": t, "hq": hq, "hkv": hkv, "d": d, "segments": packed}
        row["tiles"] = tiles or "default"

        def ours(q, k, v, seg=seg, causal=causal, sizes=sizes):
            return kernels.flash_attention(
                q, k, v, causal=causal, segment_ids=seg, block_sizes=sizes, backend="pallas_gpu"
            )

        def dense(q, k, v, seg=seg, causal=causal):
            mask = None if seg is None else (seg[:, :, None] == seg[:, None, :])[:, None]
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, mask=mask, implementation="xla")

        try:
            got = jax.jit(grads_of(ours))(q, k, v, do)
            with jax.default_matmul_precision("highest"):
                f32 = [x.astype(jnp.float32) for x in (q, k, v)]
                want = jax.jit(grads_of(dense))(*f32, do)
            for name, x, ref in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
                row[name] = rel_err(x, ref)
                row[name + "_finite"] = bool(jnp.all(jnp.isfinite(x)))
        except Exception as err:  # noqa: BLE001 - report and go on: every case is worth seeing
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            log.write(f"check case {row}:\n{traceback.format_exc()}\n")
        rows.append(row)
    print("\n### pallas_gpu compiled vs dense float32 (relative L2 error; tolerance f32/TF32 2e-3, bf16 2e-2)\n")
    print("| dtype | causal | T | Hq/Hkv | D | segments | tiles | o | dq | dk | dv | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['dtype']} | {r['causal']} | {r['t']} | {r['hq']}/{r['hkv']} | {r['d']} | {r['segments']} | "
        head += f"{r['tiles']} |"
        if "error" in r:
            print(f"{head} {r['error']} | | | | FAIL |")
            continue
        tol = 2e-3 if r["dtype"] == "float32" else 2e-2
        ok = all(r[n] < tol and r[n + "_finite"] for n in ("o", "dq", "dk", "dv"))
        r["ok"] = ok
        print(f"{head} {r['o']:.1e} | {r['dq']:.1e} | {r['dk']:.1e} | {r['dv']:.1e} | {'ok' if ok else 'FAIL'} |")
    return rows


def model_check(log) -> dict:
    """The tiny Qwen3-MoE, float32, with model.attention=flash (the Pallas GPU kernel) and moe_backend=ragged
    (lax.ragged_dot) against attention=reference and moe_backend=blocked: logits and parameter gradients."""
    import dataclasses

    from flax import nnx

    import qlx
    from qlx.models import Qwen3ForCausalLM, build_model

    root = Path(__file__).resolve().parents[1]
    config = qlx.load_config(root / "configs/models/tiny-moe.yaml").model
    state = nnx.state(build_model(config, seed=0))
    tokens = jax.random.randint(jax.random.key(3), (2, 257), 0, config.vocab_size)
    segments = jnp.concatenate([jnp.ones((2, 100), jnp.int32), jnp.full((2, 156), 2, jnp.int32)], axis=1)

    def run(**overrides):
        graph = nnx.split(
            nnx.eval_shape(lambda: Qwen3ForCausalLM(dataclasses.replace(config, **overrides), rngs=nnx.Rngs(0)))
        )[0]

        def loss(state):
            logits = nnx.merge(graph, state)(tokens[:, :-1], segment_ids_bt=segments)
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)
            return jnp.mean(nll), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)

    result = {}
    try:
        with jax.default_matmul_precision("highest"):
            (_, want_logits), want_grads = run(attention="reference", moe_backend="blocked")
        (_, logits), grads = run(attention="flash", moe_backend="ragged")
        result["logits"] = rel_err(logits, want_logits)
        flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
        result["grads_max"] = max(rel_err(g, flat_want[p]) for p, g in jax.tree_util.tree_leaves_with_path(grads))
    except Exception as err:  # noqa: BLE001 - report and go on
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        log.write(f"model check:\n{traceback.format_exc()}\n")
    print("\n### tiny Qwen3-MoE (float32, 2 x 256 tokens, 2 segments): flash + ragged vs reference + blocked\n")
    print(json.dumps(result))
    return result


def matmul_tflops(n: int = 8192) -> float:
    """The card's bf16 matmul rate: the best of 30 products (random data) after warm-up products bring up the clock."""
    a, b = normal(1, (n, n), jnp.bfloat16), normal(2, (n, n), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    for _ in range(20):
        jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(30):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def methods(skip_peers: bool) -> dict:
    """name -> (forward fn(q, k, v), supports backward)."""
    found = {"qlx pallas_gpu": (functools.partial(kernels.flash_attention, backend="pallas_gpu"), True)}
    if skip_peers:
        return found
    found["cuDNN (jax.nn, implementation='cudnn')"] = (
        functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"),
        True,
    )
    from jax.experimental.pallas.ops.gpu import attention as jax_triton

    def triton_mha(q, k, v):
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        return jax_triton.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True)

    found["jax pallas ops.gpu.attention (Triton; K/V repeated)"] = (triton_mha, True)
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)

        def mosaic(q, k, v):
            q, k, v = (x.astype(jnp.float16) for x in (q * q.shape[-1] ** -0.5, k, v))
            return attention_mgpu.attention(q, k, v, config)

        found["jax pallas ops.gpu.attention_mgpu (Mosaic GPU, float16; fwd)"] = (mosaic, False)
    except Exception as err:  # noqa: BLE001 - the peer is optional
        print(f"attention_mgpu unavailable: {err}")
    return found


def loss_grad(attention):
    def loss(q, k, v):
        o = attention(q, k, v)
        return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.shape[-1], dtype=jnp.float32)))

    return jax.grad(loss, argnums=(0, 1, 2))


def timed_cell(fn, inputs, repeats: int, log, label: str) -> float | str:
    try:
        return median_seconds(jax.jit(fn), inputs, repeats)
    except Exception as err:  # noqa: BLE001 - a failing peer leaves an error cell, the table goes on
        log.write(f"{label}:\n{traceback.format_exc()}\n")
        return f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"


def speed(args, peak: float, log) -> list[dict]:
    rows = []
    found = methods(args.skip_peers)
    for t in tqdm(args.lengths, desc="speed", unit="length"):
        inputs = qkv(7, t, HEADS, KV_HEADS, HEAD_DIM, jnp.bfloat16)
        flops = 2 * t * t * HEADS * HEAD_DIM
        for name, (fn, backward) in found.items():
            fwd = timed_cell(fn, inputs, args.repeats, log, f"{name} fwd {t}")
            both = timed_cell(loss_grad(fn), inputs, args.repeats, log, f"{name} bwd {t}") if backward else "-"
            rows.append({"length": t, "method": name, "fwd_s": fwd, "fwd_bwd_s": both, "flops": flops})
        del inputs
    print(
        f"\n### Causal attention, bf16, {HEADS} q heads / {KV_HEADS} kv heads x {HEAD_DIM}, batch 1, "
        f"{jax.devices()[0].device_kind}; bf16 matmul 8192^3 best {peak:.0f} TFLOP/s\n"
    )
    print("| length | method | fwd ms | fwd TFLOP/s (% matmul) | fwd+bwd ms | fwd+bwd TFLOP/s (% matmul) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for key, mult in (("fwd_s", 1.0), ("fwd_bwd_s", 3.5)):
            s = r[key]
            if isinstance(s, float):
                rate = mult * r["flops"] / s / 1e12
                cells += [f"{s * 1e3:.1f}", f"{rate:.0f} ({100 * rate / peak:.0f}%)"]
            else:
                cells += [s, ""]
        print(f"| {r['length'] // 1024}K | {r['method']} | " + " | ".join(cells) + " |")
    return rows


def sweep(args, peak: float, log) -> list[dict]:
    """Our kernel's tiles and Triton launch settings at one length (forward, then forward + backward)."""
    t = args.sweep_length
    inputs = qkv(9, t, HEADS, KV_HEADS, HEAD_DIM, jnp.bfloat16)
    flops = 2 * t * t * HEADS * HEAD_DIM
    variants = [
        ("fwd", dict()),
        ("fwd", dict(num_stages=3)),
        ("fwd", dict(block_q=128, block_kv=64)),
        ("bwd", dict()),
        ("bwd", dict(block_q_dq=128, block_kv_dq=128)),
        ("bwd", dict(num_warps=4)),
        ("bwd", dict(block_q_bwd=128, block_kv_bwd=32)),
        ("bwd", dict(block_q_bwd=64, block_kv_bwd=64)),
    ]
    rows = []
    for kind, sizes in tqdm(variants, desc="sweep", unit="variant"):
        block_sizes = pallas_gpu.BlockSizes(**sizes)
        fn = functools.partial(kernels.flash_attention, backend="pallas_gpu", block_sizes=block_sizes)
        fn = fn if kind == "fwd" else loss_grad(fn)
        s = timed_cell(fn, inputs, args.repeats, log, f"sweep {kind} {sizes}")
        rows.append({"pass": kind, "sizes": sizes, "s": s})
    print(f"\n### qlx pallas_gpu tiles at {t // 1024}K (bf16, {HEADS}/{KV_HEADS} x {HEAD_DIM}, causal)\n")
    print("| pass | block sizes / launch settings | ms | TFLOP/s (% matmul) |")
    print("|---|---|---|---|")
    for r in rows:
        mult = 1.0 if r["pass"] == "fwd" else 3.5
        s = r["s"]
        if isinstance(s, float):
            rate = mult * flops / s / 1e12
            print(f"| {r['pass']} | {r['sizes']} | {s * 1e3:.2f} | {rate:.0f} ({100 * rate / peak:.0f}%) |")
        else:
            print(f"| {r['pass']} | {r['sizes']} | {s} | |")
    return rows


def plot(results: dict, path: Path):
    """TFLOP/s against length, forward and forward + backward, one line per method; the matmul rate dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    peak = results["matmul_tflops"]
    for ax, key, mult, title in ((axes[0], "fwd_s", 1.0, "forward"), (axes[1], "fwd_bwd_s", 3.5, "forward + backward")):
        for method in dict.fromkeys(r["method"] for r in results["speed"]):
            rows = [r for r in results["speed"] if r["method"] == method and isinstance(r[key], float)]
            if rows:
                rates = [mult * r["flops"] / r[key] / 1e12 for r in rows]
                ax.plot([r["length"] // 1024 for r in rows], rates, "o-", label=method)
        ax.axhline(peak, color="gray", linestyle="--", label=f"bf16 matmul {peak:.0f}")
        ax.set_xscale("log", base=2)
        lengths = sorted({r["length"] // 1024 for r in results["speed"]})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("sequence length (K tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"causal attention, bf16, {HEADS}/{KV_HEADS} heads x {HEAD_DIM}, {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_from:
        plot(json.loads(args.plot_from.read_text()), args.out / "attention_gpu.png")
        return 0
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {device.platform}: {device.device_kind}")
    if device.platform != "gpu":
        raise SystemExit(f"needs a GPU (jax.devices()[0] is {device.platform}); on CPU use benchmarks/attention.py")
    results = {"jax": jax.__version__, "device": device.device_kind}
    with open(args.out / "attention_gpu.log", "w") as log:
        if not args.skip_check:
            results["check"] = check(args, log)
        results["matmul_tflops"] = peak = matmul_tflops()
        results["speed"] = speed(args, peak, log)
        if not args.skip_sweep:
            results["sweep"] = sweep(args, peak, log)
        if not args.skip_model:
            results["model"] = model_check(log)
    (args.out / "attention_gpu.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.out / "attention_gpu.png")
    print(f"\nplot: {args.out / 'attention_gpu.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
