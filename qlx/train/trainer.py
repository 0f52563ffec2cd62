"""The training loop shared by SFT and RL: set-up, resume, steps, checkpoints, metrics, progress, stops.

``train(config)`` runs ``config.train.mode`` in ``config.train.run_dir``:

1. checks the config, data files and tokenizer (:func:`qlx.train.preflight.preflight`) before any compute;
2. builds the mesh and the model's abstract state; resumes from the newest good checkpoint of the run folder if
   there is one, else starts from ``train.init_from`` (a previous stage's run, a Hugging Face folder) or fresh
   weights. Checkpoints that no longer fit the config (shapes, tree structure, optimizer state), or a run folder
   whose every checkpoint failed its integrity check, stop the run here with an error naming what differs, unless
   ``train.restart`` allows starting over;
3. runs steps up to ``train.steps``: each writes its metrics (JSONL + TensorBoard) and advances the progress bar;
   a step with a non-finite loss or gradient is skipped with its reason logged, and ``train.max_nonfinite_steps`` of
   those in a row stop the run;
4. checkpoints every ``train.checkpoint_every`` steps, after the last step, and on SIGTERM (then exits).

All randomness is a function of (seed, step) and the checkpointed state, so a run killed at any moment and started
again with the same command finishes with the same parameters, bit for bit, as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from qlx.config import Config, ConfigError, to_dict
from qlx.mesh import axis_rules, make_mesh
from qlx.models import build_model, load_hf, state_shardings
from qlx.models.sharding import Layout
from qlx.train.checkpoint import Checkpointer, CheckpointError, CheckpointMismatch, NoUsableCheckpoint
from qlx.train.metrics import MetricsWriter
from qlx.train.optim import make_optimizer
from qlx.train.preflight import ARCHITECTURE_KEYS, preflight
from qlx.train.step import Policy

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 143


class TrainingStopped(RuntimeError):
    """The run stopped before its last step (non-finite steps in a row)."""


@dataclasses.dataclass
class TrainResult:
    """How a call to :func:`train` ended.

    step: the last completed step. status: "done", "sigterm" (checkpointed, then stopped) or "stopped".
    run_dir: the run folder. resumed_from: the checkpoint step the run resumed from (None: started fresh).
    """

    step: int
    status: str
    run_dir: Path
    resumed_from: int | None = None


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _abstract_model(config: Config, mesh, rules):
    """(policy, abstract params with shardings, rest): the model's structure without allocating its weights."""
    model = nnx.eval_shape(lambda: build_model(config.model, seed=config.seed, mesh=mesh, rules=rules))
    policy, params, rest = Policy.split(model)
    if jax.tree.leaves(rest):
        rest = Policy.split(build_model(config.model, seed=config.seed, mesh=mesh, rules=rules))[2]
    return policy, _with_shardings(params, state_shardings(params, mesh, rules)), rest


def _opt_state_shardings(optimizer, params, mesh):
    """Shardings of ``optimizer.init(params)``: a leaf that mirrors a parameter (Adam's moments: same key path
    suffix and shape) takes that parameter's sharding, every other leaf is replicated on the mesh. (XLA gives the
    ``zeros_like`` moments of a jitted init no sharding of their own: they would be replicated on every device.)"""
    by_path = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree.leaves_with_path(params)}

    def one(path, leaf):
        for start in range(len(path)):
            param = by_path.get(jax.tree_util.keystr(path[start:]))
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map_with_path(one, jax.eval_shape(optimizer.init, params))


def _initial_params(config: Config, mesh, rules, abstract_params):
    """Parameters a fresh run starts from: ``train.init_from`` or a new random initialisation."""
    source = config.train.init_from
    if source is None:
        return Policy.split(build_model(config.model, seed=config.seed, mesh=mesh, rules=rules))[1]
    path = Path(source)
    if (path / "config.json").is_file():
        hf = load_hf(path, dtype=config.model.param_dtype, mesh=mesh, scan_layers=config.model.scan_layers)
        hf_params = Policy.split(hf)[1]
        shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
        return jax.device_put(hf_params, shardings)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    try:
        restored = Checkpointer(folder, read_only=True).restore_latest({"params": abstract_params})
    except CheckpointError as e:
        raise ConfigError("train.init_from", str(e)) from None
    if restored is None:
        raise ConfigError("train.init_from", f"no checkpoint in {folder}")
    step, items, _ = restored
    log.info("starting from %s step %d", folder, step)
    return items["params"]


