"""Reading qlx checkpoints (what serving and training share), and the format they are written in.

A checkpoint is one step folder ``DIR/<step>/`` with named items (``qlx.train.checkpoint.Checkpointer`` writes them):

- one per pytree of arrays (the trainer saves ``params``, ``opt_state`` and ``extra``: AEPO state and RNG key data),
  written by orbax's StandardSave, sharded arrays shard by shard;
- ``meta``: JSON (the step, sampler and data-iterator state, counters, the resolved config) plus ``arrays``: per item
  and leaf (dotted path), the shape, dtype and :func:`checksum` of its values at save time, and ``digest``, the
  BLAKE2b of all of the above, so a changed byte in the JSON itself is found too.

Items can be restored alone (``restore_latest({"params": target})`` starts a new stage from the previous stage's
parameters without its optimizer state; :func:`load_run_model` serves a run folder's newest parameters).

Restoring a step takes three checks, in this order:

1. the JSON item is read and its digest checked (no array data read yet);
2. the structure, shapes and dtypes recorded there are compared with the targets: a difference means the run's config
   no longer fits the checkpoint, not that the checkpoint is bad, so :class:`CheckpointMismatch` is raised naming each
   differing leaf, and nothing on disk is touched;
3. the arrays are read and their checksums compared with the recorded ones.

Only a step that fails 1 or 3 (unreadable, truncated, a flipped bit) counts as corrupt: it is moved to
``DIR/corrupt-<step>`` with a warning naming the step, the reason and the new place, and the previous step is tried.
When steps existed but none passed, :class:`NoUsableCheckpoint` lists each with its reason. orbax writes a step into
a temporary folder and renames it when complete, so a process killed while saving leaves no step folder behind (its
temporary folder is removed on the next start).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from qlx.models.stacking import match_layout, tree_is_scanned

log = logging.getLogger(__name__)

MAX_LISTED = 8
"""How many differing leaves a mismatch message lists before saying how many more there are."""


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected."""


class CorruptCheckpoint(CheckpointError):
    """A step's data failed to read or to match what was recorded when it was saved."""


class NoUsableCheckpoint(CheckpointError):
    """Every checkpoint on disk was corrupt (each has been reported and, unless read-only, moved aside)."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint's recorded structure, shapes or dtypes differ from the targets (a changed config).

    step: the checkpoint. differences: one line per differing leaf (dotted path). meta: its JSON item (holds the
    resolved config it was saved with under ``config``, when the trainer wrote it).
    """

    def __init__(self, directory: Path, step: int, differences: list[str], meta: dict):
        self.step, self.differences, self.meta = step, differences, meta
        listed = "; ".join(differences[:MAX_LISTED])
        more = f"; and {len(differences) - MAX_LISTED} more" if len(differences) > MAX_LISTED else ""
        super().__init__(f"checkpoint {directory / str(step)} does not fit: {listed}{more}")


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that spreads every input bit over the output."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x):
    """The array's bits as uint32 words (8-byte items become 2 words; 1- and 2-byte items are zero-extended)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


_SEEDS = (0x243F6A88, 0x85A308D3)


@jax.jit
def _checksum_lanes(x):
    """uint32[2]: the two lanes of :func:`checksum` (positions wrap at 2**32 words)."""
    w = _words(x)
    position = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(w.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, w.shape, dim) * jnp.uint32(stride)
        stride = (stride * w.shape[dim]) % 2**32
    return jnp.stack(
        [
            jnp.sum(_fmix32(w + _fmix32(position * jnp.uint32(0x9E3779B9) + jnp.uint32(s))), dtype=jnp.uint32)
            for s in _SEEDS
        ]
    )


def checksum(x) -> str:
    """A 64-bit checksum of an array's bytes and their positions, as 16 hex digits; the same on any sharding.

    Per lane ``s`` (two): ``sum_i fmix32(w_i + fmix32(i * 0x9E3779B9 + seed_s)) mod 2**32`` over the array's bits as
    uint32 words ``w_i`` at flat position ``i``. For a fixed position the term is a bijection of the word, so changing
    any one word (any single flipped bit) always changes both lanes; random damage to several words goes unnoticed with
    probability about 2**-64 (it guards against damage, not forgery: it is not a cryptographic hash). The sum is
    order-free, so XLA computes it where the shards live (each device its part, then an all-reduce of two words):
    nothing is gathered on one host, every process gets the same value, and a checkpoint saved on one mesh verifies
    when restored onto another. With several processes it is a collective: every process calls it
    for the same arrays in the same order (as :meth:`Checkpointer.save` and restores do).
    """
    x = jnp.asarray(x)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    lanes = _checksum_lanes(x)
    if lanes.is_fully_replicated:
        lanes = np.asarray(lanes.addressable_data(0))
    else:
        lanes = np.asarray(multihost_utils.process_allgather(lanes, tiled=True))
    return "".join(f"{int(v):08x}" for v in lanes)


def _path(keys) -> str:
    return jax.tree_util.keystr(keys, simple=True, separator=".")


def _layout(tree) -> dict[str, tuple[list[int], str]]:
    """{dotted path: (shape, dtype)} of the leaves of a pytree of arrays or ShapeDtypeStructs, in tree order."""
    out = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = _path(keys)
        if path in out:
            raise ValueError(f"two leaves share the path {path!r}; rename one")
        out[path] = (list(leaf.shape), str(np.dtype(leaf.dtype)))
    return out


def array_records(tree) -> dict[str, dict]:
    """{dotted path: {"shape", "dtype", "checksum"}} for every leaf of ``tree`` (what a checkpoint records)."""
    layout = _layout(tree)
    sums = [checksum(leaf) for leaf in jax.tree.leaves(tree)]
    return {
        path: {"shape": shape, "dtype": dtype, "checksum": value}
        for (path, (shape, dtype)), value in zip(layout.items(), sums, strict=True)
    }


def meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.blake2b(json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), digest_size=16).hexdigest()


def layout_differences(name: str, recorded: dict[str, dict], target) -> list[str]:
    """One line per leaf of item ``name`` whose path, shape or dtype differs between a checkpoint and a target."""
    wanted = _layout(target)
    lines = []
    for path, (shape, dtype) in wanted.items():
        key = f"{name}.{path}" if path else name
        saved = recorded.get(path)
        if saved is None:
            lines.append(f"{key}: {dtype}{shape} in this config, absent from the checkpoint")
        elif (saved["shape"], saved["dtype"]) != (shape, dtype):
            lines.append(f"{key}: {dtype}{shape} in this config, {saved['dtype']}{saved['shape']} in the checkpoint")
    for path, saved in recorded.items():
        if path not in wanted:
            key = f"{name}.{path}" if path else name
            lines.append(f"{key}: {saved['dtype']}{saved['shape']} in the checkpoint, absent from this config")
    return lines


def _recorded_tree(records: dict[str, dict]) -> dict:
    """The nested-dict form of a checkpoint's recorded leaves ({dotted path: record}), ShapeDtypeStruct leaves."""
    tree: dict = {}
    for path, record in records.items():
        *parents, leaf = path.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jax.ShapeDtypeStruct(tuple(record["shape"]), np.dtype(record["dtype"]))
    return tree


