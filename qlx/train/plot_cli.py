"""``qlx plot RUN_DIR [--out DIR]``: draw a run's reward, entropy and length curves to PNG."""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a qlx run folder (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="folder for the PNG files (default: RUN_DIR/plots)")


def run(args) -> int:
    from qlx.train.plot import plot_run

    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"qlx plot: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
