"""``qlx convert``: Hugging Face checkpoints in and out.

  qlx convert --hf IN_DIR --out-hf OUT_DIR --dtype bfloat16     HF -> HF in another dtype (streamed tensor by tensor)
  qlx convert --hf IN_DIR --out-yaml model.yaml                  HF config.json -> qlx model config (YAML)
  qlx convert --config configs/models/tiny-moe.yaml --out-hf DIR  qlx config -> freshly initialised HF checkpoint

Sources: ``--hf`` (a Qwen3 / Qwen3-MoE directory; validated like ``qlx.load_hf``) or ``--config`` (a qlx YAML with a
``model:`` section, plus ``--set`` overrides and ``--seed``). At least one output is required.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from qlx.config import load_config, to_dict
from qlx.models.hf import DEFAULT_MAX_SHARD_BYTES, config_from_hf, convert_hf, read_json, save_hf

DTYPES = ("float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", type=Path, help="source Hugging Face directory (config.json + safetensors)")
    source.add_argument("--config", type=Path, help="source qlx YAML config (its model: section)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for --config")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed for --config")
    parser.add_argument("--out-hf", type=Path, help="write a Hugging Face directory here")
    parser.add_argument("--out-yaml", type=Path, help="write the qlx model config (YAML) here")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the written weights (default: the source's)")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**30, help="shard size cap")
    parser.add_argument("--overwrite", action="store_true", help="replace weights already in --out-hf")


def _source_dtype(hf_config: dict) -> str:
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


def run(args: argparse.Namespace) -> int:
    if args.out_hf is None and args.out_yaml is None:
        print("qlx convert: error: give --out-hf and/or --out-yaml", file=sys.stderr)
        return 2
    try:
        _convert(args)
    except (OSError, ValueError) as e:  # CheckpointError, ConfigError, SafetensorsError, unreadable files
        print(f"qlx convert: error: {e}", file=sys.stderr)
        return 2
    return 0


def _convert(args: argparse.Namespace) -> None:
    max_shard_bytes = int(args.max_shard_gb * 2**30)
    if args.hf is not None:
        hf_config = read_json(args.hf / "config.json")
        dtype = args.dtype or _source_dtype(hf_config)
        config = config_from_hf(hf_config, dtype=dtype, source=str(args.hf / "config.json"))
        if args.out_hf is not None:
            convert_hf(args.hf, args.out_hf, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=args.overwrite)
            print(f"wrote {args.out_hf} ({config.family}, {dtype}) from {args.hf}")
    else:
        config = load_config(args.config, overrides=args.set).model
        if args.dtype is not None:
            config = dataclasses.replace(config, dtype=args.dtype, param_dtype=args.dtype)
        if args.out_hf is not None:
            from qlx.models.qwen3 import build_model

            model = build_model(config, seed=args.seed)
            save_hf(model, args.out_hf, max_shard_bytes=max_shard_bytes, overwrite=args.overwrite)
            print(f"wrote {args.out_hf} ({config.family}, {config.param_dtype}, seed {args.seed}) from {args.config}")
    if args.out_yaml is not None:
        args.out_yaml.write_text(yaml.safe_dump({"model": to_dict(config)}, sort_keys=False))
        print(f"wrote {args.out_yaml}")
