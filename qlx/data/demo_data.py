"""A small, learnable task set for demos: short contexts from a small world with brief documents."""

import tempfile
from pathlib import Path

from qlx.data.records import TASK_TYPES, Record, read_jsonl
from qlx.data.synth import SynthConfig, default_tokenizer, synthesize
from qlx.data.tokenizer import Tokenizer


def make_demo_dataset(
    seed: int = 0,
    n_train: int = 256,
    n_eval: int = 64,
    max_context_tokens: int = 384,
    tokenizer: Tokenizer | None = None,
    *,
    task_types: tuple[str, ...] = TASK_TYPES,
) -> tuple[list[Record], list[Record], Tokenizer]:
    """(train records, eval records, tokenizer): questions with at most 2 hops and no obfuscation over a small world
    of brief documents (one or two fact sentences each), contexts of ``max_context_tokens // 2`` to
    ``max_context_tokens`` tokens, task types in equal shares (in ``task_types`` order, interleaved), no question
    repeated between or within the splits. Without ``tokenizer``, the world-trained BPE of :func:`default_tokenizer`.
    Contexts are inline; everything is built in a temporary directory and nothing is downloaded."""
    tokenizer = tokenizer or default_tokenizer(seed)
    n = n_train + n_eval
    config = SynthConfig(
        engine="mix",
        n=n,
        min_tokens=max(64, max_context_tokens // 2),
        max_tokens=max_context_tokens,
        seed=seed,
        n_orgs=max(12, n // 6),
        brief=True,
        max_hops=2,
        obfuscate_p=0.0,
        task_types=tuple(task_types),
    )
    with tempfile.TemporaryDirectory() as out:
        synthesize(config, out, tokenizer=tokenizer, progress=False)
        records = list(read_jsonl(Path(out) / "records.jsonl"))
    return records[:n_train], records[n_train:], tokenizer