def load_model(config: Config, source: str | Path):
    """The model of ``config`` with the parameters of ``source``: a qlx run or checkpoint folder (its newest good
    checkpoint) or a Hugging Face folder, placed on the config's mesh."""
    mesh = make_mesh(config.mesh)
    rules = axis_rules(config.mesh.rules)
    policy, abstract_params, rest = _abstract_model(config, mesh, rules)
    params = _initial_params(
        dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=str(source))),
        mesh,
        rules,
        abstract_params,
    )
    return policy.model(params, rest)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config_changes(old: dict, new: dict) -> list[str]:
    """One line per dotted config key whose value differs between two config dicts (``to_dict`` form)."""
    a, b = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
    missing = "(not set)"
    return [
        f"{key}: {a.get(key, missing)!r} then, {b.get(key, missing)!r} now"
        for key in sorted(a.keys() | b.keys())
        if a.get(key, missing) != b.get(key, missing)
    ]


def _mismatch_error(error: CheckpointMismatch, config: Config, run_dir: Path) -> ConfigError:
    """The error for a run folder whose checkpoints do not fit the config: what differs and the ways out."""
    old = error.meta.get("config")
    if old is None and (run_dir / "config.yaml").is_file():
        old = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    changes = _config_changes(old, to_dict(config)) if old else []
    if changes:
        changed = f" Config keys changed since it was saved: {'; '.join(changes)}."
    else:
        changed = (
            " No config key differs from the one it was saved with: the layout changed with the code." if old else ""
        )
    return ConfigError(
        "train.run_dir",
        f"{error}.{changed} Nothing was trained and nothing on disk was changed. Ways out: put this run in a new "
        f"train.run_dir (with train.init_from={run_dir} to start from these parameters, if the model's shapes are "
        "unchanged); or set train.restart=true to move these checkpoints aside (checkpoints/superseded-<step>) and "
        "start over from step 0 here.",
    )


def _restore(config: Config, checkpointer: Checkpointer, targets: dict, run_dir: Path):
    """The run folder's newest good checkpoint (see ``Checkpointer.restore_latest``), None to start from step 0.

    Checkpoints that do not fit the config, or a folder whose every checkpoint is corrupt, stop the run with a
    ConfigError before any training, unless ``train.restart`` is set: then the run starts over (and says so)."""
    try:
        return checkpointer.restore_latest(targets)
    except CheckpointMismatch as e:
        if not config.train.restart:
            raise _mismatch_error(e, config, run_dir) from None
        checkpointer.set_aside_all(f"does not fit this config (train.restart=true; {e.differences[0]})")
    except NoUsableCheckpoint as e:
        if not config.train.restart:
            raise ConfigError(
                "train.restart",
                f"{e}. Refusing to start over: put the good files back, or set train.restart=true to start from "
                "step 0 in this run folder.",
            ) from None
    log.warning("train.restart=true: starting %s over from step 0", run_dir)
    return None


def _primary() -> bool:
    """Whether this is the process that writes the run folder's shared files (config, status, metrics)."""
    return jax.process_index() == 0


def _metrics_dir(run_dir: Path) -> Path:
    """The run folder on the primary process; ``run_dir/processes/<k>`` on process k > 0 of a multi-host run (its
    own throughput and timing; the losses are the same on every process)."""
    return run_dir if _primary() else run_dir / "processes" / str(jax.process_index())


def _write_config(config: Config, run_dir: Path) -> None:
    if not _primary():
        return
    path = run_dir / "config.yaml"
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    if path.is_file() and path.read_text() != text:
        old = yaml.safe_load(path.read_text()) or {}
        changed = [
            key for key in ("model", *ARCHITECTURE_KEYS) if key in old and old.get(key) != to_dict(config).get(key)
        ]
        if changed:
            log.warning("the config differs from the one this run folder was started with (%s)", ", ".join(changed))
    path.write_text(text)


def _write_status(run_dir: Path, step: int, status: str) -> None:
    if not _primary():
        return
    (run_dir / "status.json").write_text(json.dumps({"step": step, "status": status}))


