"""Streamed, resumable merges of Hugging Face Qwen3 / Qwen3-MoE checkpoints, one HF tensor at a time.

Every tensor the config defines (``qlx.models.hf.tensor_specs``) is merged on its own with
:func:`qlx.merge.methods.merge_flat`: each expert's ``gate_proj`` / ``up_proj`` / ``down_proj`` separately (as mergekit
<= 0.1.4 and FuseChat do), the router, norms, embeddings and lm_head like any other tensor. Inputs are read in blocks
with ``pread`` (the page cache holds the files, not the process), so host memory is one float32 copy of the largest
tensor (for a top-k), its output, and a few blocks per worker.

Output: sharded safetensors (``qlx.models.hf.plan_shards``), the index, the base's config.json (dtype updated) and
tokenizer / generation files, and ``merge-plan.json`` (method, parameters, inputs with file sizes and mtimes, the shard
layout). Each shard is written to ``<name>.partial`` and renamed when complete; a rerun with the same plan keeps the
shards already there and writes only the rest, with the same bytes (the merge is deterministic).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qlx.config import ARCHITECTURE_KEYS
from qlx.merge.methods import DEFAULT_BLOCK_SIZE, MergeError, MergeParams, merge_flat, merge_params
from qlx.models.hf import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    PICKLE_SUFFIXES,
    CheckpointError,
    check_tensors,
    config_from_hf,
    plan_shards,
    read_json,
    tensor_index,
    tensor_specs,
    write_index,
)
from qlx.models.safetensors_io import DTYPES, Reader, TensorInfo, TensorToWrite, read_header, write_file

log = logging.getLogger(__name__)

PLAN_FILE = "merge-plan.json"


@dataclasses.dataclass
class _Checkpoint:
    directory: Path
    infos: dict[str, TensorInfo]


EXPORTED = "exported.json"


def hf_folder(path, export_dir, role: str = "input") -> Path:
    """``path`` itself when it is a Hugging Face directory; for a qlx run folder (``config.yaml`` + checkpoints), its
    newest usable checkpoint's parameters exported once to ``export_dir`` (``qlx.save_hf``; ``exported.json`` marks
    a finished export, so a rerun reuses it and an interrupted one is redone)."""
    from qlx.models.checkpoint_io import is_run_folder, load_run_model

    path, export_dir = Path(path), Path(export_dir)
    if not is_run_folder(path):
        return path
    if not (export_dir / EXPORTED).is_file():
        from qlx.models.hf import save_hf

        log.info("exporting run folder %s to %s", path, export_dir)
        try:
            model = load_run_model(path)
        except (OSError, ValueError) as e:  # no usable checkpoint, a bad config.yaml (ConfigError names the key)
            raise MergeError(f"{role} {path}: a qlx run folder whose parameters cannot be read: {e}") from None
        save_hf(model, export_dir, overwrite=True)
        (export_dir / EXPORTED).write_text(json.dumps({"exported_from": str(path.resolve())}) + "\n")
    return export_dir


def _open_checkpoint(directory: Path, role: str, base_config=None):
    """(config.json dict, ModelConfig, checkpoint) of a Hugging Face directory, validated like ``load_hf``; with
    ``base_config``, a shape-defining config key that differs from the base's is refused first, by name."""
    if not directory.is_dir():
        raise MergeError(f"{role} {directory}: not a directory")
    try:
        hf_config = read_json(directory / "config.json")
        config = config_from_hf(hf_config, source=str(directory / "config.json"))
        for field in ARCHITECTURE_KEYS if base_config is not None else ():
            a, b = getattr(base_config, field), getattr(config, field)
            if a != b:
                raise MergeError(f"config {field} = {b!r} but the base has {a!r}; the checkpoints cannot be merged")
        infos = tensor_index(directory)
        check_tensors(tensor_specs(config), infos, config, Reader())
    except (CheckpointError, MergeError) as e:
        raise MergeError(f"{role} {directory}: {e}") from None
    return hf_config, config, _Checkpoint(directory, infos)


