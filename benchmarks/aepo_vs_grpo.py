"""AEPO against plain GRPO on the demo: same seed, data and SFT warm start; entropy and reward curves side by side.

    .venv/bin/python benchmarks/aepo_vs_grpo.py [--out runs/aepo_vs_grpo] [--steps N] [--quick]

Runs the demo's task set, warm start and RL run (``qlx demo``'s, reused when already there: pass the demo's
--out), then plain GRPO from the same warm start: AEPO is configs/demo.yaml (task-level advantages, dynamic sampling,
negatives switched off above h_high), GRPO has group-normalised advantages, every sample kept and no entropy control.
Prints a table (entropy inside [h_low, h_high], mean entropy and reward over the last steps, held-out accuracy of the
warm start and after RL) and writes ``OUT/aepo_vs_grpo.png`` with both entropy curves against the band and both
reward curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from qlx.demo import FULL, QUICK, demo_configs, evaluate_run  # noqa: E402
from qlx.train.metrics import read_metrics  # noqa: E402
from qlx.train.trainer import train  # noqa: E402

VARIANTS = {  # name: (run folder under --out, overrides of configs/demo.yaml)
    "AEPO": ("rl", ()),  # the demo's own RL run: reused when `qlx demo --out` wrote it already
    "GRPO": ("grpo", ("rl.aepo=false", "rl.advantage=group", "rl.dynamic_sampling=false")),
}


def summarise(records: list[dict], h_low: float, h_high: float, tail: int) -> dict:
    """``entropy`` is the training batch's (after dynamic sampling: what AEPO controls), ``entropy/all_rollouts``
    every rollout's (the same quantity for both variants)."""
    entropy = np.asarray([r["entropy"] for r in records])
    everything = np.asarray([r["entropy/all_rollouts"] for r in records])
    reward = np.asarray([r["reward/mean"] for r in records])
    inside = (entropy >= h_low) & (entropy <= h_high)
    return {
        "steps": len(records),
        "batch entropy in band": f"{100 * inside.mean():.0f}%",
        f"batch entropy, last {tail}": f"{entropy[-tail:].mean():.3f}",
        f"all-rollout entropy, last {tail}": f"{everything[-tail:].mean():.3f}",
        "all-rollout entropy range": f"{everything.min():.3f}-{everything.max():.3f}",
        f"reward, last {tail}": f"{reward[-tail:].mean():.3f}",
        "negatives off": f"{100 * np.mean([r['aepo/negatives_on'] == 0 for r in records]):.0f}%",
    }


def plot(curves: dict[str, list[dict]], h_low: float, h_high: float, path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), dpi=110)
    for (name, records), color in zip(curves.items(), ("tab:blue", "tab:orange"), strict=False):
        steps = [r["step"] for r in records]
        left.plot(steps, [r["entropy/all_rollouts"] for r in records], color=color, label=f"{name}, all rollouts")
        left.plot(steps, [r["entropy"] for r in records], color=color, linestyle=":", label=f"{name}, training batch")
        right.plot(steps, [r["reward/mean"] for r in records], color=color, label=name)
    left.axhspan(h_low, h_high, color="tab:green", alpha=0.12, label=f"AEPO band [{h_low}, {h_high}]")
    left.set(title="batch entropy (token mean)", xlabel="step", ylabel="entropy (nats)")
    right.set(title="mean reward of the rollouts", xlabel="step", ylabel="reward")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/aepo_vs_grpo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="RL steps of each variant (default: the demo's)")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few questions (a smoke test)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    size = QUICK if args.quick else FULL
    if args.steps is not None:
        size = dataclasses.replace(size, rl_steps=args.steps)
    out = Path(args.out)
    base = demo_configs(out, size, args.seed)
    train(base.sft)
    warm = evaluate_run(base.sft, out / "sft", base.held_out, size, args.seed + 1).overall()
    rows, curves = {}, {}
    for name, (folder, overrides) in VARIANTS.items():
        run_dir = out / folder
        configs = demo_configs(out, size, args.seed, rl_overrides=(f"train.run_dir={run_dir}", *overrides))
        train(configs.rl)
        curves[name] = read_metrics(run_dir)
        accuracy = evaluate_run(configs.rl, run_dir, configs.held_out, size, args.seed + 1).overall()
        rl = base.rl.rl
        rows[name] = {
            **summarise(curves[name], rl.h_low, rl.h_high, tail=min(10, size.rl_steps)),
            "held-out accuracy, warm start": str(warm),
            "held-out accuracy, after RL": str(accuracy),
        }
    path = plot(curves, base.rl.rl.h_low, base.rl.rl.h_high, out / "aepo_vs_grpo.png")
    keys = list(rows["AEPO"])
    width = max(len(k) for k in keys)
    print(f"{'':{width}}  " + "  ".join(f"{name:>24}" for name in rows))
    for key in keys:
        print(f"{key:{width}}  " + "  ".join(f"{rows[name][key]:>24}" for name in rows))
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
