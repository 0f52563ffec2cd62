"""``qlx train --config FILE [--set key=value ...]``: SFT or RL training (the recipe), resumable.

Exit status: 0 when the run reached ``train.steps``; 143 after SIGTERM (a checkpoint was saved first); 2 for a bad
config, data file or tokenizer (nothing was computed); 1 when the run stopped on repeated non-finite steps.
Run the same command again to continue a run from its last checkpoint.
"""

from __future__ import annotations

import logging
import sys


def add_arguments(parser) -> None:
    from qlx.config import add_override_argument

    parser.add_argument("--config", required=True, help="run config (YAML; see configs/)")
    add_override_argument(parser)


def run(args) -> int:
    from qlx.config import ConfigError, load_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qlx").setLevel(logging.INFO)
    try:
        config = load_config(args.config, args.overrides)
        from qlx.distributed import initialize

        initialize()  # one of several processes (pod slice, Slurm, explicit coordinator): join them first
        from qlx.train.trainer import SIGTERM_EXIT_CODE, TrainingStopped, train

        result = train(config)
    except ConfigError as e:
        print(f"qlx train: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a bad QLX_DISTRIBUTED / JAX_* variable (named in the message)
        print(f"qlx train: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"qlx train: {e}", file=sys.stderr)
        return 1
    if result.status == "sigterm":
        print(f"qlx train: stopped by SIGTERM after step {result.step}; checkpoint saved in {result.run_dir}")
        return SIGTERM_EXIT_CODE
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
    print(f"qlx train: {config.train.mode} finished step {result.step}{resumed}; run folder {result.run_dir}")
    return 0
