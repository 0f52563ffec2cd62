"""The ``qlx`` command line: a thin dispatcher over subcommands.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their subcommand runs, so ``qlx --help`` stays fast.
"""

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("qlx.demo", "run the main job on the embedded default (what `make demo` runs)"),
    "convert": ("qlx.models.convert_cli", "convert between Hugging Face and qlx checkpoints"),
    "synth": ("qlx.data.synth_cli", "synthesise long-context QA records"),
    "serve": ("qlx.rollout.serve_cli", "OpenAI-compatible HTTP server over a checkpoint"),
    "train": ("qlx.train.cli", "SFT / RL training (the recipe)"),
    "plot": ("qlx.train.plot_cli", "draw reward, entropy and length curves of a run to PNG"),
    "eval": ("qlx.eval.cli", "evaluate a model on the recipe's long-context benchmarks (resumable, judged, reported)"),
    "pipeline": ("qlx.train.pipeline_cli", "run the recipe's stages (RL stages, memory expert, merge) as one command"),
    "merge": ("qlx.merge.cli", "merge checkpoints (SCE, TIES, DARE, task arithmetic, linear), streamed"),
    "plan": ("qlx.train.plan_cli", "per-device memory plan of a config on a TPU topology or GPUs (AOT compile)"),
}


def build_parser(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlx", description="JAX long-context RL post-training (QwenLong-L1.5).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
