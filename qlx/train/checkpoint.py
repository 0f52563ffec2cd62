"""The one checkpoint module: orbax, asynchronous, keep the last N, fall back past a corrupt latest checkpoint.

A checkpoint is one step folder ``DIR/<step>/`` with named items:

- one per pytree of arrays given to :meth:`Checkpointer.save` (the trainer saves ``params``, ``opt_state`` and
  ``extra``: AEPO state and RNG key data), written by orbax's StandardSave, sharded arrays shard by shard;
- ``meta``: JSON (the step, sampler and data-iterator state, counters) plus a fingerprint of each array item: per
  leaf, the shape, dtype, and the sum and sum of squares of its values.

Items can be restored alone (``restore_latest({"params": target})`` starts a new stage from the previous stage's
parameters without its optimizer state).

orbax writes a step into a temporary folder and renames it when complete, so a process killed while saving leaves no
step folder behind (its temporary folder is removed on the next start). A step folder that exists but cannot be read
back, or whose arrays do not match the fingerprint written at save time (a truncated or altered file), is reported,
moved aside to ``DIR/corrupt-<step>``, and the previous checkpoint is tried.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def _leaf_fingerprint(x) -> list:
    x = jnp.asarray(x)
    values = x.astype(jnp.float32)
    return [list(x.shape), str(x.dtype), float(jnp.sum(values)), float(jnp.sum(values * values))]


def fingerprint(tree) -> list:
    """Per leaf (in tree order): [shape, dtype, sum, sum of squares], the values summed in float32 on device."""
    return [_leaf_fingerprint(leaf) for leaf in jax.tree.leaves(tree)]


def _fingerprints_match(saved: list, restored: list) -> str | None:
    """None when they match; otherwise a description of the first leaf that does not."""
    if len(saved) != len(restored):
        return f"{len(restored)} arrays restored, {len(saved)} saved"
    for i, (a, b) in enumerate(zip(saved, restored, strict=True)):
        if a[:2] != b[:2]:
            return f"array {i}: shape/dtype {b[:2]} restored, {a[:2]} saved"
        for name, u, v in (("sum", a[2], b[2]), ("sum of squares", a[3], b[3])):
            if not np.isclose(u, v, rtol=1e-5, atol=1e-6, equal_nan=True):
                return f"array {i}: {name} {v!r} restored, {u!r} saved"
    return None


class Checkpointer:
    """Save and restore training state under ``directory`` (one folder per step).

    Args:
      directory: checkpoint folder (created if missing).
      keep: how many of the newest checkpoints to keep.
      async_save: write in a background thread; :meth:`wait` blocks until the pending write is on disk.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint folder not found")
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
        )
        self.read_only = read_only
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Complete checkpoints on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, items: dict[str, Any], meta: dict[str, Any]) -> None:
        """Start writing ``items`` ({name: pytree of arrays}) and ``meta`` (JSON-able) as checkpoint ``step``."""
        if "meta" in items:
            raise ValueError("'meta' is reserved for the JSON item; rename the array item")
        meta = {**meta, "step": int(step), "fingerprint": {name: fingerprint(tree) for name, tree in items.items()}}
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self._manager.save(int(step), args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True)

    def wait(self) -> None:
        """Block until the last save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _restore_step(self, step: int, targets: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        args = {
            name: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
            for name, target in targets.items()
        }
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
        meta = restored["meta"]
        if not isinstance(meta, dict) or "fingerprint" not in meta:
            raise CheckpointError("meta is missing or has no fingerprint")
        items = {name: restored[name] for name in targets}
        for name, tree in items.items():
            mismatch = _fingerprints_match(meta["fingerprint"].get(name, []), fingerprint(tree))
            if mismatch:
                raise CheckpointError(f"item {name!r} differs from what was saved ({mismatch})")
        return items, meta

    def restore_latest(self, targets: dict[str, Any]) -> tuple[int, dict[str, Any], dict] | None:
        """The newest checkpoint that restores cleanly, as (step, {name: pytree}, meta); None when there is none.

        ``targets`` maps item names to pytrees with the structure, shapes, dtypes and shardings to restore into
        (arrays, or ``jax.ShapeDtypeStruct`` with a sharding); only those items are read. A checkpoint that fails to
        restore or to match its fingerprint is reported as corrupt, moved to ``corrupt-<step>`` (left in place when
        read-only) and the previous one is tried.
        """
        for step in reversed(self.steps()):
            try:
                items, meta = self._restore_step(step, targets)
            except Exception as e:  # noqa: BLE001 -- any failure to read a checkpoint means it is unusable
                self._quarantine(step, e)
                continue
            return step, items, meta
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        source = self.directory / str(step)
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        if self.read_only:
            log.warning("checkpoint %s is corrupt or incomplete (%s); trying the previous checkpoint", source, reason)
            return
        destination = self.directory / f"corrupt-{step}"
        n = 1
        while destination.exists():
            n += 1
            destination = self.directory / f"corrupt-{step}.{n}"
        log.warning(
            "checkpoint %s is corrupt or incomplete (%s); moved to %s, trying the previous checkpoint",
            source,
            reason,
            destination,
        )
        shutil.move(str(source), str(destination))
        self._manager.reload()
