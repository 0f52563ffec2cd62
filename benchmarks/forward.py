"""Tokens/s of the qlx forward and forward+backward next to Hugging Face transformers (torch CPU), same weights.

    .venv/bin/python benchmarks/forward.py                       # mid-moe config, batch 4 x 1,024 tokens
    .venv/bin/python benchmarks/forward.py --reps 5 --batch 2
    taskset -c 1 .venv/bin/python benchmarks/forward.py          # one core each (torch follows the affinity)

Both sides run float32 on the same machine in one process (torch and XLA each use all cores, one after the other).
Besides wall-clock tokens/s the table gives tokens per process CPU-second, which is steadier when other jobs share
the machine.
forward: logits [B, T, V] for a batch of random tokens. forward+backward: gradient of the mean next-token
cross-entropy with respect to every parameter (transformers: ``model(ids, labels=ids).loss.backward()``; qlx: the
loss from ``hidden_states`` and ``lm_head_weight`` in token chunks, as the RL loss computes it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import qlx
from qlx.models import build_model, save_hf

ROOT = Path(__file__).resolve().parents[1]


def next_token_loss(model, tokens_bt, chunk: int) -> jax.Array:
    """Mean cross-entropy of tokens[:, 1:] given tokens[:, :-1], computed ``chunk`` positions at a time.

    nll = logsumexp(h W) - h . W[:, y]: the target logit comes from a gathered column of W, so the backward pass
    never scatters into a [tokens, V] array.
    """
    hidden_btd = model.hidden_states(tokens_bt)[:, :-1]
    w_dv = model.lm_head_weight()
    b, t, d = hidden_btd.shape
    n = b * t
    pad = -n % chunk
    h_nd = jnp.pad(hidden_btd.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    y_n = jnp.pad(tokens_bt[:, 1:].reshape(n), (0, pad)).reshape(-1, chunk)
    valid_n = (jnp.arange(n + pad) < n).reshape(-1, chunk)

    def chunk_nll(args):
        h_cd, y_c, valid_c = args
        logz_c = jax.nn.logsumexp(jnp.matmul(h_cd, w_dv, preferred_element_type=jnp.float32), axis=-1)
        picked_c = jnp.sum(h_cd * jnp.take(w_dv, y_c, axis=1).T, axis=-1)
        return jnp.sum(jnp.where(valid_c, logz_c - picked_c, 0.0))

    return jnp.sum(jax.lax.map(chunk_nll, (h_nd, y_n, valid_n))) / n


def time_calls(fn, reps: int, desc: str) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds per call of ``fn`` over ``reps`` calls after a warm-up."""
    fn()
    wall, cpu = [], []
    for _ in tqdm(range(reps), desc=desc, leave=False):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu))


def bench_qlx(model, tokens: np.ndarray, reps: int, chunk: int) -> dict[str, tuple[float, float]]:
    graphdef, state = nnx.split(model)
    tokens_j = jnp.asarray(tokens)

    @jax.jit
    def forward(state, tokens_bt):
        return nnx.merge(graphdef, state)(tokens_bt)

    @jax.jit
    def forward_backward(state, tokens_bt):
        return jax.value_and_grad(lambda s: next_token_loss(nnx.merge(graphdef, s), tokens_bt, chunk))(state)

    return {
        "forward": time_calls(lambda: jax.block_until_ready(forward(state, tokens_j)), reps, "qlx forward"),
        "forward+backward": time_calls(
            lambda: jax.block_until_ready(forward_backward(state, tokens_j)), reps, "qlx forward+backward"
        ),
    }


def bench_transformers(path: Path, tokens: np.ndarray, reps: int) -> dict[str, tuple[float, float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.from_numpy(tokens).long()

    def forward():
        with torch.no_grad():
            model(ids)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    return {
        "forward": time_calls(forward, reps, "transformers forward"),
        "forward+backward": time_calls(forward_backward, reps, "transformers forward+backward"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/models/mid-moe.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--loss-chunk", type=int, default=512, help="tokens per log-softmax chunk in the loss")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args(argv)

    config = qlx.load_config(args.config, overrides=args.set).model
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq), dtype=np.int32)
    model = build_model(config, seed=0)
    n_tokens = args.batch * args.seq
    print(
        f"config {args.config} ({config.family}, {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_experts} experts top-{config.num_experts_per_tok}); batch {args.batch} x {args.seq} tokens; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, moe_backend {config.moe_backend}"
    )
    ours = bench_qlx(model, tokens, args.reps, args.loss_chunk)
    theirs = None
    if not args.skip_transformers:
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, tmp)
            theirs = bench_transformers(Path(tmp), tokens, args.reps)
    print(
        "\n| mode | qlx tokens/s | transformers tokens/s | ratio | qlx tokens/CPU-s | transformers tokens/CPU-s "
        "| ratio (CPU) |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for mode, (wall, cpu) in ours.items():
        if theirs:
            ref_wall, ref_cpu = theirs[mode]
            peer = [f"{n_tokens / ref_wall:,.0f}", f"{ref_wall / wall:.2f}x"]
            peer += [f"{n_tokens / ref_cpu:,.0f}", f"{ref_cpu / cpu:.2f}x"]
        else:
            peer = ["-"] * 4
        cells = [mode, f"{n_tokens / wall:,.0f}", *peer[:2], f"{n_tokens / cpu:,.0f}", *peer[2:]]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
