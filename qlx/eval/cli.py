"""``qlx eval``: the recipe's long-context benchmarks on any model, resumable, with judge and reports.

  qlx eval --benchmarks mrcr,longbench_v2 --data DATA --out runs/eval1 --url http://127.0.0.1:8000/v1 \\
           --model qwen3 --tokenizer tok.json --judge-url https://api.deepseek.com/v1 --judge-model deepseek-chat
  qlx eval --benchmarks docmath --data DATA --out runs/eval2 --ckpt runs/stage4      # in-process qlx model
  qlx eval --benchmarks mrcr --data DATA --out runs/eval3 --ckpt runs/stage4 --agent memory  # the memory agent
  qlx eval --rescore runs/eval1 [--judge-url ...]        re-score and re-judge the stored generations
  qlx eval --compare runs/eval1 runs/eval2               paired differences with 95% intervals

DATA holds one folder per benchmark (``DATA/longbench_v2/data.json``, ``DATA/mrcr/*.parquet``, ...; a benchmark's
folder may also be DATA itself). The default protocol is the recipe's (QL): 128K-token prompts with middle
truncation in the model's own tokens, 50K new tokens, T 0.7, top-p 0.95, QA scored max(CEM, judge). A rerun with
the same --out skips every generation already stored; the judge's replies are cached in the out folder.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from qlx.eval.benchmarks import NAMES

log = logging.getLogger(__name__)
_RUN_KEYS = ("benchmarks", "protocol", "generation", "model", "limit", "agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add("--benchmarks", default=",".join(NAMES), help=f"comma-separated, from {','.join(NAMES)}")
    add("--data", type=Path, help="folder with one subfolder per benchmark")
    add("--out", type=Path, help="run folder (created; a rerun resumes)")
    add("--url", help="OpenAI-compatible base URL (qlx serve, vLLM, SGLang), e.g. http://127.0.0.1:8000/v1")
    add("--model", help="model id the endpoint serves (with --url)")
    add("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="endpoint key (default: $OPENAI_API_KEY)")
    add("--ckpt", type=Path, help="in-process qlx model: a Hugging Face directory or a qlx run folder")
    add("--tokenizer", type=Path, help="the model's tokenizer (required with --url: truncation and MRCR bins)")
    add("--agent", choices=("none", "memory"), default="none", help="memory: through qlx.memory (ultra-long sets)")
    add("--chunk-tokens", type=int, default=32768, help="--agent memory: document tokens per update turn")
    add("--memory-tokens", type=int, default=15360, help="--agent memory: generation cap of an update turn")
    add("--max-memory-tokens", type=int, help="--agent memory: cap on the carried memory (default: --memory-tokens)")
    add("--max-chunks", type=int, help="--agent memory: centre-truncate longer documents to this many chunks")
    add("--memory-template", choices=("qwenlong", "memagent"), default="qwenlong", help="--agent memory prompts")
    add("--protocol", choices=("ql", "official"), default="ql", help="scoring and default sampling protocol")
    add("--max-input-tokens", type=int, help="prompt budget (QL 131072; 0: no truncation)")
    add("--truncation", choices=("longbench_v2", "longbench_v1"), default="longbench_v2", help="middle truncation")
    add("--max-new-tokens", type=int, help="generation budget (QL 51200; official: the benchmark's)")
    add("--temperature", type=float, help="QL 0.7; official: the benchmark's")
    add("--top-p", type=float, help="QL 0.95")
    add("--limit", type=int, help="first N items of each benchmark")
    add("--samples", type=int, default=1, help="generations per item (k)")
    add("--seed", type=int, default=0, help="run seed (per-request seeds derive from it)")
    add("--mrcr-max-tokens", type=int, default=131072, help="MRCR subset: prompt + answer tokens at most this")
    add("--concurrency", type=int, default=16, help="requests in flight (--url)")
    add("--timeout", type=float, default=3600.0, help="seconds per request (streamed)")
    add("--retries", type=int, default=5, help="retries on transport errors, 429 and 5xx")
    add("--no-stream", action="store_true", help="plain (non-streamed) requests")
    add("--batch", type=int, default=8, help="rows generated together (--ckpt)")
    add("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="weights' dtype (--ckpt, HF)")
    add("--chat-mode", choices=("thinking", "instruct", "no_think"), default="thinking", help="--ckpt chat template")
    add("--judge-url", help="judge endpoint (DeepSeek-V3 in the paper); without it QL scores by rule only")
    add("--judge-model", help="judge model id")
    add("--judge-api-key", default=os.environ.get("QLX_JUDGE_API_KEY"), help="default: $QLX_JUDGE_API_KEY")
    add("--judge-parser", choices=("p1", "p2", "p3", "frames"), help="reply parser (default P3; Frames official)")
    add("--judge-concurrency", type=int, default=8, help="judge requests in flight")
    add("--rescore", type=Path, metavar="DIR", help="re-score DIR's stored generations (no generation)")
    add("--compare", type=Path, nargs=2, metavar=("DIR_A", "DIR_B"), help="paired differences of two runs")
    add("--quiet", action="store_true", help="no progress bars")


class UsageError(ValueError):
    pass


def _judges(args, out):
    if not args.judge_url:
        return None
    from qlx.eval.judge import Judge, JudgeCache
    from qlx.openai_client import ClientConfig, OpenAIClient

    if not args.judge_model:
        raise UsageError("--judge-url needs --judge-model")
    config = ClientConfig(
        args.judge_url, args.judge_model, args.judge_api_key, timeout_s=600.0, concurrency=args.judge_concurrency
    )
    client = OpenAIClient(config)
    cache = JudgeCache(Path(out) / "judge_cache.jsonl")
    return {prompt: Judge(client, prompt=prompt, cache=cache) for prompt in ("eq", "frames")}


def _settings(args):
    from qlx.eval.runner import GenerationConfig

    official = args.protocol == "official"
    defaults = GenerationConfig()
    budget = 0 if args.agent == "memory" else defaults.max_input_tokens  # the agent reads the whole document
    config = GenerationConfig(
        protocol=args.protocol,
        max_input_tokens=budget if args.max_input_tokens is None else args.max_input_tokens,
        truncation=args.truncation,
        max_new_tokens=args.max_new_tokens or defaults.max_new_tokens,
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        top_p=defaults.top_p if args.top_p is None else args.top_p,
        samples=args.samples,
        seed=args.seed,
        mrcr_max_tokens=args.mrcr_max_tokens,
    )
    overrides = {}
    if official:  # flags given explicitly beat the benchmark's official settings
        for flag, key in (("max_new_tokens", "max_new_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
            if getattr(args, flag) is not None:
                overrides[key] = getattr(args, flag)
    return config, overrides


def _check_run(out, run):
    path = out / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        for key in _RUN_KEYS:
            if old.get(key) != run.get(key):
                raise UsageError(
                    f"{out} holds a run with a different {key!r} ({old.get(key)!r} vs {run.get(key)!r}); "
                    "use another --out"
                )
    else:
        out.mkdir(parents=True, exist_ok=True)
        from qlx.eval.store import write_atomic

        write_atomic(path, json.dumps(run, indent=2))


def _load(benchmarks, data, limit):
    from qlx.eval.benchmarks import module

    items, problems = [], {}
    for name in benchmarks:
        root = data / name if (data / name).exists() else data
        loaded = module(name).load(root)
        for line in loaded.problems:
            log.warning("%s: malformed record: %s", name, line)
        for note in loaded.notes:
            log.info("%s: %s", name, note)
        problems[name] = {"malformed": len(loaded.problems), "problems": loaded.problems, "notes": loaded.notes}
        chosen = loaded.items if limit is None else loaded.items[:limit]
        problems[name]["items"] = len(chosen)
        items += chosen
    return items, problems


def _backend(args):
    if args.url:
        from qlx.eval.runner import EndpointBackend
        from qlx.openai_client import ClientConfig, OpenAIClient

        if not args.model:
            raise UsageError("--url needs --model (the model id the endpoint serves)")
        if not args.tokenizer:
            raise UsageError("--url needs --tokenizer (the model's tokenizer: truncation and MRCR bins use it)")
        from qlx.data.tokenizer import load_tokenizer

        config = ClientConfig(
            args.url,
            args.model,
            args.api_key,
            timeout_s=args.timeout,
            max_retries=args.retries,
            concurrency=args.concurrency,
        )
        return EndpointBackend(OpenAIClient(config), stream=not args.no_stream), load_tokenizer(args.tokenizer)
    from qlx.eval.runner import LocalBackend
    from qlx.rollout.serve_cli import load_model, load_serving_tokenizer

    tokenizer = load_serving_tokenizer(args.ckpt, args.tokenizer)
    model = load_model(args.ckpt, dtype=args.dtype)
    if args.agent == "memory":
        from qlx.eval.memory_backend import MemoryAgentBackend

        config = _memory_config(args)
        return MemoryAgentBackend(model, tokenizer, config, protocol=args.protocol, model_id=str(args.ckpt)), tokenizer
    backend = LocalBackend(model, tokenizer, model_id=str(args.ckpt), chat_mode=args.chat_mode, batch=args.batch)
    return backend, tokenizer


def _memory_config(args):
    """The memory agent's settings from the flags (sampling and the final cap come per request)."""
    from qlx.memory import MemoryAgentConfig

    return MemoryAgentConfig(
        chunk_tokens=args.chunk_tokens,
        memory_tokens=args.memory_tokens,
        max_memory_tokens=args.max_memory_tokens,
        max_chunks=args.max_chunks,
        template=args.memory_template,
        chat_mode=args.chat_mode,
    )


