"""Peak memory of chunked log-probs + entropy (qlx.rl) against the naive full-logits version, forward + backward.

Peak = argument + output + temp − alias bytes of the compiled `value_and_grad` (XLA buffer assignment), so nothing
of the large shapes has to run. A smaller run executes both and compares results and gradients.

    .venv/bin/python benchmarks/logprobs.py                      # hidden 2048, vocab 151,936; 4K and 32K tokens
    .venv/bin/python benchmarks/logprobs.py --check-tokens 256   # size of the executed equality check
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from qlx.rl.logprobs import naive_logprobs_and_entropy, token_logprobs_and_entropy  # noqa: E402

GIB = 2**30


def step_fn(impl, temperature, chunk, vocab_chunk):
    """value_and_grad over (hidden, lm_head) of Σ a·logp + Σ b·entropy: one forward and one backward pass."""

    def logp_ent(h, w, y, m):
        if impl == "naive":
            return naive_logprobs_and_entropy(h, w, y, m, temperature=temperature)
        return token_logprobs_and_entropy(h, w, y, m, temperature=temperature, chunk=chunk, vocab_chunk=vocab_chunk)

    def objective(h, w, y, m, a, b):
        logp, ent = logp_ent(h, w, y, m)
        return jnp.sum(a * logp) + jnp.sum(b * ent)

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))


def shapes(tokens, hidden, vocab, dtype):
    s = jax.ShapeDtypeStruct
    return (
        s((tokens, hidden), dtype),
        s((hidden, vocab), dtype),
        s((tokens,), jnp.int32),
        s((tokens,), jnp.bool_),
        s((tokens,), jnp.float32),
        s((tokens,), jnp.float32),
    )


def peak_bytes(impl, tokens, args):
    compiled = step_fn(impl, args.temperature, args.chunk, args.vocab_chunk).lower(
        *shapes(tokens, args.hidden, args.vocab, jnp.dtype(args.dtype))
    )
    mem = compiled.compile().memory_analysis()
    parts = {
        "args": mem.argument_size_in_bytes,
        "out": mem.output_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
    }
    parts["peak"] = parts["args"] + parts["out"] + parts["temp"] - mem.alias_size_in_bytes
    return parts


def equality_check(args):
    keys = jax.random.split(jax.random.key(0), 6)
    n, d, v = args.check_tokens, args.hidden, args.vocab
    dtype = jnp.dtype(args.dtype)
    inputs = (
        jax.random.normal(keys[0], (n, d), jnp.float32).astype(dtype),
        (jax.random.normal(keys[1], (d, v), jnp.float32) * d**-0.5).astype(dtype),
        jax.random.randint(keys[2], (n,), 0, v),
        jax.random.bernoulli(keys[3], 0.9, (n,)),
        jax.random.normal(keys[4], (n,)),
        jax.random.normal(keys[5], (n,)),
    )
    out = {}
    for impl in ("naive", "qlx"):
        t0 = time.perf_counter()
        val, grads = step_fn(impl, args.temperature, args.chunk, args.vocab_chunk)(*inputs)
        jax.block_until_ready(grads)
        out[impl] = (val, grads, time.perf_counter() - t0)
    (v0, (dh0, dw0), t_naive), (v1, (dh1, dw1), t_qlx) = out["naive"], out["qlx"]

    def rel(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))

    return {"objective": rel(v0, v1), "d hidden": rel(dh0, dh1), "d lm_head": rel(dw0, dw1)}, t_naive, t_qlx


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768], help="first size is compared to naive")
    p.add_argument("--dtype", default="bfloat16", help="dtype of hidden states and lm_head (logits are float32)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--vocab-chunk", type=int, default=4096)
    p.add_argument("--check-tokens", type=int, default=256, help="tokens of the executed equality check (0: skip)")
    args = p.parse_args()

    jobs = [("naive", args.tokens[0])] + [("qlx", t) for t in args.tokens]
    rows = []
    for impl, tokens in tqdm(jobs, desc="compiling"):
        rows.append((impl, tokens, peak_bytes(impl, tokens, args)))

    print(
        f"\nhidden {args.hidden}, vocab {args.vocab:,}, {args.dtype} inputs, float32 logits, temperature "
        f"{args.temperature}, tiles {args.chunk} x {args.vocab_chunk}; backend {jax.default_backend()}, "
        f"jax {jax.__version__}"
    )
    print(f"{'impl':<6} {'tokens':>7} {'args GiB':>9} {'out GiB':>8} {'temp GiB':>9} {'peak GiB':>9} {'vs naive':>9}")
    naive_peak = rows[0][2]["peak"]
    for impl, tokens, m in rows:
        ratio = f"{m['peak'] / naive_peak:.3f}" if tokens == args.tokens[0] else ""
        print(
            f"{impl:<6} {tokens:>7} {m['args'] / GIB:>9.3f} {m['out'] / GIB:>8.3f} {m['temp'] / GIB:>9.3f} "
            f"{m['peak'] / GIB:>9.3f} {ratio:>9}"
        )

    first, largest = rows[1][2]["peak"] / naive_peak, rows[-1][2]["peak"] / GIB
    verdict = {True: "met", False: "NOT met"}
    print(
        f"targets: peak <= 1/8 of naive at {args.tokens[0]} tokens: {first:.3f} ({verdict[first <= 0.125]}); "
        f"{args.tokens[-1]} tokens under 3 GiB: {largest:.2f} GiB ({verdict[largest < 3]}); "
        f"working memory (temp) vs naive: {rows[1][2]['temp'] / rows[0][2]['temp']:.3f}"
    )

    if args.check_tokens:
        errs, t_naive, t_qlx = equality_check(args)
        print(
            f"\nexecuted check at {args.check_tokens} tokens (max |diff| / max |naive|): "
            + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
            + f"; wall incl. compile: naive {t_naive:.1f}s, qlx {t_qlx:.1f}s"
        )


if __name__ == "__main__":
    main()
