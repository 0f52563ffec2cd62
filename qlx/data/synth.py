"""Synthesis: plan every record's question, then assemble contexts and write the records of this shard.

Planning is cheap and deterministic in the config alone: record ``k`` gets task type ``TASKS[k % len(TASKS)]``
(equal shares), a target length drawn log-uniformly from ``[min_tokens, max_tokens]``, and the first question of that
task type's candidate stream (seeded per draw) that fits the target and duplicates no earlier question. Every shard
plans all records, then materialises only ``k % shard_count == shard_index`` — so the records of ``n`` shards are
exactly those of one run. Materialising assembles the context (inline, or streamed to ``contexts/<id>.txt`` above
``inline_max_tokens``), maps the facts' spans into it, and keeps the record only if its answer re-derives from the
evidence (:mod:`qlx.data.derive`); otherwise the drop is counted in the card. Records then pass the run's filters
(:mod:`qlx.data.filter_chain`: test-set decontamination and model-based checks) batch by batch; rejected records go to
``rejects[-i-of-n].jsonl`` with their reason.
"""

import dataclasses
import io
import itertools
import math
import random
from pathlib import Path

import numpy as np

from qlx.data.assemble import ContextTooSmall, assemble_context
from qlx.data.card import CardBuilder
from qlx.data.derive import DerivationError, check_spans, derive
from qlx.data.docstore import DocStore
from qlx.data.engines.base import Candidate
from qlx.data.engines.dialogue import DialogueEngine, dialogue_pool
from qlx.data.engines.kg import KGEngine
from qlx.data.engines.mase import MaseEngine
from qlx.data.engines.mc import MCEngine
from qlx.data.engines.table import TableEngine
from qlx.data.filter_chain import FilterChain, FilterConfig, balance
from qlx.data.filters import AnswerFn, IsCorrect
from qlx.data.llm import ChatClient
from qlx.data.records import Record, context_spans
from qlx.data.sources import Source, corpus_source, world_source
from qlx.data.tokenizer import Tokenizer

ENGINE_TASKS = {
    "mix": ("mc", "multihop", "reading", "dialogue", "numerical"),
    "kg": ("multihop", "reading"),
    "table": ("numerical",),
    "mc": ("mc",),
    "dialogue": ("dialogue",),
    "mase": ("reading",),
}
MAX_TOKENS = 4 * 1024 * 1024


