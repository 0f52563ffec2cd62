"""``qlx pipeline --config PIPELINE.yaml [--dry-run] [--set key=value ...]``: the recipe's stages as one command.

Runs every unfinished stage of the pipeline file in order (see ``qlx.train.pipeline``); run it again after an
interruption to continue. ``--dry-run`` loads and validates every stage's config and prints the plan (stage, kind,
status, initialisation, data, input/output lengths, mesh) without running anything. ``--set`` overrides apply to every
training stage. Exit status: 0 all stages complete; 2 a bad pipeline or stage config; 1 a stage could not finish.
"""

from __future__ import annotations

import logging
import sys


def add_arguments(parser) -> None:
    from qlx.config import add_override_argument

    parser.add_argument(
        "--config", required=True, help="pipeline file (YAML; see configs/qwen3-30b-a3b/*-pipeline.yaml)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    add_override_argument(parser)


def print_plan(rows: list[dict]) -> None:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys).rstrip())
    for r in rows:
        print("  ".join(str(r[k]).ljust(widths[k]) for k in keys).rstrip())


def run(args) -> int:
    from qlx.config import ConfigError
    from qlx.train.pipeline import PipelineError, load_pipeline, plan, run_pipeline

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qlx").setLevel(logging.INFO)
    try:
        pipeline = load_pipeline(args.config, tuple(args.overrides))
        print_plan(plan(pipeline))
    except (ConfigError, PipelineError) as e:
        print(f"qlx pipeline: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    try:
        ran = run_pipeline(pipeline)
    except (ConfigError, PipelineError) as e:
        print(f"qlx pipeline: {e}", file=sys.stderr)
        return 1
    print(f"qlx pipeline: complete ({len(ran)} stages run now: {', '.join(ran) or 'none'}); {pipeline.run_dir}")
    return 0
