"""Two processes, one job: ``qlx train`` (SFT) in 2 processes x 4 CPU devices on 127.0.0.1 (``jax.distributed`` from
the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables, gloo collectives), one mesh
over both, an orbax checkpoint written from both, a restart that resumes from it; the result against the same run
in one process over 8 devices."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from test_train_toydata import make_toy_run

from qlx.config import config_from_dict
from qlx.train.metrics import read_metrics
from qlx.train.step import Policy
from qlx.train.trainer import load_model, train

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 900  # a loaded 2-core machine: two JAX processes compile the same step side by side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(config_path: Path, steps: int, log_dir: Path) -> None:
    """Run ``qlx train`` for ``steps`` in two processes of 4 CPU devices each; both must exit 0."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # not the test's 8 fake devices
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", QLX_DISTRIBUTED="auto")  # fmt: skip
    command = [sys.executable, "-m", "qlx.cli", "train", "--config", str(config_path), "--set", f"train.steps={steps}"]
    procs, logs = [], []
    for k in range(2):
        logs.append((log_dir / f"process{k}-{steps}.log").open("w"))
        procs.append(
            subprocess.Popen(
                command, cwd=ROOT, env={**env, "JAX_PROCESS_ID": str(k)}, stdout=logs[k], stderr=subprocess.STDOUT
            )
        )
    try:
        codes = [p.wait(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    for k, code in enumerate(codes):
        text = (log_dir / f"process{k}-{steps}.log").read_text()
        assert code == 0, f"process {k} exited {code}:\n{text[-3000:]}"
        assert f"finished step {steps}" in text


def _params(config, run_dir):
    model = load_model(config, run_dir)
    return [np.asarray(a) for a in jax.tree.leaves(Policy.split(model)[1])]


@pytest.mark.slow
def test_two_process_sft_resumes_and_matches_one_process(tmp_path):
    data = make_toy_run(tmp_path, n=16)
    data["train"].update(batch_size=8, steps=4, checkpoint_every=2, async_checkpointing=False)
    data["data"].update(max_input_tokens=192, max_output_tokens=8)
    data["model"]["max_position_embeddings"] = 256
    two = dict(data, train={**data["train"], "run_dir": str(tmp_path / "two")})
    config_path = tmp_path / "two.yaml"
    config_path.write_text(yaml.safe_dump(two))

    _two_processes(config_path, 3, tmp_path)  # checkpoints 2 and 3, written by both processes
    assert sorted(p.name for p in (tmp_path / "two/checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    _two_processes(config_path, 4, tmp_path)  # a fresh pair of processes: resumes from 3, runs step 4
    assert "resumed from step 3" in (tmp_path / "process0-4.log").read_text()

    one = config_from_dict(dict(data, train={**data["train"], "run_dir": str(tmp_path / "one")}))
    assert train(one).step == 4  # the same global batch in one process over 8 devices

    metrics_two, metrics_one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in metrics_two] == [1, 2, 3, 4]  # one record per step (process 0 writes the run folder)
    for a, b in zip(metrics_two, metrics_one, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    # gloo sums the gradient in another order than one process does (the losses agree to 1e-5); Adam divides by
    # sqrt(v), so where a gradient is near 0 that rounding moves a weight by up to ~1e-3 of one step (lr 1e-3)
    config_two = config_from_dict(two)
    for a, b in zip(_params(config_two, tmp_path / "two"), _params(one, tmp_path / "one"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