@dataclasses.dataclass
class SynthConfig:
    engine: str = "mix"
    n: int = 100
    min_tokens: int = 1024
    max_tokens: int = 8192
    seed: int = 0
    shard_index: int = 0
    shard_count: int = 1
    corpus: str | None = None
    n_orgs: int | None = None
    """world size; by default grown until the document pool covers ``max_tokens``."""
    brief: bool = False
    """world documents without filler sentences (short contexts for demos)."""
    max_hops: int = 4
    obfuscate_p: float = 0.3
    inline_max_tokens: int = 131072
    array_record: bool = False
    mase_rounds: int = 3
    mase_cluster_docs: int = 3
    max_attempts: int = 500
    task_types: tuple[str, ...] | None = None
    """a subset of the engine's task types to make (default: all of them, in equal shares)."""
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    """decontamination and model-based filters applied to the records (none by default)."""
    distractor_pool: int = 64
    """documents the robustness filter draws its extra distractors from."""

    def __post_init__(self):
        if self.engine not in ENGINE_TASKS:
            raise ValueError(f"engine {self.engine!r} is not one of {sorted(ENGINE_TASKS)}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not 64 <= self.min_tokens <= self.max_tokens <= MAX_TOKENS:
            raise ValueError(
                f"need 64 <= min_tokens ({self.min_tokens}) <= max_tokens ({self.max_tokens}) <= {MAX_TOKENS}"
            )
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard {self.shard_index}/{self.shard_count}: need 0 <= index < count")
        if not 0.0 <= self.obfuscate_p <= 1.0:
            raise ValueError(f"obfuscate_p must be in [0, 1], got {self.obfuscate_p}")
        if self.max_hops < 2:
            raise ValueError(f"max_hops must be >= 2, got {self.max_hops}")
        if self.distractor_pool < 1:
            raise ValueError(f"distractor_pool must be >= 1, got {self.distractor_pool}")
        if self.task_types is not None:
            self.task_types = tuple(self.task_types)
            unknown = set(self.task_types) - set(ENGINE_TASKS[self.engine])
            if not self.task_types or unknown:
                raise ValueError(
                    f"task_types {self.task_types} must be a non-empty subset of {ENGINE_TASKS[self.engine]}"
                )

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.task_types or ENGINE_TASKS[self.engine]


@dataclasses.dataclass
class Plan:
    index: int
    task_type: str
    target_tokens: int
    candidate: Candidate | None = None
    cluster: list[str] | None = None
    """engine ``mase``: the documents the proposer reads."""


class Synthesizer:
    """The source (world or corpus), its document pools and the engines of one config; :meth:`plan` then
    :meth:`materialize` per plan."""

    def __init__(
        self, config: SynthConfig, tokenizer: Tokenizer, workdir: str | Path, *, client: ChatClient | None = None
    ):
        self.config, self.tokenizer = config, tokenizer
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        pool = int(1.25 * config.max_tokens) + 20_000
        if config.corpus:
            self.source: Source = corpus_source(config.corpus, tokenizer, workdir, client=client)
        else:
            self.source = world_source(
                config.seed, tokenizer, workdir, min_pool_tokens=pool, n_orgs=config.n_orgs, brief=config.brief
            )
        if self.source.docs.total_tokens < config.max_tokens:
            raise ValueError(
                f"the document pool has {self.source.docs.total_tokens} tokens, fewer than --max-tokens "
                f"{config.max_tokens}: use a larger corpus or world (--n-orgs), or a smaller --max-tokens"
            )
        self.engines = self._engines(client)
        self.dialogue: DocStore | None = None
        if "dialogue" in config.tasks:
            self.dialogue = DocStore(workdir / f"dialogue-{config.seed}.docs", tokenizer)
            exchanges = dialogue_pool(config.seed)
            while self.dialogue.added_tokens < pool:
                self.dialogue.add(itertools.islice(exchanges, 2048))
            self.dialogue.close()

    def _engines(self, client) -> dict:
        source, config, engines = self.source, self.config, {}
        needs = set(config.tasks)
        kg = KGEngine(source.kg, max_hops=config.max_hops, obfuscate_p=config.obfuscate_p) if source.kg else None
        table = TableEngine(source.sql) if source.sql.views else None
        if config.engine == "mase":
            if client is None:
                raise ValueError("engine 'mase' needs an LLM endpoint (QLX_LLM_URL, QLX_LLM_MODEL)")
            return {"reading": MaseEngine(client, rounds=config.mase_rounds)}
        if needs & {"multihop", "reading", "mc"} and kg is None:
            raise ValueError("this engine needs a knowledge graph: use the world generator, or an LLM to extract facts")
        if "numerical" in needs and table is None:
            raise ValueError("engine needs numeric tables; the source has none")
        engines.update(multihop=kg, reading=kg, numerical=table)
        if "mc" in needs:
            engines["mc"] = MCEngine(kg, table, source.confusable)
        if "dialogue" in needs:
            engines["dialogue"] = DialogueEngine(source.places, self.tokenizer.count_batch)
        return engines

    def _target(self, index: int) -> int:
        lo, hi = math.log(self.config.min_tokens), math.log(self.config.max_tokens)
        return int(round(math.exp(random.Random(f"{self.config.seed}:target:{index}").uniform(lo, hi))))

    def plan(self) -> list[Plan]:
        """The plan of every record (all shards), deterministic in the config."""
        config, plans, seen = self.config, [], set()
        draws = dict.fromkeys(config.tasks, 0)
        for index in range(config.n):
            task_type = config.tasks[index % len(config.tasks)]
            target = self._target(index)
            if config.engine == "mase":
                plans.append(Plan(index, task_type, target, cluster=self._cluster(index, target)))
                continue
            engine = self.engines[task_type]
            store = self.dialogue if task_type == "dialogue" else self.source.docs
            for _ in range(config.max_attempts):
                rng = random.Random(f"{config.seed}:{task_type}:{draws[task_type]}")
                draws[task_type] += 1
                candidate = engine.propose(rng, task_type, cost=store.tokens, budget=target)
                if candidate is not None and candidate.key() not in seen:
                    seen.add(candidate.key())
                    plans.append(Plan(index, task_type, target, candidate))
                    break
            else:
                raise RuntimeError(
                    f"no new {task_type!r} question fits {target} tokens after {config.max_attempts} draws; "
                    "raise --min-tokens or lower --n"
                )
        return plans

    def _cluster(self, index: int, target: int) -> list[str]:
        store = self.source.docs
        rng = np.random.default_rng([self.config.seed, index, 11])
        order = rng.permutation(len(store))
        cluster, spent = [], 0
        for i in order:
            cost = int(store.token_counts[i])
            if spent + cost <= target // 2:
                cluster.append(store.doc_ids[i])
                spent += cost
            if len(cluster) == self.config.mase_cluster_docs:
                break
        if not cluster:
            raise RuntimeError(f"record {index}: no document fits half of the {target}-token target")
        return cluster

    def distractor_texts(self) -> list[str]:
        """``distractor_pool`` documents of the source, the same in every shard (for the robustness filter)."""
        store = self.source.docs
        rng = np.random.default_rng([self.config.seed, 13])
        picks = rng.choice(len(store), min(self.config.distractor_pool, len(store)), replace=False)
        return [store.text(int(i)) for i in sorted(picks)]

    def record_id(self, index: int, part: int | None = None) -> str:
        base = f"{self.config.engine}-{self.config.seed}-{index:07d}"
        return base if part is None else f"{base}-{part}"

    def _confusers(self, candidate: Candidate) -> list[str]:
        names = {f.subject for f in candidate.facts} | {f.object for f in candidate.facts}
        out = []
        for name in sorted(names):
            for twin in self.source.confusable.get(name, ()):
                out += self.source.docs_about.get(twin, [])
        return out[:32]

    def materialize(self, plan: Plan, out_dir: str | Path, card: CardBuilder) -> list[Record]:
        """The records of one plan (several for ``mase``); drops are counted in ``card``."""
        if plan.cluster is not None:
            return self._materialize_mase(plan, out_dir, card)
        candidate = plan.candidate
        record = self._assemble(plan, candidate, out_dir, self.record_id(plan.index), card)
        return [] if record is None else [record]

    def _assemble(self, plan: Plan, candidate: Candidate, out_dir, record_id: str, card: CardBuilder) -> Record | None:
        config = self.config
        store = self.dialogue if candidate.task_type == "dialogue" else self.source.docs
        rng = np.random.default_rng([config.seed, plan.index, 7])
        inline = plan.target_tokens <= config.inline_max_tokens
        rel_path = f"contexts/{record_id}.txt"
        if not inline:
            (Path(out_dir) / "contexts").mkdir(parents=True, exist_ok=True)
        sink = io.BytesIO() if inline else open(Path(out_dir) / rel_path, "wb")  # noqa: SIM115
        try:
            assembly = assemble_context(
                store, candidate.evidence, plan.target_tokens, rng, sink, confusers=self._confusers(candidate)
            )
        except ContextTooSmall as e:
            card.drop("context_too_small", f"{record_id}: {e}")
            return None
        finally:
            if not inline:
                sink.close()
        where = {p.doc_id: p for p in assembly.placements}
        facts = []
        for f in candidate.facts:
            p = where[f.doc_id]
            fact = {"subject": f.subject, "relation": f.relation, "object": f.object, "doc_id": f.doc_id}
            fact.update(char_start=p.char_start + f.start, char_end=p.char_start + f.end, qualifiers=dict(f.qualifiers))
            facts.append(fact)
        evidence = {"docs": [dataclasses.asdict(p) for p in assembly.placements], "facts": facts}
        evidence["program"] = candidate.program
        source = {"engine": config.engine, "paradigm": candidate.paradigm, "index": plan.index}
        source.update(origin=self.source.origin, target_tokens=plan.target_tokens)
        record = Record(
            id=record_id,
            task_type=candidate.task_type,
            question=candidate.question,
            answer=candidate.answer,
            answer_type=candidate.answer_type,
            evidence=evidence,
            hops=candidate.hops,
            length_tokens=assembly.length_tokens,
            source=source,
            options=candidate.options,
            context=sink.getvalue().decode("utf-8") if inline else None,
            context_ref=None if inline else {"path": rel_path, "chars": assembly.length_chars},
        )
        try:
            check_spans(facts, context_spans(record, out_dir, [(f["char_start"], f["char_end"]) for f in facts]))
            derived = derive(candidate.program, facts, candidate.options)
            if derived is not None and derived != record.answer:
                raise DerivationError(f"evidence gives {derived!r}, the record says {record.answer!r}")
        except DerivationError as e:
            card.drop("not_derivable", f"{record_id}: {e}")
            return None
        return record

    def _materialize_mase(self, plan: Plan, out_dir, card: CardBuilder) -> list[Record]:
        store = self.source.docs
        documents = "\n\n".join(store.text(store.index(d)) for d in plan.cluster)
        validated, problems = self.engines["reading"].run(documents, seed=self.config.seed * 100003 + plan.index)
        for problem in problems:
            card.drop("mase_round_rejected", f"{self.record_id(plan.index)}: {problem}")
        records = []
        for qa in validated:
            program = {"op": "llm_verified", "solver_answer": qa.solver_answer, "round": qa.round}
            candidate = Candidate(
                "reading", qa.question, qa.answer, "text", len(plan.cluster), [], program, list(plan.cluster), "mase"
            )
            record = self._assemble(plan, candidate, out_dir, self.record_id(plan.index, qa.round), card)
            if record is not None:
                records.append(record)
        return records


def default_tokenizer(seed: int = 0) -> Tokenizer:
    """A small byte-level BPE (vocabulary 4096) trained on the documents of a 40-organisation world of ``seed``."""
    from qlx.data.render import render_world
    from qlx.data.tokenizer import train_bpe_tokenizer
    from qlx.data.world import generate_world

    return train_bpe_tokenizer((d.text for d in render_world(generate_world(seed, 40))), vocab_size=4096)


def shard_stem(name: str, config: SynthConfig) -> str:
    if config.shard_count == 1:
        return name
    return f"{name}-{config.shard_index:05d}-of-{config.shard_count:05d}"


def synthesize(
    config: SynthConfig,
    out_dir: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    client: ChatClient | None = None,
    answer_fn: AnswerFn | None = None,
    is_correct: IsCorrect | None = None,
    progress: bool = True,
) -> dict:
    """Write this shard's records (``records[-i-of-n].jsonl``, optionally ``.array_record``) and its card into
    ``out_dir``; returns the card. Without ``tokenizer``, :func:`default_tokenizer` is used and saved there.
    ``answer_fn`` and ``is_correct`` serve the model-based filters of ``config.filters`` (see
    :mod:`qlx.data.filters`); filtered runs also write ``rejects[-i-of-n].jsonl``, and an unsharded run with the
    ``difficulty`` filter is then balanced (:func:`qlx.data.filter_chain.balance`)."""
    import shutil
    import tempfile

    from tqdm import tqdm

    from qlx.data.card import write_card

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = default_tokenizer(config.seed)
        if config.shard_index == 0:
            tokenizer.save(out)
    workdir = Path(tempfile.mkdtemp(prefix="qlx-synth-", dir=out))
    card = CardBuilder({**dataclasses.asdict(config), "tokenizer_vocab": tokenizer.vocab_size})
    stem = shard_stem("records", config)
    try:
        synth = Synthesizer(config, tokenizer, workdir, client=client)
        if synth.source.problems:
            card.problems += synth.source.problems
            card.dropped["source_problems"] = len(synth.source.problems)
        fc, chain, rejects = config.filters, None, None
        if fc.active:
            distractors = synth.distractor_texts() if "robustness" in fc.model else ()
            chain = FilterChain(
                fc, answer_fn=answer_fn, is_correct=is_correct, distractors=distractors, seed=config.seed, base_dir=out
            )
        plans = [p for p in synth.plan() if p.index % config.shard_count == config.shard_index]
        writer = open(out / f"{stem}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        if chain is not None:
            rejects = open(out / f"{shard_stem('rejects', config)}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        array_writer = None
        if config.array_record:
            from array_record.python.array_record_module import ArrayRecordWriter

            array_writer = ArrayRecordWriter(str(out / f"{stem}.array_record"), "group_size:1")

        def flush(batch: list[Record]) -> None:
            for record in batch if chain is None else chain.apply(batch, card, rejects):
                line = record.to_json()
                writer.write(line + "\n")
                if array_writer is not None:
                    array_writer.write(line.encode("utf-8"))
                card.add(record)
            batch.clear()

        try:
            label = f"synth {config.engine} {config.shard_index}/{config.shard_count}"
            pending: list[Record] = []
            for plan in tqdm(plans, desc=label, unit="rec", disable=not progress):
                pending += synth.materialize(plan, out, card)
                if len(pending) >= fc.batch:
                    flush(pending)
            flush(pending)
        finally:
            writer.close()
            if rejects is not None:
                rejects.close()
            if array_writer is not None:
                array_writer.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = card.card()
    write_card(result, out, shard_stem("card", config))
    if "difficulty" in fc.model and config.shard_count == 1:
        balance(out, n_bins=fc.bins, per_bin=fc.per_bin, seed=config.seed)
    return result
