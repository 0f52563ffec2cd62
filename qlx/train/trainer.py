"""The training loop shared by SFT and RL: set-up, resume, steps, checkpoints, metrics, progress, stops.

``train(config)`` runs ``config.train.mode`` in ``config.train.run_dir``:

1. checks the config, data files and tokenizer (:func:`qlx.train.preflight.preflight`) before any compute;
2. builds the mesh and the model's abstract state; resumes from the newest good checkpoint of the run folder if
   there is one, else starts from ``train.init_from`` (a previous stage's run, a Hugging Face folder) or fresh
   weights;
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
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from qlx.config import Config, to_dict
from qlx.mesh import axis_rules, make_mesh
from qlx.models import build_model, load_hf, state_shardings
from qlx.models.sharding import Layout
from qlx.train.checkpoint import Checkpointer, CheckpointError
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
        hf_params = Policy.split(load_hf(path, dtype=config.model.param_dtype, mesh=mesh))[1]
        shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
        return jax.device_put(hf_params, shardings)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    restored = Checkpointer(folder, read_only=True).restore_latest({"params": abstract_params})
    if restored is None:
        raise CheckpointError(f"train.init_from: no usable checkpoint in {folder}")
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


def _write_config(config: Config, run_dir: Path) -> None:
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
    from qlx.train.rl import RLJob

    return RLJob(config, dataset, policy, rest, optimizer, layout, run_dir=run_dir, shardings=shardings)


def train(config: Config) -> TrainResult:
    """Run (or resume) the training described by ``config``; see the module docstring."""
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
    job = _make_job(config, prepared.dataset, policy, rest, optimizer, layout, run_dir, shardings)
    targets = {
        "params": abstract_params,
        "opt_state": _with_shardings(jax.eval_shape(optimizer.init, abstract_params), opt_shardings),
        "extra": {"rng": rng, **job.extra_state()},
    }
    restored = checkpointer.restore_latest(targets)
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
    writer = MetricsWriter(run_dir, resume_step=start)

    def save(step: int) -> None:
        items = {"params": params, "opt_state": opt_state, "extra": {"rng": rng, **job.extra_state()}}
        checkpointer.save(step, items, {**job.meta(), "nonfinite_streak": streak})

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
