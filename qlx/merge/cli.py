"""``qlx merge``: merge Hugging Face Qwen3 / Qwen3-MoE checkpoints tensor by tensor (mergekit 0.1.x semantics).

  qlx merge --method sce --base BASE --models STAGE3 MEMORY --out MERGED                        the recipe's merge
  qlx merge --method sce --base B --models X Y --out O --select-topk 0.1 --variant fusechat     FuseChat's SCE
  qlx merge --method ties --base B --models X Y --out O --weights 1 0.5 --densities 0.5 0.5 --dtype bfloat16

Parameters left out take mergekit's defaults for the method (see ``qlx.merge.MergeParams``); a parameter the method
does not use is refused. An interrupted merge rerun with the same arguments resumes, keeping the shards it wrote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlx.merge.methods import DEFAULT_BLOCK_SIZE, METHODS, VARIANTS, MergeError
from qlx.models.hf import DEFAULT_MAX_SHARD_BYTES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--method", choices=METHODS, default="sce", help="merge method (default: sce)")
    parser.add_argument("--base", type=Path, required=True, help="base: HF directory or qlx run folder")
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="HF directories or qlx run folders")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--select-topk", type=float, help="SCE τ: fraction of nonzero-variance positions kept")
    parser.add_argument("--variant", choices=VARIANTS, help="SCE semantics (default: mergekit)")
    parser.add_argument("--weights", type=float, nargs="+", help="per-model weights (one value: every model)")
    parser.add_argument("--densities", type=float, nargs="+", help="per-model densities for TIES / DARE")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, help="divide by the weight sum")
    parser.add_argument("--rescale", action=argparse.BooleanOptionalAction, help="L1 rescale after sparsifying")
    parser.add_argument("--lam", type=float, help="λ on the mixed delta (default 1)")
    parser.add_argument("--seed", type=int, help="DARE mask seed (default 0)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="output dtype (default: base's)")
    parser.add_argument("--workers", type=int, default=1, help="tensors merged in parallel (memory grows with it)")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**30, help="shard size cap")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="elements per block")
    parser.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")


def run(args: argparse.Namespace) -> int:
    from qlx.merge.checkpoint import merge_checkpoints

    names = ("select_topk", "variant", "weights", "densities", "normalize", "rescale", "lam", "seed")
    params = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    for key in ("weights", "densities"):
        if key in params and len(params[key]) == 1:
            params[key] = params[key][0]
    try:
        out = merge_checkpoints(
            args.base,
            args.models,
            args.out,
            method=args.method,
            dtype=args.dtype,
            workers=args.workers,
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            block_size=args.block_size,
            overwrite=args.overwrite,
            **params,
        )
    except (MergeError, OSError) as e:
        print(f"qlx merge: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.method} of {len(args.models)} models onto {args.base})")
    return 0
