"""``qlx demo`` (what ``make demo`` runs): the whole recipe, small, on a CPU.

1. synthesise a small task set (``qlx.data.demo_data``: reading-comprehension questions over the synthetic world,
   contexts cut to their evidence documents) and its tokenizer;
2. build a tiny Qwen3-MoE and warm-start it with SFT (``configs/demo/sft.yaml``);
3. evaluate it on the held-out questions;
4. train it with AEPO RL (``configs/demo.yaml``);
5. evaluate again and print accuracy per task type before and after RL with 95% intervals, and the paired change;
6. write the plots (reward, entropy, length curves; accuracy before/after) and ``results.json``.

Every stage resumes: run it again after an interruption and it continues where it stopped. SIGTERM checkpoints
the stage in training and exits (status 143) without going on to the next stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from qlx.data.records import TASK_TYPES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How much data, training and evaluation the demo runs.

    n_train, n_eval: training and held-out questions. context_tokens: largest context of a question as synthesised.
    evidence_only: cut each context down to its evidence documents (the distractors go), so that a model trained
        from scratch for a few minutes can learn to read it.
    sft_steps, rl_steps: optimizer steps of the warm start and of RL. The warm start needs its 1,200 steps: the tiny
        model learns to copy names out of the context between steps 900 and 1,200 (held-out accuracy ~20% → 50–85%),
        and 16,000 questions keep those steps near two epochs, so RL's training prompts are not memorised.
    n_eval: 1,000 held-out questions make the paired interval on RL's change ~±1.7 points (±3.6 with 300).
    eval_samples: answers sampled per held-out question (accuracy is their mean). rl_batch: prompts per RL step.
    task_types: the task types synthesised (equal shares); the default is the one a model trained from scratch for a
        few CPU minutes learns enough of for RL to lift (see BUILD_NOTES.md).
    """

    n_train: int = 16000
    n_eval: int = 1000
    context_tokens: int = 384
    evidence_only: bool = True
    sft_steps: int = 1200
    rl_steps: int = 50
    eval_samples: int = 4
    rl_batch: int = 32
    task_types: tuple[str, ...] = ("reading",)


FULL = DemoSize()
QUICK = DemoSize(
    n_train=40, n_eval=10, sft_steps=3, rl_steps=2, eval_samples=1, rl_batch=8, task_types=TASK_TYPES
)  # every stage on all five task types, for the tests


def add_arguments(parser) -> None:
    from qlx.config import add_override_argument

    parser.add_argument("--out", help="output folder (data, runs, plots, results.json); runs/demo, runs/demo-memory")
    parser.add_argument("--memory", action="store_true", help="the memory-agent demo (qlx.demo_memory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task set, the model and the sampling")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few questions (a smoke test)")
    parser.add_argument(
        "--base",
        help="with --memory: the full-context demo's folder whose trained model and tokenizer the memory agent starts "
        "from (default runs/demo; `qlx demo` runs into it first when it holds no finished demo; 'none': a fresh model)",
    )
    add_override_argument(parser, "override a key of both training configs, e.g. --set model.num_layers=1")


def evidence_only(record, tokenizer):
    """The record with its context cut to its evidence documents (in context order, each followed by a blank line);
    evidence spans, fact spans and the token count follow the new context."""
    facts_of: dict[str, list[dict]] = {}
    for fact in record.evidence["facts"]:
        facts_of.setdefault(fact["doc_id"], []).append(fact)
    text, docs, facts = "", [], []
    for doc in sorted(record.evidence["docs"], key=lambda d: d["char_start"]):
        mine = facts_of.get(doc["doc_id"], [])
        end = max([doc["char_end"], *(f["char_end"] for f in mine)])
        token_start = len(tokenizer.encode(text))
        shift = len(text) - doc["char_start"]
        piece = record.context[doc["char_start"] : end].rstrip("\n")
        text += piece + "\n\n"
        docs.append({**doc, "char_start": doc["char_start"] + shift, "char_end": doc["char_start"] + shift + len(piece),
                     "token_start": token_start, "token_end": len(tokenizer.encode(text))})  # fmt: skip
        facts += [{**f, "char_start": f["char_start"] + shift, "char_end": f["char_end"] + shift} for f in mine]
    evidence = {**record.evidence, "docs": docs, "facts": facts}
    return dataclasses.replace(record, context=text, evidence=evidence, length_tokens=len(tokenizer.encode(text)))


def _write_data(out: Path, size: DemoSize, seed: int) -> tuple[Path, Path, Path]:
    from qlx.data.demo_data import make_demo_dataset
    from qlx.data.records import write_jsonl

    folder = out / "data"
    train_path, eval_path, tok_path = folder / "train.jsonl", folder / "eval.jsonl", folder / "tokenizer.json"
    stamp = folder / "size.json"
    wanted = json.dumps({**dataclasses.asdict(size), "seed": seed})
    if stamp.is_file() and stamp.read_text() == wanted and all(p.is_file() for p in (train_path, eval_path, tok_path)):
        return train_path, eval_path, tok_path
    folder.mkdir(parents=True, exist_ok=True)
    train, held_out, tokenizer = make_demo_dataset(
        seed=seed,
        n_train=size.n_train,
        n_eval=size.n_eval,
        max_context_tokens=size.context_tokens,
        task_types=size.task_types,
    )
    if size.evidence_only:
        train = [evidence_only(r, tokenizer) for r in train]
        held_out = [evidence_only(r, tokenizer) for r in held_out]
    write_jsonl(train, train_path)
    write_jsonl(held_out, eval_path)
    tokenizer.save(folder)
    stamp.write_text(wanted)
    return train_path, eval_path, tok_path


