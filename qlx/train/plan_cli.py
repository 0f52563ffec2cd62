"""``qlx plan --config CONFIG (--topology v5p:4x4x4 | --device h100 --devices 8) [--compile] [--json]``.

Prints the per-device memory plan of the config's RL step (:mod:`qlx.train.plan`): each item, the training and
rollout peaks, whether they fit the device with its headroom, and what would fix a plan that does not. GPU plans are
estimates. ``--compile`` (TPU topologies; needs ``pip install -e ".[tpu-aot]"``) lowers and compiles the real RL
train step and the rollout steps for the topology on this host and prints XLA's argument / output / temp /
generated-code bytes and FLOPs beside the estimate (``--layers N`` compiles N decoder layers and scales the
per-layer part to the config's depth).

Exit status: 0 when the plan fits, 3 when it does not, 2 for a bad config or target.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

NOT_FIT_EXIT_CODE = 3


def add_arguments(parser) -> None:
    from qlx.config import add_override_argument

    parser.add_argument("--config", required=True, help="run config (YAML; see configs/)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="TPU slice as device:grid, e.g. v5p:4x4x4 (64 chips), v5e:4x4, v6e:2x4")
    where.add_argument("--device", help="GPU: h100 or h200 (with --devices)")
    parser.add_argument("--devices", type=int, default=8, help="number of GPUs with --device (default 8)")
    parser.add_argument(
        "--rollout-sequences", type=int, default=None, help="sequences per generate call (default: a whole step)"
    )
    parser.add_argument("--compile", action="store_true", help="AOT-compile the steps for --topology (needs libtpu)")
    parser.add_argument(
        "--layers", type=int, default=None, help="with --compile: compile N and 2N layers, scale to the config's depth"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_override_argument(parser)


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f}"


def format_plan(plan, compiled: dict | None = None) -> str:
    """The plan as a table (GiB per device), with the compiled figures beside it when given."""
    lines = [
        f"qlx plan: {plan.config_label} on {plan.target.label}, mesh "
        + " ".join(f"{k}={v}" for k, v in plan.mesh.items() if v > 1)
        + f", remat {plan.remat}",
    ]
    if plan.estimate_only:
        lines.append("GPU plan: an estimate from the same arithmetic (no GPU compile here).")
    lines.append(f"{'item':24} {'GiB/device':>10}  how")
    for item in plan.items:
        lines.append(f"{item.name:24} {_gib(item.bytes):>10}  {item.detail}")
    lines.append(f"{'training peak':24} {_gib(plan.train_peak):>10}")
    lines.append(f"{'rollout peak':24} {_gib(plan.rollout_peak):>10}  {plan.rollout_sequences} sequences per call")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(
        f"peak {_gib(plan.peak).strip()} GiB of {plan.target.device.memory_bytes / 2**30:.1f} GiB "
        f"({plan.target.device.name}): {verdict}, headroom {plan.headroom_bytes / 2**30:.1f} GiB "
        f"(capacity keeps {100 * (1 - plan.capacity / plan.target.device.memory_bytes):.0f}% free)"
    )
    for line in plan.advice:
        lines.append(f"  fix: {line}")
    if compiled:
        lines.append("XLA (per device, GiB)     argument     output      alias       temp   gen.code  peak   TFLOP")
        for name, stats in compiled.items():
            lines.append(
                f"{name:24} {_gib(stats['argument_bytes'])} {_gib(stats['output_bytes'])} {_gib(stats['alias_bytes'])}"
                f" {_gib(stats['temp_bytes'])} {_gib(stats['generated_code_bytes'])} {_gib(stats['peak_bytes'])}"
                f" {stats['flops'] / 1e12:7.1f}  {stats.get('note', '')}"
            )
    return "\n".join(lines)


def compile_for_topology(config, topology: str, *, layers: int | None, rollout_sequences: int) -> dict:
    """Compile the RL train step and the rollout steps for ``topology``; per program a dict of CompiledStats
    fields (scaled from ``layers`` to the config's depth when given)."""
    from jax.experimental import topologies

    from qlx.mesh import make_mesh
    from qlx.train.aot import compiled_stats, lower_rollout_steps, lower_train_step

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    depth = config.model.num_layers
    counts = [depth] if layers is None else sorted({min(layers, depth), min(2 * layers, depth)})

    def at(n):
        model = dataclasses.replace(config.model, num_layers=n, moe_backend="ragged")
        cfg = dataclasses.replace(config, model=model)
        mesh = make_mesh(cfg.mesh, devices=devices)
        out = {"train step": compiled_stats(lower_train_step(cfg, mesh, platform="tpu").compile())}
        lowered = lower_rollout_steps(cfg, mesh, sequences=rollout_sequences, platform="tpu")
        out.update({f"rollout {k}": compiled_stats(v.compile()) for k, v in lowered.items()})
        return out

    runs = {n: at(n) for n in counts}
    result = {}
    for name in runs[counts[0]]:
        low = dataclasses.asdict(runs[counts[0]][name])
        if len(counts) == 1:
            result[name] = {**low, "note": f"{counts[0]} layers" + ("" if counts[0] == depth else " (not scaled)")}
            continue
        high = dataclasses.asdict(runs[counts[1]][name])
        n0, n1 = counts
        scaled = {k: low[k] + (high[k] - low[k]) * (depth - n0) / (n1 - n0) for k in low}
        scaled = {k: v if k == "flops" else int(v) for k, v in scaled.items()}
        scaled["peak_bytes"] = (
            scaled["argument_bytes"] + scaled["output_bytes"] - scaled["alias_bytes"] + scaled["temp_bytes"]
        )
        result[name] = {**scaled, "note": f"compiled {n0} and {n1} layers, scaled linearly to {depth}"}
    return result


def run(args) -> int:
    from qlx.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
        from qlx.train.plan import estimate, gpu_target, parse_topology

        target = parse_topology(args.topology) if args.topology else gpu_target(args.device, args.devices)
        plan = estimate(config, target, rollout_sequences=args.rollout_sequences, label=Path(args.config).name)
    except (ConfigError, ValueError) as e:
        print(f"qlx plan: {e}", file=sys.stderr)
        return 2
    compiled = None
    if args.compile:
        if not args.topology:
            print("qlx plan: --compile needs --topology (GPU plans are estimates)", file=sys.stderr)
            return 2
        try:
            import libtpu  # noqa: F401
        except ImportError:
            print('qlx plan: --compile needs libtpu: pip install -e ".[tpu-aot]"', file=sys.stderr)
            return 2
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{args.topology.split(':')[0]}-8")
        compiled = compile_for_topology(
            config, args.topology, layers=args.layers, rollout_sequences=plan.rollout_sequences
        )
    if args.json:
        print(json.dumps({**plan.to_dict(), "compiled": compiled}, indent=2))
    else:
        print(format_plan(plan, compiled))
    return 0 if plan.fits else NOT_FIT_EXIT_CODE