def _score_and_report(out, args, meta):
    from qlx.eval.report import render_markdown, write_report
    from qlx.eval.runner import read_generations, score_rows, write_scores

    rows = read_generations(out)
    judges = _judges(args, out)
    needs = {(r["benchmark"], r["protocol"]) for r in rows} & {("frames", "official"), ("corpusqa", "official")}
    if needs and judges is None:
        raise UsageError(
            f"the official scorer of {', '.join(sorted(b for b, _ in needs))} is a judge: pass --judge-url"
        )
    scored = score_rows(rows, judges=judges, parser=args.judge_parser, progress=not args.quiet)
    write_scores(out, scored)
    if judges:
        meta["judge"] = (
            f"{args.judge_model} at {args.judge_url} (failures: {judges['eq'].failures + judges['frames'].failures})"
        )
    else:
        meta["judge"] = "none (QL scores are rule-only)"
    report = write_report(out, scored, meta=meta)
    print(render_markdown(report).split("\n## ")[0])
    return report


def _evaluate(args):
    from qlx.eval.runner import build_requests, generate
    from qlx.eval.store import GenerationStore, write_atomic

    if args.data is None or args.out is None:
        raise UsageError("--data and --out are required (or --rescore DIR / --compare A B)")
    if (args.url is None) == (args.ckpt is None):
        raise UsageError("pass exactly one backend: --url URL --model ID, or --ckpt DIR")
    if args.agent == "memory" and args.ckpt is None:
        raise UsageError("--agent memory runs the memory agent in process: pass --ckpt DIR (not --url)")
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = sorted(set(benchmarks) - set(NAMES))
    if unknown:
        raise UsageError(f"unknown benchmark {unknown[0]!r}; known: {', '.join(NAMES)}")
    if args.protocol == "official" and {"frames", "corpusqa"} & set(benchmarks) and not args.judge_url:
        raise UsageError("the official Frames and CorpusQA scorers are LLM judges: pass --judge-url/--judge-model")
    config, overrides = _settings(args)
    model_id = args.model or str(args.ckpt)
    generation = {**vars(config), **overrides}
    run = {"benchmarks": benchmarks, "protocol": args.protocol, "generation": generation, "model": model_id}
    if args.agent == "memory":
        run["agent"] = dataclasses.asdict(_memory_config(args))
    run["limit"] = args.limit
    _check_run(args.out, run)
    items, load_report = _load(benchmarks, args.data, args.limit)
    write_atomic(args.out / "load_report.json", json.dumps(load_report, indent=2))
    backend, tokenizer = _backend(args)
    requests, outside = build_requests(items, config, tokenizer, overrides)
    store = GenerationStore(args.out / "generations.jsonl")
    try:
        skipped = sum(r.key in store.done for r in requests)
        print(f"qlx eval: {len(requests)} generations ({skipped} already stored), model {model_id}", flush=True)
        generated, failures = generate(requests, backend, store, protocol=args.protocol, progress=not args.quiet)
    finally:
        store.close()
    meta = {
        "model": model_id,
        "protocol": args.protocol,
        "generation": json.dumps(generation),
        "generated this run": generated,
        "failed generations": len(failures),
        "malformed records": json.dumps({b: r["malformed"] for b, r in load_report.items()}),
        "MRCR items outside the subset": outside,
    }
    _score_and_report(args.out, args, meta)
    if failures:
        print(
            f"qlx eval: {len(failures)} generations failed (rerun to retry):",
            *failures[:10],
            sep="\n  ",
            file=sys.stderr,
        )
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.compare:
            from qlx.eval.report import compare, render_compare

            print(render_compare(compare(*args.compare), *args.compare))
            return 0
        if args.rescore:
            run_info = json.loads((args.rescore / "run.json").read_text())
            _score_and_report(
                args.rescore, args, {"model": run_info["model"], "protocol": run_info["protocol"], "rescored": True}
            )
            return 0
        return _evaluate(args)
    except (UsageError, OSError, ValueError) as error:
        print(f"qlx eval: error: {error}", file=sys.stderr)
        return 2
