"""Writing checkpoints: orbax, asynchronous, keep the last N, checksummed, corrupt steps set aside.

The format and every restore check are in :mod:`qlx.models.checkpoint_io` (serving reads run folders through it too);
:class:`Checkpointer` adds saving to its :class:`~qlx.models.checkpoint_io.CheckpointReader`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from qlx.models.checkpoint_io import (
    CheckpointError,
    CheckpointMismatch,
    CheckpointReader,
    CorruptCheckpoint,
    NoUsableCheckpoint,
    array_records,
    checksum,
    layout_differences,
    meta_digest,
)

__all__ = [
    "CheckpointError",
    "CheckpointMismatch",
    "Checkpointer",
    "CorruptCheckpoint",
    "NoUsableCheckpoint",
    "array_records",
    "checksum",
    "layout_differences",
]


class Checkpointer(CheckpointReader):
    """Save and restore training state under ``directory`` (one folder per step).

    Args:
      directory: checkpoint folder (created if missing).
      keep: how many of the newest checkpoints to keep.
      async_save: write in a background thread; :meth:`wait` blocks until the pending write is on disk.
      read_only: never create, clean up or move anything (corrupt steps are reported and left in place).
    """

    def save(self, step: int, items: dict[str, Any], meta: dict[str, Any]) -> None:
        """Start writing ``items`` ({name: pytree of arrays}) and ``meta`` (JSON-able) as checkpoint ``step``.

        The checksums are computed before this returns (on device; two words per array reach the host)."""
        if "meta" in items:
            raise ValueError("'meta' is reserved for the JSON item; rename the array item")
        meta = {**meta, "step": int(step), "arrays": {name: array_records(tree) for name, tree in items.items()}}
        meta = json.loads(json.dumps(meta))  # the form it is read back in (string keys), so the digest matches
        meta["digest"] = meta_digest(meta)
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self._manager.save(int(step), args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True)

    def wait(self) -> None:
        """Block until the last save is complete on disk."""
        self._manager.wait_until_finished()

    def set_aside_all(self, why: str) -> list[Path]:
        """Move every step to ``superseded-<step>``, logging each with ``why``; the folders they went to."""
        return [self._set_aside(step, "superseded", why) for step in self.steps()]
