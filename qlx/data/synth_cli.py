"""``qlx synth``: synthesise long-context QA records (see :mod:`qlx.data.synth`) and print the dataset card."""

import sys
from pathlib import Path

from qlx.data.synth import ENGINE_TASKS, SynthConfig


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    return index, count


def add_arguments(parser) -> None:
    parser.add_argument(
        "--engine", choices=sorted(ENGINE_TASKS), default="mix", help="question engine (mix: all five task types)"
    )
    parser.add_argument("--n", type=int, default=100, help="number of records (over all shards)")
    parser.add_argument("--min-tokens", type=int, default=1024, help="shortest context, in tokens")
    parser.add_argument("--max-tokens", type=int, default=8192, help="longest context, in tokens (up to 4M)")
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument("--shard", default="0/1", help="this process's shard i/n")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json, sentencepiece .model, or a directory with one "
        "(default: a small BPE trained on the world, saved to --out)",
    )
    parser.add_argument("--corpus", help="user corpus: a folder of .txt/.md/.csv/.jsonl files or one .jsonl file")
    parser.add_argument("--llm-facts", action="store_true", help="extract corpus facts with the LLM at QLX_LLM_URL")
    parser.add_argument("--task-types", help="comma-separated subset of the engine's task types")
    parser.add_argument("--n-orgs", type=int, help="world size (default: grown to cover --max-tokens)")
    parser.add_argument("--brief", action="store_true", help="world documents without filler (short contexts)")
    parser.add_argument("--max-hops", type=int, default=4)
    parser.add_argument("--obfuscate-p", type=float, default=0.3)
    parser.add_argument("--inline-max-tokens", type=int, default=131072, help="longer contexts go to contexts/*.txt")
    parser.add_argument("--array-record", action="store_true", help="also write records as ArrayRecord")
    parser.add_argument(
        "--card", type=Path, metavar="DIR", help="only rebuild and print the card of all records in DIR"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _merged_card(directory: Path) -> int:
    from qlx.data.card import card_from_records, format_card, write_card
    from qlx.data.records import read_jsonl

    files = sorted(directory.glob("records*.jsonl"))
    if not files:
        print(f"{directory}: no records*.jsonl files", file=sys.stderr)
        return 2
    card = card_from_records(r for f in files for r in read_jsonl(f))
    write_card(card, directory, "card")
    print(format_card(card))
    return 0


def run(args) -> int:
    if args.card is not None:
        return _merged_card(args.card)
    try:
        if args.out is None:
            raise ValueError("--out DIR is required")
        shard_index, shard_count = _shard(args.shard)
        config = SynthConfig(
            engine=args.engine,
            n=args.n,
            min_tokens=args.min_tokens,
            max_tokens=args.max_tokens,
            seed=args.seed,
            shard_index=shard_index,
            shard_count=shard_count,
            corpus=args.corpus,
            n_orgs=args.n_orgs,
            brief=args.brief,
            max_hops=args.max_hops,
            obfuscate_p=args.obfuscate_p,
            inline_max_tokens=args.inline_max_tokens,
            array_record=args.array_record,
            task_types=tuple(args.task_types.split(",")) if args.task_types else None,
        )
        client = None
        if args.engine == "mase" or args.llm_facts:
            from qlx.data.llm import ChatClient, LLMConfig

            client = ChatClient(LLMConfig.from_env())
        tokenizer = None
        if args.tokenizer:
            from qlx.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"qlx synth: {e}", file=sys.stderr)
        return 2
    from qlx.data.card import format_card
    from qlx.data.synth import shard_stem, synthesize

    card = synthesize(config, args.out, tokenizer=tokenizer, client=client, progress=not args.quiet)
    print(format_card(card))
    print(f"records: {args.out / (shard_stem('records', config) + '.jsonl')}")
    print(f"card: {args.out / (shard_stem('card', config) + '.md')} (+ .json, _lengths.png)")
    return 0
