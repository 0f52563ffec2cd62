"""Kill -9 and SIGTERM at any moment, restart with the same command: the RL run finishes bit-identical to an
uninterrupted one (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from test_train_toydata import make_toy_run

from qlx.config import config_from_dict, to_dict
from qlx.train.checkpoint import Checkpointer

STEPS = 6
TIMING_KEYS = ("tokens_per_s", "step_time_s", "rollout_time_s", "update_time_s")


def _config_file(tmp_path, name):
    data = make_toy_run(tmp_path, n=16, task_types=("dialogue", "numerical"))
    overrides = [
        "train.mode=rl",
        f"train.steps={STEPS}",
        "train.batch_size=4",
        "train.micro_batch_size=6",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=2",
        f"train.run_dir={tmp_path / name}",
        "rl.group_size=4",
        "rl.h_low=5.5",  # random weights: entropy near log(320) = 5.77, so AEPO switches negatives off and on
        "rl.h_high=5.75",
        "rollout.temperature=1.0",
        "data.max_output_tokens=6",
        "mesh.fsdp=2",
    ]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(config_from_dict(data, overrides))))
    return path


def _start(config, env):
    return subprocess.Popen(
        [sys.executable, "-m", "qlx.cli", "train", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.is_file():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
            if steps and max(steps) >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _finish(proc, expect=0):
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == expect, out
    return out


def _final(run_dir):
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    assert ckpt.steps()[-1] == STEPS
    step_dir = run_dir / "checkpoints" / str(STEPS)
    import orbax.checkpoint as ocp

    params = ocp.StandardCheckpointer().restore(step_dir / "params")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        for key in TIMING_KEYS:
            r.pop(key, None)
    return params, records


@pytest.mark.slow
def test_sigkill_and_sigterm_then_restart_is_bitwise_identical(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    plain, interrupted = _config_file(tmp_path, "plain"), _config_file(tmp_path, "interrupted")
    run_dir = tmp_path / "interrupted"
    reference = _start(plain, env)

    first = _start(interrupted, env)
    _wait_for_step(run_dir, 3, first)  # the step-2 checkpoint may still be in flight
    first.send_signal(signal.SIGKILL)
    first.wait()

    second = _start(interrupted, env)
    _wait_for_step(run_dir, 4, second)
    second.send_signal(signal.SIGTERM)
    out = _finish(second, expect=143)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "sigterm" and "checkpoint saved" in out
    assert Checkpointer(run_dir / "checkpoints", read_only=True).steps()[-1] == status["step"]

    out = _finish(_start(interrupted, env))
    assert f"resumed from step {status['step']}" in out
    _finish(reference)

    (params_a, records_a), (params_b, records_b) = _final(tmp_path / "plain"), _final(run_dir)
    assert [r["step"] for r in records_b] == list(range(1, STEPS + 1))
    assert records_a == records_b
    assert any(r["aepo/negatives_on"] == 0 for r in records_a) and any(r["update/tokens"] > 0 for r in records_a)
    leaves_a, leaves_b = jax_leaves(params_a), jax_leaves(params_b)
    assert len(leaves_a) == len(leaves_b) > 0
    for a, b in zip(leaves_a, leaves_b, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
