"""Metrics writer (JSONL + TensorBoard), resume truncation, and `qlx plot`."""

import json
import struct

import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event

from qlx.cli import main
from qlx.train.metrics import MetricsWriter, read_metrics
from qlx.train.plot import plot_run


def _records(rng, steps):
    return [
        {
            "reward/mean": float(rng.uniform()),
            "reward/mc": float(rng.uniform()),
            "entropy": float(rng.uniform(0.1, 0.3)),
            "aepo/h_low": 0.14,
            "aepo/h_high": 0.25,
            "aepo/negatives_on": float(rng.integers(0, 2)),
            "response_length/mean": float(rng.uniform(5, 50)),
            "loss": float(rng.normal()),
        }
        for _ in steps
    ]


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Read TensorBoard event files as TFRecords (u64 length, u32 crc, payload, u32 crc) of Event protos."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_jsonl_and_tensorboard_hold_every_step(tmp_path):
    rng = np.random.default_rng(0)
    values = _records(rng, range(1, 6))
    writer = MetricsWriter(tmp_path)
    for step, record in enumerate(values, 1):
        writer.write(step, record)
    writer.write(6, {"loss": float("nan")})
    writer.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[2]["entropy"] == values[2]["entropy"] and records[5]["loss"] == "nan"
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")["reward/mean"]
    assert [s[0] for s in scalars] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([s[1] for s in scalars], [v["reward/mean"] for v in values], rtol=1e-6)


def test_resume_drops_the_lost_tail(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(1, 8):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # torn line of a killed process
    resumed = MetricsWriter(tmp_path, resume_step=4)
    for step in range(5, 9):
        resumed.write(step, {"loss": 10.0 * step})
    resumed.close()
    records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 50), (6, 60), (7, 70),
                                                          (8, 80)]  # fmt: skip


def test_bad_metrics_line_names_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_plot_writes_pngs(tmp_path, capsys):
    rng = np.random.default_rng(1)
    with (tmp_path / "metrics.jsonl").open("w") as f:
        for step, record in enumerate(_records(rng, range(1, 21)), 1):
            f.write(json.dumps({"step": step, **record}) + "\n")
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["entropy.png", "length.png", "loss.png", "reward.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 4
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
