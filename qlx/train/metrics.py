"""The one metrics writer: every step's scalars to TensorBoard event files and to a JSONL file.

``RUN/metrics.jsonl`` holds one JSON object per step, ``{"step": 12, "reward/mean": 0.41, ...}``;
``RUN/tensorboard/`` holds the same scalars as TensorBoard events. A resumed run first drops the records past the
step it resumes from (they belong to the lost tail of the killed run), so each step appears once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The step records of a run, in file order. A torn last line (a run killed mid-write) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a qlx run folder?")
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON object: {line[:80]!r}") from None
    return records


def _plain(value) -> float | int | bool:
    if isinstance(value, bool | int):
        return value
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricsWriter:
    """Append per-step scalars to ``RUN/metrics.jsonl`` and ``RUN/tensorboard/``.

    Args:
      run_dir: the run folder.
      resume_step: the step the run resumes from; records with a larger step are removed first (None: keep all).
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge, flush_secs=10)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` (name -> number) for ``step``; non-finite values are kept as strings in JSONL."""
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(name, float(value), global_step=int(step))

    def close(self) -> None:
        self._file.close()
        self._tb.close()