class _SigtermFlag:
    """Set by SIGTERM; the loop checkpoints after the current step and exits."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _make_job(config: Config, dataset, policy: Policy, rest, optimizer, layout: Layout, run_dir: Path, shardings):
    """The mode's step logic. A job has ``extra_state()`` (arrays to checkpoint), ``meta()`` (JSON state),
    ``load(extra, meta)``, ``begin(params)`` (once, on a fresh start) and ``step(step, params, opt_state)`` ->
    (params, opt_state, metrics, skipped reason or None)."""
    if config.train.mode == "sft":
        from qlx.train.sft import SFTJob

        return SFTJob(config, dataset, policy, rest, optimizer, layout, shardings=shardings)
    if config.train.mode == "memory":
        from qlx.train.memory_rl import MemoryRLJob

        return MemoryRLJob(config, dataset, policy, rest, optimizer, layout, run_dir=run_dir, shardings=shardings)
    from qlx.train.rl import RLJob

    return RLJob(config, dataset, policy, rest, optimizer, layout, run_dir=run_dir, shardings=shardings)


def train(config: Config, dataset=None) -> TrainResult:
    """Run (or resume) the training described by ``config``; see the module docstring.

    ``dataset`` replaces the examples built from ``config.data`` (which preflight still checks): any object with
    the ``qlx.train.inputs.Dataset`` interface, e.g. prompts and targets built by the caller (``qlx demo --memory``
    trains the memory agent's warm start on its turns this way)."""
    prepared = preflight(config)
    run_dir = Path(config.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(config.mesh)
    rules = axis_rules(config.mesh.rules)
    layout = Layout.create(mesh, rules)
    optimizer = make_optimizer(config.train.optimizer)
    policy, abstract_params, rest = _abstract_model(config, mesh, rules)
    checkpointer = Checkpointer(
        run_dir / "checkpoints", keep=config.train.keep_checkpoints, async_save=config.train.async_checkpointing
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    rng = jax.device_put(jax.random.key_data(jax.random.key(config.seed)), replicated)
    opt_shardings = _opt_state_shardings(optimizer, abstract_params, mesh)
    param_shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
    shardings = (param_shardings, opt_shardings, replicated)
    dataset = prepared.dataset if dataset is None else dataset
    job = _make_job(config, dataset, policy, rest, optimizer, layout, run_dir, shardings)

    def extra_items() -> dict:
        """The rng and the job's arrays, replicated over the mesh (orbax writes only global arrays with several
        processes)."""
        return jax.device_put(jax.tree.map(np.asarray, {"rng": rng, **job.extra_state()}), replicated)

    targets = {
        "params": abstract_params,
        "opt_state": _with_shardings(jax.eval_shape(optimizer.init, abstract_params), opt_shardings),
        "extra": extra_items(),
    }
    try:
        restored = _restore(config, checkpointer, targets, run_dir)
    except ConfigError:
        checkpointer.close()
        raise
    if restored is not None:
        start, items, meta = restored
        params, opt_state = items["params"], items["opt_state"]
        rng = items["extra"].pop("rng")
        job.load(items["extra"], meta)
        streak = int(meta.get("nonfinite_streak", 0))
        log.info("resuming %s from step %d", run_dir, start)
    else:
        start, streak = 0, 0
        params = _initial_params(config, mesh, rules, abstract_params)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
        job.begin(params)
    _write_config(config, run_dir)
    writer = MetricsWriter(_metrics_dir(run_dir), resume_step=start)

    def save(step: int) -> None:
        items = {"params": params, "opt_state": opt_state, "extra": extra_items()}
        checkpointer.save(step, items, {**job.meta(), "nonfinite_streak": streak, "config": to_dict(config)})

    status, step = "done", start
    bar = tqdm(
        total=config.train.steps,
        initial=start,
        desc=f"{config.train.mode} {run_dir.name}",
        disable=not config.train.progress,
        dynamic_ncols=True,
    )
    try:
        with _SigtermFlag() as sigterm:
            for step in range(start + 1, config.train.steps + 1):
                params, opt_state, metrics, skipped = job.step(step, params, opt_state)
                streak = streak + 1 if skipped else 0
                metrics["skipped"] = int(bool(skipped))
                writer.write(step, metrics)
                bar.update(1)
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "reward/mean", "entropy") if k in metrics})
                if skipped:
                    log.warning("step %d skipped: %s (%d in a row)", step, skipped, streak)
                    if streak >= config.train.max_nonfinite_steps:
                        _write_status(run_dir, step, "stopped")
                        raise TrainingStopped(
                            f"stopping: {streak} steps in a row had a non-finite loss or gradient (last: {skipped}); "
                            f"the last checkpoint before them is in {checkpointer.directory}. Lower "
                            f"train.optimizer.learning_rate or check the data."
                        )
                if sigterm.raised:
                    save(step)
                    checkpointer.wait()
                    status = "sigterm"
                    log.warning("SIGTERM: saved step %d to %s, exiting", step, checkpointer.directory)
                    break
                if step % config.train.checkpoint_every == 0 or step == config.train.steps:
                    save(step)
    finally:
        bar.close()
        writer.close()
        checkpointer.close()
    _write_status(run_dir, step, status)
    return TrainResult(step=step, status=status, run_dir=run_dir, resumed_from=start if restored else None)
