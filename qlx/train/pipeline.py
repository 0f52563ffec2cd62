"""The recipe's stages as one resumable pipeline: full-context RL stages → memory-RL expert → SCE merge → last stage.

A pipeline file (YAML; ``configs/qwen3-30b-a3b/*-pipeline.yaml``)::

    run_dir: runs/recipe                    # every stage is a folder here
    base: checkpoints/Qwen3-30B-A3B-Thinking-2507   # Hugging Face folder: what "base" means below
    overrides: []                           # --set overrides applied to every training stage
    stages:
      - {name: stage1, config: stage1.yaml, init: base}     # a run config (paths relative to this file)
      - {name: stage3, config: stage3.yaml, init: stage2}
      - {name: memory, kind: memory_rl, config: memory.yaml, init: stage3}
      - {name: merge, kind: merge, base: base, models: [stage3, memory], method: sce, dtype: bfloat16,
         params: {select_topk: 1.0}}
      - {name: stage4, config: stage4.yaml, init: merge}

Stage kinds: ``train`` (the default: ``qlx.train.trainer.train`` on the run config with ``train.run_dir`` = the stage
folder and ``train.init_from`` = the ``init`` stage's output), ``merge`` (:func:`qlx.merge.merge_checkpoints`; qlx run
folders among its inputs are first exported to Hugging Face folders under ``<merge>/inputs/``) and ``memory_rl`` (the
memory-agent RL expert: the trainer on a run config with ``train.mode: memory``, e.g. ``configs/stages/memory.yaml``;
a train stage must not be in memory mode and a memory_rl stage must be, so the pipeline file says what each stage
trains).

Each stage folder holds its resolved config (``config.yaml``, written by the trainer for training stages, by the
pipeline for merges) and, once finished, ``stage-complete.json``. A rerun skips finished stages and continues an
interrupted one where it stopped (the trainer resumes from its last checkpoint; the merge from its finished shards).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import yaml

from qlx.config import load_config, memory_agent_config

log = logging.getLogger(__name__)

MARKER = "stage-complete.json"
KINDS = ("train", "memory_rl", "merge")


class PipelineError(ValueError):
    """A pipeline file is invalid or a stage cannot run; the message names the stage and key."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage.

    name: folder name under ``run_dir`` and how later stages refer to it. kind: ``train``, ``memory_rl`` or ``merge``.
    config: run config (train, memory_rl), relative to the pipeline file. init: ``"base"``, an earlier stage, or
    None (fresh weights). overrides: ``--set`` overrides for this stage. base / models / method / dtype / params: the
    merge's base (``"base"`` or a stage), the stages merged onto it, the method, output dtype, and method parameters.
    """

    name: str
    kind: str = "train"
    config: Path | None = None
    init: str | None = None
    overrides: tuple[str, ...] = ()
    base: str = "base"
    models: tuple[str, ...] = ()
    method: str = "sce"
    dtype: str | None = None
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A pipeline file: ``run_dir``, ``base`` (Hugging Face folder or None), common ``overrides``, ``stages``."""

    run_dir: Path
    base: Path | None
    overrides: tuple[str, ...]
    stages: tuple[Stage, ...]

    def __post_init__(self):
        seen = {"base"}
        for i, s in enumerate(self.stages):
            where = f"stages[{i}] ({s.name})"
            if s.name in seen:
                raise PipelineError(f"{where}: name {s.name!r} is used twice (or is the reserved 'base')")
            if s.kind not in KINDS:
                raise PipelineError(f"{where}: kind {s.kind!r}; valid: {', '.join(KINDS)}")
            refs = [s.init] if s.kind != "merge" else [s.base, *s.models]
            for ref in refs:
                if ref is not None and ref not in seen:
                    raise PipelineError(f"{where}: refers to {ref!r}, which is not 'base' or an earlier stage")
            if "base" in refs and self.base is None:
                raise PipelineError(f"{where}: uses 'base' but the pipeline has no base")
            if s.kind in ("train", "memory_rl") and s.config is None:
                raise PipelineError(f"{where}: a {s.kind} stage needs 'config' (a run config)")
            if s.kind == "merge" and not s.models:
                raise PipelineError(f"{where}: a merge stage needs 'models'")
            seen.add(s.name)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name


