"""``qlx synth``: synthesise long-context QA records (see :mod:`qlx.data.synth`) and print the dataset card.

Model-based filters (``--filters grounding,robustness,difficulty``) ask the model ``--filter-model`` at the
OpenAI-compatible endpoint ``--filter-url`` (defaults: ``QLX_FILTER_URL`` / ``QLX_FILTER_MODEL``, then ``QLX_LLM_URL`` /
``QLX_LLM_MODEL``; key from ``QLX_FILTER_API_KEY``, then ``QLX_LLM_API_KEY`` / ``OPENAI_API_KEY``) and judge replies
with the RL rule verifier of each record's task type (correct means a score of 1).
"""

import json
import os
import sys
from pathlib import Path

from qlx.data.filter_chain import MODEL_FILTERS, FilterConfig
from qlx.data.synth import ENGINE_TASKS, SynthConfig


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    return index, count


def _pair(text: str, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{name} must look like LO,HI (e.g. 0,1), got {text!r}") from None
    return lo, hi


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
    group = parser.add_argument_group("filters (rejected records go to rejects*.jsonl with the reason)")
    group.add_argument("--filters", help=f"comma-separated model-based filters: {', '.join(MODEL_FILTERS)}")
    group.add_argument("--filter-url", help="OpenAI-compatible base URL of the filter model")
    group.add_argument("--filter-model", help="model name at --filter-url")
    group.add_argument("--filter-k", type=int, default=4, help="responses per question for each filter (pass@k)")
    group.add_argument("--filter-max-tokens", type=int, default=1024)
    group.add_argument("--filter-temperature", type=float, default=0.7)
    group.add_argument("--filter-workers", type=int, default=1, help="requests in flight")
    group.add_argument("--robustness-docs", type=int, default=3, help="extra distractor documents per question")
    group.add_argument("--keep-pass-rate", default="0,1", help="difficulty: keep pass rates in [LO,HI]")
    group.add_argument("--bins", type=int, default=4, help="difficulty bins for equal draws")
    group.add_argument("--per-bin", type=int, help="records drawn per bin (default: the smallest bin's size)")
    group.add_argument("--decontaminate", help="test set (.jsonl, or any text file) to decontaminate against")
    group.add_argument("--decontaminate-n", type=int, default=8, help="n-gram length in words")
    group.add_argument("--decontaminate-threshold", type=float, default=0.5, help="drop at this n-gram overlap")
    group.add_argument("--decontaminate-fields", help="comma-separated JSONL keys to read (default: all strings)")
    group.add_argument(
        "--balance", type=Path, metavar="DIR", help="only draw equal numbers per difficulty bin from the records in DIR"
    )


def _merged_card(directory: Path) -> int:
    from qlx.data.card import card_from_records, format_card, write_card
    from qlx.data.records import read_jsonl

    files = sorted(directory.glob("records*.jsonl"))
    if not files:
        print(f"{directory}: no records*.jsonl files", file=sys.stderr)
        return 2
    from qlx.data.card import merge_counts

    card = card_from_records(r for f in files for r in read_jsonl(f))
    shard_cards = [json.loads(p.read_text()) for p in sorted(directory.glob("card-*-of-*.json"))]
    card["filters"], card["dropped"] = merge_counts(shard_cards)
    write_card(card, directory, "card")
    print(format_card(card))
    return 0


def _filter_config(args) -> FilterConfig:
    return FilterConfig(
        model=tuple(args.filters.split(",")) if args.filters else (),
        k=args.filter_k,
        robustness_docs=args.robustness_docs,
        keep_pass_rate=_pair(args.keep_pass_rate, "--keep-pass-rate"),
        bins=args.bins,
        per_bin=args.per_bin,
        decontaminate=args.decontaminate,
        decontaminate_n=args.decontaminate_n,
        decontaminate_threshold=args.decontaminate_threshold,
        decontaminate_fields=tuple(args.decontaminate_fields.split(",")) if args.decontaminate_fields else None,
    )


def filter_client(args, env=None):
    """The :class:`ChatClient` of the filter model (flags, then ``QLX_FILTER_*``, then ``QLX_LLM_*`` variables)."""
    from qlx.data.llm import ChatClient, LLMConfig

    env = dict(os.environ if env is None else env)
    for flag, name in ((args.filter_url, "URL"), (args.filter_model, "MODEL"), (None, "API_KEY")):
        value = flag or env.get(f"QLX_FILTER_{name}")
        if value:
            env[f"QLX_LLM_{name}"] = value
    try:
        return ChatClient(LLMConfig.from_env(env))
    except ValueError as e:
        raise ValueError(f"--filters needs a model: give --filter-url and --filter-model ({e})") from None


def rule_is_correct(record, response: str) -> bool:
    """Whether the RL rule verifier of the record's task type gives ``response`` full marks."""
    from qlx.rl.rewards import rule_reward

    options = {"prefix": record.evidence["program"].get("prefix", "")} if record.task_type == "dialogue" else {}
    return rule_reward(record.task_type, response, record.answer, **options) >= 1.0


def run(args) -> int:
    if args.card is not None:
        return _merged_card(args.card)
    if args.balance is not None:
        from qlx.data.card import format_card
        from qlx.data.filter_chain import balance

        try:
            card = balance(args.balance, n_bins=args.bins, per_bin=args.per_bin, seed=args.seed)
        except (ValueError, FileNotFoundError) as e:
            print(f"qlx synth: {e}", file=sys.stderr)
            return 2
        print(format_card(card))
        print(f"balanced: {args.balance / 'balanced.jsonl'}")
        return 0
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
            filters=_filter_config(args),
        )
        answer_fn = None
        if config.filters.model:
            from qlx.data.filters import llm_answer_fn

            answer_fn = llm_answer_fn(
                filter_client(args),
                temperature=args.filter_temperature,
                max_tokens=args.filter_max_tokens,
                workers=args.filter_workers,
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
    from qlx.data.llm import LLMError
    from qlx.data.synth import shard_stem, synthesize

    try:
        card = synthesize(
            config,
            args.out,
            tokenizer=tokenizer,
            client=client,
            answer_fn=answer_fn,
            is_correct=rule_is_correct,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"qlx synth: {e}", file=sys.stderr)
        return 2
    except LLMError as e:
        print(f"qlx synth: the LLM endpoint failed, {args.out} is incomplete: {e}", file=sys.stderr)
        return 1
    print(format_card(card))
    print(f"records: {args.out / (shard_stem('records', config) + '.jsonl')}")
    print(f"card: {args.out / (shard_stem('card', config) + '.md')} (+ .json, _lengths.png)")
    if config.filters.active:
        print(f"rejects: {args.out / (shard_stem('rejects', config) + '.jsonl')}")
    if "difficulty" in config.filters.model:
        if config.shard_count == 1:
            print(f"balanced by difficulty: {args.out / 'balanced.jsonl'} (card: balanced_card.md)")
        else:
            print(f"after every shard: qlx synth --balance {args.out} --bins {args.bins} to draw equal bins")
    return 0
