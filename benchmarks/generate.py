"""Generation tokens/s of qlx.rollout.generate next to Hugging Face transformers ``generate`` (torch CPU), same weights.

    .venv/bin/python benchmarks/generate.py                      # mid-moe config: batch 8, prompt 128, 64 new tokens
    .venv/bin/python benchmarks/generate.py --prefill 8192 --skip-transformers-prefill

Both sides run float32 on the same machine in one process, one after the other. transformers is timed with each
experts implementation in --hf-experts (default: "eager" and its default "grouped_mm") and every row compares with
the faster one. Rows:

- generate: end to end (prefill of 8 x 128 tokens, then 64 new tokens per row), new tokens / seconds.
- decode: new tokens past the first / (time for 64 new tokens - time for 1 new token): the decode loop alone.
- greedy (temperature 0) and sampled (the recipe's temperature 0.7, top-p 0.95, top-k off).
- prefill N: one prompt of N tokens, 1 new token: N / seconds (N is capped at max_position_embeddings - 1, so
  "32K" is 32,767 tokens on mid-moe). transformers computes only the last position's logits
  in ``generate`` too. Its 32K prefill is left out by default (--transformers-prefill-32k adds it) because its
  attention may materialise 32K x 32K scores per head.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

import qlx
from qlx.models import build_model, save_hf
from qlx.rollout import generate

ROOT = Path(__file__).resolve().parents[1]
SAMPLED = {"temperature": 0.7, "top_p": 0.95}


def median_seconds(fn, reps: int, desc: str) -> float:
    """Median seconds per call of ``fn`` over ``reps`` calls after one warm-up (compile) call."""
    fn()
    times = []
    for _ in tqdm(range(reps), desc=desc, leave=False):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def qlx_runner(model, prompts: np.ndarray, prefill_chunk: int):
    def run(new_tokens: int, sampling: dict) -> None:
        result = generate(
            model,
            prompts.tolist(),
            max_new_tokens=new_tokens,
            seed=0,
            prefill_chunk=prefill_chunk,
            **({"temperature": 0.0} | sampling),
        )
        assert (result.lengths == new_tokens).all(), "a row stopped early"

    return run


def transformers_runner(hf_model, prompts: np.ndarray):
    import torch

    ids = torch.from_numpy(prompts).long()

    def run(new_tokens: int, sampling: dict) -> None:
        options = {"do_sample": True, "top_k": 0, **sampling} if sampling else {"do_sample": False}
        with torch.no_grad():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                **options,
            )
        assert out.shape[1] == ids.shape[1] + new_tokens

    return run


def generation_rows(run, batch: int, new_tokens: int, reps: int, name: str) -> dict[str, float]:
    """tokens/s of generate (end to end) and of decode alone, greedy and sampled."""
    rows = {}
    for label, sampling in (("greedy", {}), ("sampled T=0.7 top-p=0.95", SAMPLED)):
        full = median_seconds(lambda s=sampling: run(new_tokens, s), reps, f"{name} {label} {new_tokens} new")
        first = median_seconds(lambda s=sampling: run(1, s), reps, f"{name} {label} 1 new")
        rows[f"generate, {label}"] = batch * new_tokens / full
        rows[f"decode, {label}"] = batch * (new_tokens - 1) / max(full - first, 1e-9)
        print(
            f"{name} {label}: generate {rows[f'generate, {label}']:,.0f}, decode {rows[f'decode, {label}']:,.0f} "
            "tokens/s",
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/models/mid-moe.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prefill", type=int, nargs="*", default=[8192, 32768], help="prefill prompt lengths")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt positions per prefill step")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--transformers-prefill-32k", action="store_true", help="also time transformers at >16K")
    parser.add_argument(
        "--hf-experts",
        nargs="+",
        default=["eager", "grouped_mm"],
        help="transformers experts implementations to time; each row compares with the fastest",
    )
    args = parser.parse_args(argv)

    config = qlx.load_config(args.config, overrides=args.set).model
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (args.batch, args.prompt), dtype=np.int32)
    model = build_model(config, seed=0)
    print(
        f"config {args.config} ({config.family}, {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_experts} experts top-{config.num_experts_per_tok}, moe_block_size {config.moe_block_size}); "
        f"batch {args.batch} x prompt {args.prompt}, {args.new} new tokens; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, prefill chunk {args.prefill_chunk}"
    )
    ours = generation_rows(qlx_runner(model, prompts, args.prefill_chunk), args.batch, args.new, args.reps, "qlx")
    # A prompt must leave room for the one new token inside max_position_embeddings (32,768 on mid-moe).
    lengths = [min(n, config.max_position_embeddings - 1) for n in args.prefill]
    long_prompts = {n: rng.integers(0, config.vocab_size, (1, n), dtype=np.int32) for n in lengths}
    for n, prompt in long_prompts.items():
        seconds = median_seconds(lambda p=prompt: qlx_runner(model, p, args.prefill_chunk)(1, {}), 1, f"qlx {n}")
        ours[f"prefill {n} tokens"] = n / seconds
        print(f"qlx prefill {n} tokens: {n / seconds:,.0f} tokens/s", flush=True)
    theirs: dict[str, tuple[float, str]] = {}  # mode -> (best tokens/s over the experts implementations, which)
    if not args.skip_transformers:
        import torch
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, tmp)
            hf_models = {
                impl: AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, experts_implementation=impl).eval()
                for impl in args.hf_experts
            }
        for impl, hf_model in hf_models.items():
            rows = generation_rows(
                transformers_runner(hf_model, prompts), args.batch, args.new, args.reps, f"hf {impl}"
            )
            for n, prompt in long_prompts.items():
                if n > 16384 and not args.transformers_prefill_32k:
                    continue
                run = transformers_runner(hf_model, prompt)
                seconds = median_seconds(lambda run=run: run(1, {}), 1, f"hf {impl} {n}")
                rows[f"prefill {n} tokens"] = n / seconds
                print(f"transformers ({impl}) prefill {n} tokens: {n / seconds:,.0f} tokens/s", flush=True)
            for mode, rate in rows.items():
                if rate > theirs.get(mode, (0.0, ""))[0]:
                    theirs[mode] = (rate, impl)
    print("\n| mode | qlx tokens/s | transformers tokens/s (experts impl) | qlx / transformers |\n|---|---:|---:|---:|")
    for mode, rate in ours.items():
        if mode in theirs:
            peer, impl = theirs[mode]
            print(f"| {mode} | {rate:,.0f} | {peer:,.0f} ({impl}) | {rate / peer:.2f}x |")
        else:
            print(f"| {mode} | {rate:,.0f} | - | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