def _in_saved_layout(abstract, records: dict[str, dict]):
    """``abstract`` (a target of ShapeDtypeStructs) in the layer layout of the checkpoint recorded as ``records``;
    unchanged when they agree, or when the target's layers cannot be arranged so (then the layout check names the
    leaves that differ)."""
    try:
        return match_layout(abstract, _recorded_tree(records))
    except (KeyError, IndexError, ValueError, TypeError):
        return abstract


def _in_target_layout(tree, target):
    """``tree`` (restored in the checkpoint's layer layout) in ``target``'s layout, tree types and shardings.

    Converted leaf by leaf (stacking or slicing one parameter's layers), then placed where the target's leaf is."""
    if tree_is_scanned(tree) == tree_is_scanned(target):
        return tree
    flat, treedef = jax.tree_util.tree_flatten_with_path(jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
    converted = {
        _path(keys): leaf for keys, leaf in jax.tree_util.tree_flatten_with_path(match_layout(tree, target))[0]
    }

    def place(keys, want):
        leaf = converted[_path(keys)]
        return leaf if want.sharding is None else jax.device_put(leaf, want.sharding)

    return treedef.unflatten([place(keys, want) for keys, want in flat])


class CheckpointReader:
    """Restore checkpoints under ``directory`` (one folder per step); the trainer's ``Checkpointer`` adds saving.

    Args:
      directory: checkpoint folder (created if missing, unless read-only).
      keep: how many of the newest checkpoints to keep (when a subclass saves).
      async_save: write in a background thread (when a subclass saves).
      read_only: never create, clean up or move anything (corrupt steps are reported and left in place).
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

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _read_meta(self, step: int) -> dict:
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 -- an unreadable JSON item is a corrupt step, whatever the error
            raise CorruptCheckpoint(f"its JSON item cannot be read ({_first_line(e)})") from e
        if not isinstance(meta, dict) or "arrays" not in meta or "digest" not in meta:
            raise CorruptCheckpoint("its JSON item has no checksums (missing, or written by an older qlx)")
        if meta["digest"] != meta_digest(meta):
            raise CorruptCheckpoint("its JSON item does not match its digest (changed after it was written)")
        return meta

    def _restore_step(self, step: int, targets: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        """Items ``targets`` of ``step`` after the three checks (module docstring), read in the layer layout they
        were saved in (:func:`qlx.models.stacking.match_layout`: a checkpoint of an unrolled model restores into a
        scanned one and back) and returned in the targets' layout and shardings. Differences are named by the
        checkpoint's leaf paths."""
        meta = self._read_meta(step)
        differences, asked = [], {}
        for name, target in targets.items():
            if name not in meta["arrays"]:
                differences.append(f"{name}: in this config, absent from the checkpoint")
                continue
            asked[name] = _in_saved_layout(jax.tree.map(ocp.utils.to_shape_dtype_struct, target), meta["arrays"][name])
            differences += layout_differences(name, meta["arrays"][name], asked[name])
        if differences:
            raise CheckpointMismatch(self.directory, step, differences, meta)
        args = {name: ocp.args.StandardRestore(tree) for name, tree in asked.items()}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 -- the layout matched, so a failure to read is damaged data
            raise CorruptCheckpoint(f"its arrays cannot be read ({_first_line(e)})") from e
        items = {name: restored[name] for name in targets}
        for name, tree in items.items():
            for path, record in array_records(tree).items():
                saved = meta["arrays"][name][path]["checksum"]
                if record["checksum"] != saved:
                    key = f"{name}.{path}" if path else name
                    raise CorruptCheckpoint(f"{key}: checksum {record['checksum']} read back, {saved} when saved")
        return {name: _in_target_layout(tree, targets[name]) for name, tree in items.items()}, meta

    def restore_latest(self, targets: dict[str, Any]) -> tuple[int, dict[str, Any], dict] | None:
        """The newest checkpoint that passes its checks, as (step, {name: pytree}, meta); None when there is none.

        ``targets`` maps item names to pytrees with the structure, shapes, dtypes and shardings to restore into
        (arrays, or ``jax.ShapeDtypeStruct`` with a sharding); only those items are read. Raises
        :class:`CheckpointMismatch` (touching nothing) when a checkpoint's layout differs from ``targets``; a corrupt
        step is reported, moved to ``corrupt-<step>`` (left in place when read-only) and the previous one tried;
        :class:`NoUsableCheckpoint` when steps existed and all were corrupt.
        """
        failures = []
        steps = self.steps()
        for step in reversed(steps):
            try:
                items, meta = self._restore_step(step, targets)
            except CorruptCheckpoint as e:
                moved = self._set_aside(step, "corrupt", f"is corrupt: {e}")
                failures.append(f"step {step}: {e} ({f'moved to {moved}' if moved else 'left in place'})")
                continue
            return step, items, meta
        if failures:
            raise NoUsableCheckpoint(f"no usable checkpoint in {self.directory}: " + "; ".join(failures))
        return None

    def _set_aside(self, step: int, prefix: str, why: str) -> Path | None:
        """Move step folder ``step`` to ``<prefix>-<step>`` (``.2``, ``.3``... when taken) with a warning saying
        which step, ``why`` and where it went; the new folder (None when read-only: then it stays in place)."""
        source = self.directory / str(step)
        if self.read_only:
            log.warning("checkpoint step %d (%s) %s; left in place (read-only)", step, source, why)
            return None
        destination = self.directory / f"{prefix}-{step}"
        n = 1
        while destination.exists():
            n += 1
            destination = self.directory / f"{prefix}-{step}.{n}"
        if jax.process_index() == 0:
            shutil.move(str(source), str(destination))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"qlx checkpoint set aside {step}")
        self._manager.reload()
        log.warning("checkpoint step %d (%s) %s; moved to %s", step, source, why, destination)
        return destination


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def is_run_folder(path: Path) -> bool:
    """A qlx run folder: ``config.yaml`` (and no Hugging Face ``config.json``)."""
    return (path / "config.yaml").is_file() and not (path / "config.json").is_file()


def load_run_model(path: str | Path):
    """The model of a qlx run folder: ``config.yaml``'s ``model`` with the newest usable checkpoint's ``params``
    (from ``checkpoints/``, or the folder itself when it holds the step folders). Read-only: a corrupt step is
    reported and skipped, never moved. FileNotFoundError when there is no usable checkpoint."""
    from flax import nnx

    from qlx.config import load_config
    from qlx.models.qwen3 import build_model

    path = Path(path)
    config = load_config(path / "config.yaml")
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: build_model(config.model)), nnx.Param, ...)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    restored = CheckpointReader(folder, read_only=True).restore_latest({"params": params})
    if restored is None:
        raise FileNotFoundError(f"{path}: no usable checkpoint in {folder}")
    step, items, _ = restored
    log.info("restored %s step %d", folder, step)
    return nnx.merge(graphdef, items["params"], rest)
