"""Two processes, one job: ``qlx train`` (SFT and RL) in 2 processes x 4 CPU devices on 127.0.0.1 (``jax.distributed``
from the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables, gloo collectives), one
mesh over both, an orbax checkpoint written from both, a restart that resumes from it; the result against the same
run in one process over 8 devices and (RL) an uninterrupted two-process run (bitwise); then (the RL run)
``qlx.save_hf`` from both processes, and both rollout engines over both processes."""

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

import qlx
from qlx.config import config_from_dict, to_dict
from qlx.train.metrics import read_metrics
from qlx.train.step import Policy
from qlx.train.trainer import load_model

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 900  # a loaded 2-core machine: two JAX processes compile the same step side by side
TIMING_KEYS = ("tokens_per_s", "step_time_s", "rollout_time_s", "update_time_s")
RL = [
    "train.mode=rl",
    "train.batch_size=4",
    "train.micro_batch_size=8",
    "rl.group_size=4",
    "rl.h_low=5.5",  # random weights: entropy near log(320) = 5.77, so AEPO switches negatives off and on
    "rl.h_high=5.75",
    "rollout.temperature=1.0",
    "data.max_output_tokens=6",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], log_dir: Path, name: str, processes: int) -> list[str]:
    """Run ``python *args`` in ``processes`` processes over 8 CPU devices in all (one process: no
    ``jax.distributed``); each must exit 0. Returns their outputs. The one-process run is a subprocess too: the test
    process compiles nothing but the loads (an XLA:CPU compile in a pytest worker that had launched these
    subprocesses crashed once)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # not the test's 8 fake devices
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(8 // processes))
    if processes > 1:
        env.update(JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
                   JAX_NUM_PROCESSES=str(processes), QLX_DISTRIBUTED="auto")  # fmt: skip
    paths = [log_dir / f"{name}-process{k}.log" for k in range(processes)]
    procs, logs = [], [path.open("w") for path in paths]
    for k in range(processes):
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env={**env, "JAX_PROCESS_ID": str(k)} if processes > 1 else env,
                stdout=logs[k],
                stderr=subprocess.STDOUT,
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
    texts = [path.read_text() for path in paths]
    for k, code in enumerate(codes):
        assert code == 0, f"process {k} exited {code}:\n{texts[k][-3000:]}"
    return texts


def _train(config_path: Path, steps: int, log_dir: Path, processes: int = 2) -> str:
    """``qlx train`` for ``steps`` in ``processes`` processes; returns process 0's output."""
    args = ["-m", "qlx.cli", "train", "--config", str(config_path), "--set", f"train.steps={steps}"]
    texts = _launch(args, log_dir, f"{config_path.stem}-{steps}", processes)
    for text in texts:
        assert f"finished step {steps}" in text
    return texts[0]


def _params(config, run_dir):
    model = load_model(config, run_dir)
    return [np.asarray(a) for a in jax.tree.leaves(Policy.split(model)[1])]


def _without_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sft", "rl"])
def test_two_processes_resume_bitwise_match_one_process_and_export(tmp_path, mode):
    data = make_toy_run(tmp_path, n=16, task_types=("dialogue", "numerical"))
    data["train"].update(batch_size=8, steps=4, checkpoint_every=2, async_checkpointing=False)
    data["data"].update(max_input_tokens=192, max_output_tokens=8)
    data["model"]["max_position_embeddings"] = 256
    overrides = RL if mode == "rl" else []
    # the uninterrupted pair ("again") for RL only: SFT's resumed pair is held to the one-process run, whose step-4
    # loss a wrong restored data position would change, and single-process SFT resumes bitwise (test_train_resume)
    names = ("two", "again", "one") if mode == "rl" else ("two", "one")
    configs = {}
    for name in names:
        configs[name] = config_from_dict(data, [*overrides, f"train.run_dir={tmp_path / name}"])
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(to_dict(configs[name])))

    _train(tmp_path / "two.yaml", 3, tmp_path)  # checkpoints 2 and 3, written by both processes
    assert sorted(p.name for p in (tmp_path / "two/checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    resumed = _train(tmp_path / "two.yaml", 4, tmp_path)  # a fresh pair of processes: resumes from 3, runs step 4
    assert "resumed from step 3" in resumed
    if "again" in configs:
        _train(tmp_path / "again.yaml", 4, tmp_path)  # uninterrupted
    _train(tmp_path / "one.yaml", 4, tmp_path, processes=1)  # the same global batch in one process over 8 devices

    metrics = {name: read_metrics(tmp_path / name) for name in configs}
    assert [r["step"] for r in metrics["two"]] == [1, 2, 3, 4]  # one record per step (process 0 writes the folder)
    for a, b in zip(metrics["two"], metrics["one"], strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        if mode == "rl":
            assert a["reward/mean"] == b["reward/mean"]  # the same rollouts
    params = {name: _params(configs[name], tmp_path / name) for name in configs}
    for a, c in zip(params["two"], params["one"], strict=True):
        # gloo sums the gradient in another order than one process does (the losses agree to 1e-5); Adam divides
        # by sqrt(v), so where a gradient is near 0 that rounding moves a weight by up to ~1e-3 of one step (lr 1e-3)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=2e-6)

    if mode == "sft":
        return  # the export and generation below do not depend on how the run was trained
    assert _without_timings(metrics["two"]) == _without_timings(metrics["again"])
    for a, b in zip(params["two"], params["again"], strict=True):
        np.testing.assert_array_equal(a, b)

    # qlx.save_hf from both processes: each writes its share of the shards (1 KiB each: several per process)
    script = str(ROOT / "tests/multihost_export.py")
    _launch([script, str(tmp_path / "two.yaml"), str(tmp_path / "two"), str(tmp_path / "hf"), "1024"], tmp_path,
            "export", 2)  # fmt: skip
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    exported = [np.asarray(a) for a in jax.tree.leaves(Policy.split(qlx.load_hf(tmp_path / "hf"))[1])]
    for a, b in zip(exported, params["two"], strict=True):
        np.testing.assert_array_equal(a, b)

    # both rollout engines on an fsdp 4 x tensor 2 mesh over both processes: the continuous engine gives the static
    # engine's samples (as in one process, tests/test_rollout_continuous.py; the static engine's two-process
    # rollouts are the one-process ones: the RL rewards above)
    script = str(ROOT / "tests/multihost_generate.py")
    _launch([script, str(tmp_path / "two.yaml"), str(tmp_path / "two"), str(tmp_path / "generate.npz")], tmp_path,
            "generate", 2)  # fmt: skip
    out = np.load(tmp_path / "generate.npz")
    assert int(out["processes"]) == 2 and int(out["swapped_out_groups"]) > 0  # a swap's pages read by both
    np.testing.assert_array_equal(out["tokens"], out["static_tokens"])
    np.testing.assert_allclose(out["logprobs"], out["static_logprobs"], atol=1e-5)
