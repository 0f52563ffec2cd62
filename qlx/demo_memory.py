"""``qlx demo --memory``: the memory agent learns to read documents several times longer than its chunk, on a CPU.

0. the base model: the full-context demo's trained model (``qlx demo``, default folder runs/demo; run first when
   that folder holds no finished demo), as the recipe trains its memory expert from the Stage-3 model. A fresh tiny
   model (``--base none``) does not learn to copy facts in this budget (BUILD_NOTES.md, "Memory-agent demo");
1. synthesise one-fact (reading) and two-fact (multihop) questions over the synthetic world with their whole
   contexts (distractor documents kept), at the trained length L and, held out, at 2L and 4L (``qlx.data.demo_data``),
   in the base's tokenizer;
2. warm-start the base with SFT on every agent turn of the training records, each target the ideal one
   (``qlx.memory.warm_start``: memory = the evidence seen so far; final = the answer);
3. evaluate the agent (``qlx.memory.run``) on the held-out questions; memory-agent RL (``train.mode: memory``);
   evaluate again: accuracy before / after RL with 95% intervals and the paired change, accuracy by document
   length (L, 2L, 4L), and the baseline: the same model reading the document truncated to one window
   (``max_chunks: 1``: one update turn on the document's centre-truncated first and last C/2 tokens, then the answer);
   and, at L, all three by where the evidence ends (the third of the document's chunks that holds the last fact,
   ``qlx.memory.evidence_position``);
4. write ``accuracy.png``, the training curves and ``results.json``.

Every stage resumes (the trainer's checkpoints); data are rebuilt only when the size or seed changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from qlx.demo import CONFIGS, train_stage

LENGTHS = (1, 2, 4)  # evaluated document lengths, in multiples of the trained length


@dataclasses.dataclass(frozen=True)
class MemoryDemoSize:
    """How much data, training and evaluation the memory demo runs.

    n_train, n_eval: training questions and held-out questions per evaluated length.
    context_tokens: trained document length L (contexts of L/2 to L tokens, i.e. 4-8 chunks of
        ``memory.chunk_tokens``); held-out sets at 2L and 4L read 8-16 and 16-32 chunks.
    sft_steps, rl_steps: optimizer steps of the warm start (batches of agent turns) and of RL.
    rl_batch: questions per RL step. eval_batch: questions per ``qlx.memory.run`` call of the evaluation.
    task_types: the task types synthesised (equal shares).
    """

    n_train: int = 2000
    n_eval: int = 100
    context_tokens: int = 512
    sft_steps: int = 900
    rl_steps: int = 24
    rl_batch: int = 4
    eval_batch: int = 100
    task_types: tuple[str, ...] = ("reading", "multihop")


FULL = MemoryDemoSize()
QUICK = MemoryDemoSize(n_train=12, n_eval=4, context_tokens=192, sft_steps=2, rl_steps=1, rl_batch=2, eval_batch=8)


def _data_paths(folder: Path) -> dict[str, Path]:
    paths = {"train": folder / "train.jsonl", "tokenizer": folder / "tokenizer.json"}
    return paths | {f"eval_{m}x": folder / f"eval_{m}x.jsonl" for m in LENGTHS}


def _write_data(
    folder: Path, size: MemoryDemoSize, seed: int, max_question_tokens: int, tokenizer_path: Path | None
) -> dict[str, Path]:
    """Training records (length L), held-out records at each of ``LENGTHS`` and the tokenizer (the one at
    ``tokenizer_path``, or the world-trained one of the demo data when None; rebuilt when that file changes), under
    ``folder``; held-out questions never repeat a training question; questions longer than ``max_question_tokens``
    are dropped (the agent's room for the question)."""
    from qlx.data.demo_data import make_demo_dataset
    from qlx.data.records import write_jsonl
    from qlx.data.tokenizer import load_tokenizer

    paths = _data_paths(folder)
    base_tokenizer = None if tokenizer_path is None else hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
    wanted = json.dumps({**dataclasses.asdict(size), "seed": seed, "max_question_tokens": max_question_tokens,
                         "tokenizer_sha256": base_tokenizer})  # fmt: skip
    stamp = folder / "size.json"
    if stamp.is_file() and stamp.read_text() == wanted and all(p.is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, train = None if tokenizer_path is None else load_tokenizer(tokenizer_path), []
    for m in LENGTHS:
        records, held_out, tokenizer = make_demo_dataset(
            seed=seed,
            n_train=size.n_train,
            n_eval=size.n_eval,
            max_context_tokens=m * size.context_tokens,
            tokenizer=tokenizer,
            task_types=size.task_types,
        )
        fits = [r for r in records + held_out if len(tokenizer.encode(r.question)) <= max_question_tokens]
        if m == 1:
            train = [r for r in fits if r in records]
        seen = {r.question for r in train}
        write_jsonl([r for r in fits if r in held_out and r.question not in seen], paths[f"eval_{m}x"])
    write_jsonl(train, paths["train"])
    tokenizer.save(folder)
    stamp.write_text(wanted)
    return paths


def _base_model(base: Path, args) -> int:
    """Make sure ``base`` holds a finished full-context demo (its ``results.json``), running ``qlx demo`` into it
    (same seed, size and overrides) when it does not. Returns the full demo's exit code (0 when reused)."""
    if (base / "results.json").is_file():
        print(f"qlx demo --memory: base model: the full-context demo in {base}")
        return 0
    from qlx.demo import run as run_full_demo

    print(f"qlx demo --memory: base model: no finished full-context demo in {base}; running `qlx demo` into it first")
    return run_full_demo(argparse.Namespace(**{**vars(args), "out": str(base), "memory": False}))


class TurnDataset:
    """The warm start's examples for ``qlx.train.train``: every agent turn of the training records with its ideal
    target (``qlx.memory.warm_start.warm_start_turns``), in the ``qlx.train.inputs.Dataset`` interface SFT uses."""

    def __init__(self, dataset, agent):
        from qlx.data.prompts import question_parts
        from qlx.memory.warm_start import warm_start_turns
        from qlx.train.inputs import target_text

        self.builder = dataset.builder
        tokenizer = dataset.builder.tokenizer
        self.turns = [
            turn
            for record, folder in zip(dataset.records, dataset.folders, strict=True)
            for turn in warm_start_turns(
                record,
                tokenizer,
                agent,
                question_parts(record.question, record.options),
                target_text(record),
                stop_id=tokenizer.eos_id,
                base_dir=folder,
            )
        ]

    def __len__(self) -> int:
        return len(self.turns)

    def prompt(self, i: int) -> list[int]:
        return self.turns[i].prompt

    def target(self, i: int) -> list[int]:
        return self.turns[i].target


def agent_accuracy(model, tokenizer, records, agent, *, seed: int, batch: int):
    """Exact-match accuracy of the memory agent on ``records`` (one sample each): ``qlx.train.evaluate.EvalResult``."""
    from qlx.data.prompts import question_parts
    from qlx.memory import run
    from qlx.train.evaluate import EvalResult, exact_score

    scores = []
    for start in range(0, len(records), batch):
        part = records[start : start + batch]
        out = run(
            model,
            tokenizer,
            [question_parts(r.question, r.options) for r in part],
            [tokenizer.encode(r.context) for r in part],
            agent,
            seed=seed + start,
        )
        scores += [exact_score(r, answer) for r, answer in zip(part, out.answers, strict=True)]
    return EvalResult(scores=np.asarray(scores, np.float64), task_types=[r.task_type for r in records])


def plot_memory_demo(before, after, by_length: dict, by_position: dict, path: Path) -> Path:
    """Three panels: accuracy before / after RL per task type; the agent and the truncated baseline by document
    length; the same at the trained length by where the evidence ends (``by_position``: {series: {position:
    Interval}}); 95% interval whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax, groups, series, width=0.38):
        for k, (label, intervals, color) in enumerate(series):
            shift = (k - (len(series) - 1) / 2) * width
            means = [100 * i.mean for i in intervals]
            errors = [[100 * (i.mean - i.low) for i in intervals], [100 * (i.high - i.mean) for i in intervals]]
            ax.bar([x + shift for x in range(len(groups))], means, width, yerr=errors, capsize=3, color=color,
                   label=label)  # fmt: skip
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()

    fig, (left, right, third) = plt.subplots(1, 3, figsize=(16, 4), dpi=110)
    tasks = [*before.by_task(), "all"]
    bars(left, tasks, [(name, [*r.by_task().values(), r.overall()], color) for name, r, color in
                       (("warm start", before, "tab:gray"), ("after RL", after, "tab:blue"))])  # fmt: skip
    left.set_title("memory agent, trained length: before / after RL")
    labels = list(by_length)
    agent, truncated = ([by_length[k][j].overall() for k in labels] for j in (0, 1))
    bars(right, labels, [("memory agent", agent, "tab:blue"), ("truncated to one window", truncated, "tab:orange")])
    right.set_title("after RL, by document length")
    positions = list(by_position["after RL"])
    bars(third, positions, [(name, [by_position[name][k] for k in positions], color) for name, color in
                            (("after RL", "tab:blue"), ("truncated to one window", "tab:orange"))])  # fmt: skip
    third.set_title("trained length, by where the evidence ends")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run(args) -> int:
    from qlx.config import ConfigError, load_config, memory_agent_config
    from qlx.data.records import read_jsonl
    from qlx.data.tokenizer import load_tokenizer
    from qlx.memory.evidence import NO_POSITION, POSITIONS, evidence_position
    from qlx.train.evaluate import EvalResult, format_table, paired_change
    from qlx.train.plot import plot_run
    from qlx.train.preflight import preflight
    from qlx.train.trainer import SIGTERM_EXIT_CODE, load_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    size = QUICK if args.quick else FULL
    out = Path(args.out or "runs/demo-memory")
    start = time.perf_counter()
    print(f"qlx demo --memory: task set ({size.n_train} training questions, {size.n_eval} held out per length) "
          f"-> {out / 'data'}")  # fmt: skip
    base = None if args.base == "none" else Path(args.base or "runs/demo")
    if base is not None and (code := _base_model(base, args)) != 0:
        return code
    paths = _data_paths(out / "data")
    common = [
        f"data.train_files=[{paths['train']}]",
        f"data.tokenizer={paths['tokenizer']}",
        f"data.task_types=[{','.join(size.task_types)}]",
        f"seed={args.seed}",
        *args.overrides,
    ]
    try:
        sft = load_config(
            CONFIGS / "demo/memory_sft.yaml",
            [
                *common,
                f"train.run_dir={out / 'sft'}",
                f"train.steps={size.sft_steps}",
                *([] if base is None else [f"train.init_from={base / 'rl'}"]),
            ],
        )
        rl = load_config(
            CONFIGS / "demo/memory.yaml",
            [
                *common,
                f"train.run_dir={out / 'rl'}",
                f"train.init_from={out / 'sft'}",
                f"train.steps={size.rl_steps}",
                f"train.batch_size={size.rl_batch}",
            ],
        )
        agent = memory_agent_config(rl)
        _write_data(out / "data", size, args.seed, agent.max_question_tokens,
                    None if base is None else base / "data" / "tokenizer.json")  # fmt: skip
        turns = TurnDataset(preflight(sft).dataset, agent)
    except ConfigError as e:
        print(f"qlx demo --memory: config error: {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(paths["tokenizer"])
    held_out = {m: list(read_jsonl(paths[f"eval_{m}x"])) for m in LENGTHS}
    truncated = dataclasses.replace(agent, max_chunks=1)
    c = agent.chunk_tokens

    def evaluate(run_dir, m, config=agent):
        return agent_accuracy(load_model(rl, run_dir), tokenizer, held_out[m], config, seed=args.seed + 1,
                              batch=size.eval_batch)  # fmt: skip

    timings = {}
    clock = time.perf_counter()
    print(f"qlx demo --memory: SFT warm start on {len(turns)} agent turns, {size.sft_steps} steps -> {out / 'sft'}")
    if not train_stage(sft, "the SFT warm start", dataset=turns):
        return SIGTERM_EXIT_CODE
    timings["sft"] = time.perf_counter() - clock
    clock = time.perf_counter()
    print(f"qlx demo --memory: evaluating the warm start on {len(held_out[1])} held-out questions")
    before = evaluate(out / "sft", 1)
    timings["eval_before"] = time.perf_counter() - clock
    clock = time.perf_counter()
    print(f"qlx demo --memory: memory-agent RL, {size.rl_steps} steps -> {out / 'rl'}")
    if not train_stage(rl, "memory-agent RL"):
        return SIGTERM_EXIT_CODE
    timings["rl"] = time.perf_counter() - clock
    clock = time.perf_counter()
    print("qlx demo --memory: evaluating after RL at 1x, 2x and 4x the trained length, and the truncated baseline")
    after = evaluate(out / "rl", 1)
    by_length = {}
    for m in LENGTHS:
        agent_m = after if m == 1 else evaluate(out / "rl", m)
        by_length[f"{m}x ({m * size.context_tokens // 2}-{m * size.context_tokens} tok)"] = (
            agent_m,
            evaluate(out / "rl", m, truncated),
        )
    timings["eval_after"] = time.perf_counter() - clock

    position_of = [evidence_position(r, tokenizer, agent) for r in held_out[1]]
    order = [k for k in (*POSITIONS, NO_POSITION) if k in position_of]
    truncated_1x = next(iter(by_length.values()))[1]
    by_position = {}  # {series: {position: Interval}}, positions in ``order``
    for name, result in (("before RL", before), ("after RL", after), ("truncated to one window", truncated_1x)):
        table = EvalResult(result.scores, position_of).by_task()
        by_position[name] = {k: table[k] for k in order}
    change = paired_change(before, after)
    first, last = next(iter(by_length.values()))[0].overall(), list(by_length.values())[-1][0].overall()
    vs_baseline = paired_change(truncated_1x, after)
    targets = {
        "rl_lift_beyond_interval": bool(change.low > 0),
        "4x_within_10_points_of_1x": bool(abs(last.mean - first.mean) <= 0.10),
        "beats_truncated_baseline_beyond_interval": bool(vs_baseline.low > 0),
    }
    accuracy_png = plot_memory_demo(before, after, by_length, by_position, out / "accuracy.png")
    plots = [*plot_run(out / "rl"), *plot_run(out / "sft"), accuracy_png]
    elapsed = time.perf_counter() - start
    results = {
        "size": dataclasses.asdict(size),
        "seed": args.seed,
        "base": None if base is None else str(base),
        "chunk_tokens": c,
        "before": {k: dataclasses.asdict(v) for k, v in before.by_task().items()}
        | {"all": dataclasses.asdict(before.overall())},
        "after": {k: dataclasses.asdict(v) for k, v in after.by_task().items()}
        | {"all": dataclasses.asdict(after.overall())},
        "change": dataclasses.asdict(change),
        "by_length": {
            k: {"agent": dataclasses.asdict(a.overall()), "truncated": dataclasses.asdict(b.overall())}
            for k, (a, b) in by_length.items()
        },
        "by_evidence_position_1x": {
            name: {k: dataclasses.asdict(v) for k, v in table.items()} for name, table in by_position.items()
        },
        "agent_minus_truncated_1x": dataclasses.asdict(vs_baseline),
        "targets": targets,
        "seconds": elapsed,
        "stage_seconds": timings,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(
        f"Held-out accuracy (%) of the memory agent (chunks of {c} tokens, documents of "
        f"{size.context_tokens // 2}-{size.context_tokens} tokens), exact match, one sample per question at "
        f"temperature {agent.temperature}, top-p {agent.top_p}; [95% interval]"
    )
    print(format_table(before, after))
    print()
    print("After RL, by document length        memory agent           truncated to one window")
    for label, (a, b) in by_length.items():
        print(f"  {label:<34} {a.overall()!s:<22} {b.overall()}")
    print()
    print("Trained length, by where the evidence ends   before RL              after RL               truncated")
    for k in order:
        label = f"{k} ({by_position['after RL'][k].n} questions)"
        print(f"  {label:<42} " + " ".join(f"{by_position[name][k]!s:<22}" for name in by_position))
    print()
    verdict = {True: "yes", False: "NO"}
    print(f"RL lift beyond the 95% interval: {verdict[targets['rl_lift_beyond_interval']]} "
          f"({100 * change.mean:+.1f} points [{100 * change.low:+.1f}, {100 * change.high:+.1f}], paired)")  # fmt: skip
    print(f"4x length within 10 points of 1x: {verdict[targets['4x_within_10_points_of_1x']]} "
          f"({100 * (last.mean - first.mean):+.1f} points)")  # fmt: skip
    print(f"agent beats the truncated baseline beyond the interval: "
          f"{verdict[targets['beats_truncated_baseline_beyond_interval']]} ({100 * vs_baseline.mean:+.1f} points "
          f"[{100 * vs_baseline.low:+.1f}, {100 * vs_baseline.high:+.1f}], paired, 1x)")  # fmt: skip
    print("plots: " + ", ".join(str(p) for p in plots))
    print(f"results: {out / 'results.json'}; {elapsed / 60:.1f} minutes")
    return 0