@dataclasses.dataclass(frozen=True)
class DemoConfigs:
    """The demo's runs: the SFT warm start, AEPO RL from it, and the held-out set (as an SFT-shaped config)."""

    sft: object
    rl: object
    held_out: object


def demo_configs(out: Path, size: DemoSize, seed: int, overrides=(), rl_overrides=()) -> DemoConfigs:
    """Write the task set under ``out/data`` (if not there yet) and load the demo's configs pointing at it.

    ``overrides`` apply to every config, ``rl_overrides`` to the RL run only (e.g. ``rl.aepo=false``)."""
    from qlx.config import load_config

    train_path, eval_path, tok_path = _write_data(out, size, seed)
    paths = [
        f"data.train_files=[{train_path}]",
        f"data.tokenizer={tok_path}",
        f"data.task_types=[{','.join(size.task_types)}]",
        f"seed={seed}",
    ]
    sft = load_config(
        CONFIGS / "demo/sft.yaml",
        [*paths, f"train.run_dir={out / 'sft'}", f"train.steps={size.sft_steps}", *overrides],
    )
    rl = load_config(
        CONFIGS / "demo.yaml",
        [
            *paths,
            f"train.run_dir={out / 'rl'}",
            f"train.init_from={out / 'sft'}",
            f"train.steps={size.rl_steps}",
            f"train.batch_size={size.rl_batch}",
            *overrides,
            *rl_overrides,
        ],
    )
    held_out = load_config(CONFIGS / "demo/sft.yaml", [*paths, f"data.train_files=[{eval_path}]", *overrides])
    return DemoConfigs(sft=sft, rl=rl, held_out=held_out)


def train_stage(config, label: str, **kwargs) -> bool:
    """``qlx.train.trainer.train(config, **kwargs)``; False when SIGTERM stopped it (its checkpoint saved), after
    saying so: the demo then exits rather than evaluate or build on a half-trained stage. A rerun resumes it."""
    from qlx.train.trainer import train

    result = train(config, **kwargs)
    if result.status == "sigterm":
        print(
            f"qlx demo: stopped by SIGTERM during {label} after step {result.step} (checkpoint saved in "
            f"{result.run_dir}); run the same command again to resume",
            file=sys.stderr,
        )
    return result.status != "sigterm"


def evaluate_run(config, run_dir: Path, held_out, size: DemoSize, seed: int):
    """Held-out accuracy of the newest checkpoint of ``run_dir`` (``qlx.train.evaluate``)."""
    from qlx.train.evaluate import evaluate
    from qlx.train.preflight import preflight
    from qlx.train.trainer import load_model

    return evaluate(
        load_model(config, run_dir),
        preflight(held_out).dataset,
        samples=size.eval_samples,
        max_new_tokens=config.data.max_output_tokens,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        seed=seed,
    )


def run(args) -> int:
    if args.memory:
        from qlx.demo_memory import run as run_memory

        return run_memory(args)
    from qlx.config import ConfigError
    from qlx.train.evaluate import format_table, paired_change
    from qlx.train.plot import plot_accuracy, plot_run
    from qlx.train.trainer import SIGTERM_EXIT_CODE

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    size = QUICK if args.quick else FULL
    out = Path(args.out or "runs/demo")
    start = time.perf_counter()
    print(f"qlx demo: task set ({size.n_train} training, {size.n_eval} held-out questions) -> {out / 'data'}")
    try:
        configs = demo_configs(out, size, args.seed, args.overrides)
    except ConfigError as e:
        print(f"qlx demo: config error: {e}", file=sys.stderr)
        return 2
    sft, rl = configs.sft, configs.rl

    print(f"qlx demo: SFT warm start of a tiny Qwen3-MoE, {size.sft_steps} steps -> {out / 'sft'}")
    if not train_stage(sft, "the SFT warm start"):
        return SIGTERM_EXIT_CODE
    print(f"qlx demo: evaluating the warm start on {size.n_eval} held-out questions")
    before = evaluate_run(sft, out / "sft", configs.held_out, size, args.seed + 1)
    print(f"qlx demo: AEPO RL, {size.rl_steps} steps -> {out / 'rl'}")
    if not train_stage(rl, "RL"):
        return SIGTERM_EXIT_CODE
    print("qlx demo: evaluating after RL")
    after = evaluate_run(rl, out / "rl", configs.held_out, size, args.seed + 1)

    table = format_table(before, after)
    change = paired_change(before, after)
    lifted = change.low > 0
    plots = [*plot_run(out / "rl"), *plot_run(out / "sft"), plot_accuracy(before, after, out / "accuracy.png")]
    elapsed = time.perf_counter() - start
    results = {
        "size": dataclasses.asdict(size),
        "seed": args.seed,
        "before": {k: dataclasses.asdict(v) for k, v in before.by_task().items()}
        | {"all": dataclasses.asdict(before.overall())},
        "after": {k: dataclasses.asdict(v) for k, v in after.by_task().items()}
        | {"all": dataclasses.asdict(after.overall())},
        "change": dataclasses.asdict(change),
        "rl_lifts_accuracy": lifted,
        "seconds": elapsed,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(
        f"Held-out accuracy (%), exact match, mean of {size.eval_samples} samples per question at temperature "
        f"{rl.rollout.temperature}, top-p {rl.rollout.top_p}; [95% interval]"
    )
    print(table)
    print()
    verdict = "lifts" if lifted else "does NOT lift"
    print(
        f"RL {verdict} held-out accuracy beyond the 95% interval: change {100 * change.mean:+.1f} points "
        f"[{100 * change.low:+.1f}, {100 * change.high:+.1f}] (paired over {change.n} questions)."
    )
    print("plots: " + ", ".join(str(p) for p in plots))
    print(f"results: {out / 'results.json'}; {elapsed / 60:.1f} minutes")
    return 0