def load_pipeline(path: str | Path, overrides: tuple[str, ...] = ()) -> Pipeline:
    """Read a pipeline file; unknown keys and bad references are refused by name. ``overrides`` are added to the
    file's ``overrides`` (applied to every training stage)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PipelineError(f"{path}: {e}") from None
    unknown = sorted(set(data) - {"run_dir", "base", "overrides", "stages"})
    if unknown:
        raise PipelineError(f"{path}: unknown key {unknown[0]!r}")
    fields = {f.name for f in dataclasses.fields(Stage)}
    stages = []
    for i, entry in enumerate(data.get("stages") or []):
        bad = sorted(set(entry) - fields)
        if bad or "name" not in entry:
            raise PipelineError(f"{path}: stages[{i}]: " + (f"unknown key {bad[0]!r}" if bad else "missing 'name'"))
        entry = dict(entry)
        if entry.get("config") is not None:
            entry["config"] = path.parent / entry["config"]
        for key in ("overrides", "models"):
            entry[key] = tuple(entry.get(key) or ())
        stages.append(Stage(**entry))
    if not stages:
        raise PipelineError(f"{path}: no stages")
    base = data.get("base")
    return Pipeline(
        run_dir=Path(data.get("run_dir") or "runs/pipeline"),
        base=None if base is None else Path(base),
        overrides=(*tuple(data.get("overrides") or ()), *overrides),
        stages=tuple(stages),
    )


def is_done(pipeline: Pipeline, stage: Stage) -> bool:
    return (pipeline.stage_dir(stage.name) / MARKER).is_file()


def output_of(pipeline: Pipeline, name: str) -> Path:
    """What a stage hands on: a training stage's run folder, a merge's Hugging Face folder, or the base."""
    if name == "base":
        return pipeline.base
    stage = next(s for s in pipeline.stages if s.name == name)
    return pipeline.stage_dir(name) / "model" if stage.kind == "merge" else pipeline.stage_dir(name)


def stage_config(pipeline: Pipeline, stage: Stage):
    """The resolved run config of a training stage (its folder and initialisation set by the pipeline)."""
    overrides = [*pipeline.overrides, *stage.overrides, f"train.run_dir={pipeline.stage_dir(stage.name)}"]
    if stage.init is not None:
        overrides.append(f"train.init_from={output_of(pipeline, stage.init)}")
    config = load_config(stage.config, overrides)
    if (config.train.mode == "memory") != (stage.kind == "memory_rl"):
        want = "train.mode: memory" if stage.kind == "memory_rl" else "train.mode sft or rl (memory: kind memory_rl)"
        raise PipelineError(
            f"stage {stage.name} ({stage.kind}): {stage.config} has train.mode {config.train.mode!r}; want {want}"
        )
    return config


def plan(pipeline: Pipeline) -> list[dict]:
    """One row per stage: name, kind, status, init / inputs, data, input/output lengths, mesh (every config loaded
    and validated, nothing run)."""
    rows = []
    for s in pipeline.stages:
        status = "done" if is_done(pipeline, s) else "pending"
        row = {"stage": s.name, "kind": s.kind, "status": status, "init": "-", "data": "-", "in/out": "-", "mesh": "-"}
        if s.kind == "merge":
            inputs = ", ".join(s.models)
            row["init"] = f"{s.method}: base {s.base} + [{inputs}]"
            row["data"] = " ".join(f"{k}={v}" for k, v in {**s.params, "dtype": s.dtype}.items() if v is not None)
        else:
            c = stage_config(pipeline, s)
            m = c.mesh
            row.update(
                init=str(c.train.init_from or "fresh"),
                data=",".join(str(f) for f in c.data.train_files),
                mesh=f"data={m.data} fsdp={m.fsdp} expert={m.expert} tensor={m.tensor} seq={m.seq}",
            )
            row["in/out"] = f"{c.data.max_input_tokens}/{c.data.max_output_tokens}"
            if s.kind == "memory_rl":
                agent = memory_agent_config(c)
                row["in/out"] = f"chunk {agent.chunk_tokens}, memory {agent.memory_tokens}/{agent.final_tokens}"
            row["init"] += f" ({c.train.mode}, {c.train.steps} steps)"
        rows.append(row)
    return rows


def _finish(pipeline: Pipeline, stage: Stage, info: dict) -> None:
    (pipeline.stage_dir(stage.name) / MARKER).write_text(json.dumps({"stage": stage.name, **info}, indent=2) + "\n")


def _hf_input(pipeline: Pipeline, merge_stage: Stage, name: str) -> Path:
    """A Hugging Face folder for merge input ``name``: the base or a merge as is; a training stage's last checkpoint
    exported (once) to ``<merge>/inputs/<name>`` (:func:`qlx.merge.checkpoint.hf_folder`)."""
    from qlx.merge.checkpoint import hf_folder

    return hf_folder(output_of(pipeline, name), pipeline.stage_dir(merge_stage.name) / "inputs" / name, name)


def run_stage(pipeline: Pipeline, stage: Stage) -> None:
    """Run (or continue) one stage and mark it complete; PipelineError if it cannot finish."""
    folder = pipeline.stage_dir(stage.name)
    if stage.kind == "merge":
        from qlx.merge import merge_checkpoints

        folder.mkdir(parents=True, exist_ok=True)
        base = _hf_input(pipeline, stage, stage.base)
        models = [_hf_input(pipeline, stage, m) for m in stage.models]
        resolved = {"method": stage.method, "base": str(base), "models": [str(m) for m in models]}
        resolved.update(dtype=stage.dtype, params=stage.params)
        (folder / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        merge_checkpoints(base, models, folder / "model", method=stage.method, dtype=stage.dtype, **stage.params)
        _finish(pipeline, stage, {"kind": "merge", "output": str(folder / "model")})
        return
    from qlx.train.trainer import train

    result = train(stage_config(pipeline, stage))
    if result.status != "done":
        raise PipelineError(f"stage {stage.name}: training ended with status {result.status!r} at step {result.step}")
    _finish(pipeline, stage, {"kind": stage.kind, "step": result.step, "resumed_from": result.resumed_from})


def run_pipeline(pipeline: Pipeline) -> list[str]:
    """Run every unfinished stage in order; the names of the stages run now (finished ones are skipped)."""
    ran = []
    for stage in pipeline.stages:
        if is_done(pipeline, stage):
            log.info("stage %s: complete, skipped", stage.name)
            continue
        log.info("stage %s (%s): running", stage.name, stage.kind)
        run_stage(pipeline, stage)
        ran.append(stage.name)
    return ran
