"""Real-data tokens/s and padding fraction of the demo's SFT and RL steps, packed (``train.packing: true``) against
one right-padded row per sample, in one run.

    .venv/bin/python benchmarks/packing.py                     # 20 SFT steps and 3 RL steps per layout
    .venv/bin/python benchmarks/packing.py --sft-steps 40 --rl-steps 5 --init-from runs/demo/sft

The task set is the demo's (``qlx.demo``: evidence-only reading questions, prompts of ~60 to ~380 tokens), written
under ``--out`` with ``--n-train`` questions; the configs are configs/demo/sft.yaml and configs/demo.yaml. Each layout
runs the same steps twice from the same parameters and data state: the first pass compiles every shape the steps
need, the second is timed, so the table has no compilation in it. Real tokens are the prompt and response tokens of
the step's samples (padding not counted). SFT: whole steps. RL: the training part of the step (log-probs of the
rollouts, AEPO, the update), i.e. step time minus rollout time; the rollouts are the same in both layouts. The RL
rollouts come from fresh weights (long, random answers) unless ``--init-from`` names the demo's SFT run; dynamic
sampling and AEPO are off so that the update runs even when every reward is 0 (with fresh weights, dynamic sampling
would drop every group and AEPO's keep mask every sample, leaving nothing to update).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qlx.demo import FULL, demo_configs
from qlx.models import build_model
from qlx.train.optim import make_optimizer
from qlx.train.preflight import preflight
from qlx.train.rl import RLJob
from qlx.train.sft import SFTJob
from qlx.train.step import Policy
from qlx.train.trainer import load_model


def make_job(config, init_from: str | None, run_dir: Path):
    """(job, params, opt_state) of ``config`` on one device: fresh weights of the config's seed, or ``init_from``."""
    prepared = preflight(config)
    model = build_model(config.model, seed=config.seed) if init_from is None else load_model(config, init_from)
    policy, params, rest = Policy.split(model)
    optimizer = make_optimizer(config.train.optimizer)
    if config.train.mode == "sft":
        job = SFTJob(config, prepared.dataset, policy, rest, optimizer, model.layout)
    else:
        job = RLJob(config, prepared.dataset, policy, rest, optimizer, model.layout, run_dir=run_dir)
    job.begin(params)
    return job, params, optimizer.init(params)


def timed_steps(job, params, opt_state, steps: int) -> list[dict]:
    """Metrics of ``steps`` steps, run twice from the same state; the second (compiled) pass is returned."""
    start = jax.tree.map(jnp.copy, (params, opt_state))
    meta, extra = job.meta(), job.extra_state()
    for s in range(steps):
        params, opt_state, _, _ = job.step(s, params, opt_state)
    job.load(extra, meta)
    params, opt_state = start
    out = []
    for s in range(steps):
        params, opt_state, metrics, _ = job.step(s, params, opt_state)
        out.append(metrics)
    return out


def summarise(metrics: list[dict], train_part: bool) -> dict:
    """Real tokens/s over all steps, mean padding fraction, seconds per step (RL: the training part)."""
    seconds = np.asarray([m["step_time_s"] - (m["rollout_time_s"] if train_part else 0.0) for m in metrics])
    tokens = np.asarray([m["tokens_per_s"] * m["step_time_s"] for m in metrics])
    return {
        "tokens_per_s": float(tokens.sum() / seconds.sum()),
        "padding": float(np.mean([m["padding_fraction"] for m in metrics])),
        "seconds": float(seconds.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/packing_bench", help="folder for the task set and the RL job's files")
    parser.add_argument("--n-train", type=int, default=2000, help="questions in the task set")
    parser.add_argument("--sft-steps", type=int, default=20)
    parser.add_argument("--rl-steps", type=int, default=3)
    parser.add_argument("--init-from", default=None, help="the demo's SFT run folder (RL rollouts of a warm start)")
    parser.add_argument("--packed-length", type=int, default=0, help="train.packed_length of the packed runs")
    args = parser.parse_args()
    out = Path(args.out)
    size = dataclasses.replace(FULL, n_train=args.n_train, n_eval=10)
    rows = []
    for name, steps in (("SFT", args.sft_steps), ("RL", args.rl_steps)):
        if steps == 0:
            continue
        results = {}
        for packing in (False, True):
            layout = [f"train.packing={str(packing).lower()}", f"train.packed_length={args.packed_length}"]
            rl_only = ["train.init_from=null", "rl.dynamic_sampling=false", "rl.aepo=false"]
            configs = demo_configs(out, size, 0, layout, rl_only)
            config = configs.sft if name == "SFT" else configs.rl
            run_dir = out / f"{name.lower()}-{'packed' if packing else 'padded'}"
            run_dir.mkdir(parents=True, exist_ok=True)
            job, params, opt_state = make_job(config, args.init_from if name == "RL" else None, run_dir)
            begin = time.perf_counter()
            results[packing] = summarise(timed_steps(job, params, opt_state, steps), train_part=name == "RL")
            print(f"{name} {'packed' if packing else 'padded'} ({time.perf_counter() - begin:.0f} s with compiles):",
                  results[packing], flush=True)  # fmt: skip
        for packing in (False, True):
            r, layout = results[packing], "packed" if packing else "padded"
            speedup = r["tokens_per_s"] / results[False]["tokens_per_s"]
            rows.append((name, layout, r["tokens_per_s"], r["padding"], r["seconds"], speedup))
    print(f"\ndemo shapes, {jax.device_count()} {jax.default_backend()} device(s); {args.n_train} training questions")
    print("| step | layout | real tokens/s | padding fraction | s/step | vs padded |")
    print("|---|---|---:|---:|---:|---:|")
    for name, layout, tps, pad, sec, speedup in rows:
        print(f"| {name} | {layout} | {tps:,.0f} | {pad:.2f} | {sec:.3f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