class _BlockReader:
    """Reads flat element ranges of safetensors tensors into fresh float32 arrays with ``preadv`` (thread-safe)."""

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def source(self, info: TensorInfo) -> Callable[[int, int], np.ndarray]:
        if info.file not in self._fds:
            self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        fd, dtype = self._fds[info.file], DTYPES[info.dtype]

        def read(start: int, stop: int) -> np.ndarray:
            array = np.empty(stop - start, dtype)
            view = memoryview(array.view(np.uint8))
            offset, done = info.start + start * dtype.itemsize, 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], offset + done)
                if got == 0:
                    raise MergeError(f"{info.file}: tensor {info.name} is truncated")
                done += got
            return array.astype(np.float32)

        return read

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@functools.cache
def _fixed_mmap_threshold() -> None:
    """Ask glibc to serve every allocation of 1 MiB or more with its own mmap (returned to the OS when freed).

    By default glibc raises that threshold up to 32 MiB after such frees, so the merge's 16-64 MiB block temporaries
    and tensor-sized outputs end up on the heap, whose fragmentation grew peak RSS to 3.4 GB (12.7x the largest
    tensor) on benchmarks/merge.py's 1 GB checkpoints; with a fixed threshold it is 0.6 GB. Process-wide, glibc only
    (a no-op elsewhere); it is the documented ``M_MMAP_THRESHOLD`` knob (= ``MALLOC_MMAP_THRESHOLD_``).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _input_record(checkpoint: _Checkpoint) -> dict:
    files = sorted({info.file for info in checkpoint.infos.values()})
    return {
        "path": str(checkpoint.directory.resolve()),
        "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
    }


def _in_order(compute: Sequence[Callable[[], np.ndarray]], executor: ThreadPoolExecutor | None, window: int):
    """Results of ``compute`` in order, at most ``window`` computed ahead on ``executor`` (inline without one)."""
    if executor is None:
        for job in compute:
            yield job()
        return
    pending = []
    for job in compute:
        pending.append(executor.submit(job))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


def merge_checkpoints(
    base,
    models: Sequence,
    out,
    *,
    method: str = "sce",
    dtype: str | None = None,
    workers: int = 1,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    block_size: int = DEFAULT_BLOCK_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    on_shard: Callable[[str], None] | None = None,
    inputs_dir=None,
    **params,
) -> Path:
    """Merge Hugging Face Qwen3 / Qwen3-MoE directories ``models`` onto ``base`` into ``out``, tensor by tensor.

    method / params: as :func:`qlx.merge.merge_tensor` (``select_topk``, ``variant`` for SCE; ``weights``,
    ``densities``, ``normalize``, ``lam``, ``rescale``, ``seed`` for the task-arithmetic family). DARE masks are seeded
    per tensor by (seed, crc32 of the tensor name, model index). dtype: output dtype ("float32", "bfloat16",
    "float16"; default: each tensor's base dtype). workers: tensors merged in parallel threads (memory grows with
    it). A config that differs in a shape-defining key, or a tensor that is missing, extra or mis-shaped, is refused
    by name. ``out`` may hold an interrupted merge with the same plan (it is resumed) or, with ``overwrite``,
    anything. ``on_shard(name)`` is called after each shard is complete. A qlx run folder among the inputs is first
    exported to a Hugging Face directory (:func:`hf_folder`) under ``inputs_dir`` (default ``<out>.inputs``) as
    ``base`` / ``model-<i>``.
    """
    out_dir = Path(out)
    exports = Path(inputs_dir) if inputs_dir is not None else out_dir.with_name(out_dir.name + ".inputs")
    base_dir = hf_folder(base, exports / "base", "base")
    model_dirs = [hf_folder(m, exports / f"model-{i}", f"models[{i}]") for i, m in enumerate(models)]
    if not model_dirs:
        raise MergeError("give at least one model to merge onto the base")
    if workers < 1:
        raise MergeError(f"workers = {workers}: must be >= 1")
    p: MergeParams = merge_params(method, len(model_dirs), **params)
    _fixed_mmap_threshold()
    for d in (base_dir, *model_dirs):
        if out_dir.resolve() == d.resolve():
            raise MergeError(f"--out {out_dir} is one of the inputs")
    hf_config, config, base_ckpt = _open_checkpoint(base_dir, "base")
    model_ckpts = []
    for m, d in enumerate(model_dirs):
        model_ckpts.append(_open_checkpoint(d, f"models[{m}]", config)[2])
    specs = tensor_specs(config)
    out_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    tensors = [
        TensorToWrite(s.name, out_dtype or DTYPES[base_ckpt.infos[s.name].dtype], s.hf_shape, produce=lambda: None)
        for s in specs
    ]
    shards = plan_shards(tensors, max_shard_bytes)
    plan = {
        "method": dataclasses.asdict(p),
        "dtype": dtype,
        "block_size": block_size,
        "base": _input_record(base_ckpt),
        "models": [_input_record(c) for c in model_ckpts],
        "shards": {name: [t.name for t in shard] for name, shard in shards},
    }
    plan = json.loads(json.dumps(plan))  # the form it is stored in (lists, not tuples), so reruns compare equal
    done = _prepare_output(out_dir, plan, shards, overwrite)

    per_tensor_input = {
        s.name: sum(c.infos[s.name].end - c.infos[s.name].start for c in (base_ckpt, *model_ckpts)) for s in specs
    }
    total = sum(per_tensor_input.values())
    skipped = sum(per_tensor_input[t.name] for name, shard in shards if name in done for t in shard)
    bar = tqdm(total=total, initial=skipped, unit="B", unit_scale=True, desc="merge", disable=not progress or None)
    reader = _BlockReader()
    executor = ThreadPoolExecutor(workers) if workers > 1 else None

    def job(t: TensorToWrite) -> Callable[[], np.ndarray]:
        def compute() -> np.ndarray:
            base_info = base_ckpt.infos[t.name]
            result = np.empty(int(np.prod(t.shape)), t.dtype)
            merge_flat(
                p,
                reader.source(base_info),
                [reader.source(c.infos[t.name]) for c in model_ckpts],
                result,
                block_size=block_size,
                key=(zlib.crc32(t.name.encode()),),
            )
            bar.update(per_tensor_input[t.name])
            return result.reshape(t.shape)

        return compute

    try:
        for name, shard in shards:
            if name in done:
                continue
            results: Iterator[np.ndarray] = _in_order([job(t) for t in shard], executor, workers)
            to_write = [dataclasses.replace(t, produce=lambda results=results: next(results)) for t in shard]
            partial = out_dir / (name + ".partial")
            write_file(partial, to_write, metadata={"format": "pt", "merge_method": p.method})
            os.replace(partial, out_dir / name)
            if on_shard is not None:
                on_shard(name)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
        reader.close()
        bar.close()
    write_index(out_dir, shards)
    out_config = dict(hf_config)
    if dtype is not None:
        out_config["dtype"] = dtype
        if "torch_dtype" in out_config:
            out_config["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
    for file in sorted(base_dir.iterdir()):
        skip = file.suffix in (".safetensors", *PICKLE_SUFFIXES) or file.name in ("config.json", INDEX_FILE, PLAN_FILE)
        if file.is_file() and not skip:
            shutil.copy2(file, out_dir / file.name)
    return out_dir


def _prepare_output(out_dir: Path, plan: dict, shards, overwrite: bool) -> set[str]:
    """Create ``out_dir`` and record the plan; the names of shards already complete for this same plan."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / PLAN_FILE
    existing = sorted(out_dir.glob("*.safetensors"))
    if plan_path.exists() and not overwrite:
        previous = json.loads(plan_path.read_text())
        changed = [k for k in plan if previous.get(k) != plan[k]]
        if changed:
            raise MergeError(
                f"--out {out_dir} holds a different merge ({PLAN_FILE}: {changed[0]!r} differs); choose another "
                "directory or pass overwrite"
            )
    elif existing and not overwrite:
        raise MergeError(
            f"--out {out_dir} already holds {existing[0].name}; choose another directory or pass overwrite"
        )
    elif overwrite:
        for file in (*existing, *out_dir.glob("*.partial"), *out_dir.glob(INDEX_FILE)):
            file.unlink()
    plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    done = set()
    for name, shard in shards:
        path = out_dir / name
        if path.exists():
            try:
                header = read_header(path)
            except ValueError:
                header = {}
            if [t.name for t in shard] == list(header) and all(
                header[t.name].shape == t.shape and DTYPES[header[t.name].dtype] == np.dtype(t.dtype) for t in shard
            ):
                done.add(name)
            else:
                path.unlink()
    return done
