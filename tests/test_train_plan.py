"""``qlx plan``: the per-device estimate against XLA's memory analysis of the same compiled RL step (8 fake CPU
devices), the command line, bad input, and (with libtpu installed) an AOT compile for a TPU v5p topology."""

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import jax
import pytest

import qlx
from qlx.cli import main
from qlx.config import ConfigError, config_from_dict, to_dict
from qlx.mesh import axis_rules, make_mesh
from qlx.train import plan
from qlx.train.aot import compiled_stats, lower_train_step, train_shapes

ROOT = Path(__file__).resolve().parents[1]
CPU = plan.Target(plan.Device("XLA:CPU", 2**40, "cpu"), 8)


def _config(*, family="qwen3", layers=2, remat="none", mesh=None, micro_batch=0, attention="reference", **model_kw):
    """An RL config of a tiny model with 200-token prompts and 50-token answers (no files needed to plan)."""
    model = {**to_dict(qlx.load_config(ROOT / "configs/models/tiny-moe.yaml").model), "family": family}
    model.update(vocab_size=512, num_layers=layers, remat=remat, attention=attention, **model_kw)
    return config_from_dict(
        {
            "model": model,
            "mesh": mesh or {"fsdp": -1},
            "train": {"mode": "rl", "batch_size": 4, "micro_batch_size": micro_batch, "run_dir": "/nonexistent"},
            "rl": {"group_size": 2},
            "data": {"train_files": ["/nonexistent.jsonl"], "tokenizer": "/nonexistent", "max_input_tokens": 200,
                     "max_output_tokens": 50},
        }
    )  # fmt: skip


@pytest.mark.parametrize(
    "kw",
    [
        {"remat": "none"},  # every layer's activations and float32 scores saved
        {"remat": "full", "layers": 4},  # layer inputs only, one layer recomputed
        {"family": "qwen3_moe", "remat": "full", "mesh": {"fsdp": 4, "tensor": 2}, "micro_batch": 4},
    ],
    ids=["dense-none", "dense-full-4layers", "moe-full-fsdp4xtensor2-2micro"],
)
def test_estimate_within_15_percent_of_xla_memory_analysis(kw):
    config = _config(**kw)
    estimate = plan.estimate(config, CPU)
    stats = compiled_stats(lower_train_step(config, make_mesh(config.mesh)).compile())
    assert estimate.item("parameters").bytes + estimate.item("optimizer state").bytes < stats.argument_bytes
    assert abs(estimate.train_peak / stats.peak_bytes - 1) < 0.15, (estimate.train_peak, stats)


def test_remat_and_mesh_move_the_estimate_the_way_xla_does():
    """Independent of calibration: remat "full" keeps one [T, D] input per layer instead of every tensor, and a
    tensor axis halves the per-device heads; the estimate orders configs as the arithmetic says."""
    none, full = plan.estimate(_config(remat="none"), CPU), plan.estimate(_config(remat="full"), CPU)
    shapes = train_shapes(_config())
    per_token_input = 64 * 4  # hidden 64, float32
    local_rows = shapes.micro_batch // 8
    kept_full = full.item("activations").bytes - none.item("activations").bytes
    assert kept_full < 0 and full.item("attention scores").bytes < none.item("attention scores").bytes
    layers4 = plan.estimate(_config(remat="full", layers=4), CPU)
    step = layers4.item("activations").bytes - full.item("activations").bytes
    assert step == 2 * local_rows * shapes.length * per_token_input  # two more layer inputs
    tensor = plan.estimate(_config(mesh={"fsdp": 4, "tensor": 2}), CPU)
    assert tensor.mesh["tensor"] == 2
    assert tensor.item("attention scores").bytes < 2 * none.item("attention scores").bytes


def test_expert_parallel_receive_buffer_is_planned():
    """Dropless expert parallelism receives up to EP x its own n·k assignments per device (the worst case): the
    stage-1 v5p plan (16 rows x 32,768 tokens over 64 chips, EP 8, k 8) holds one layer's backward over C = 524,288
    rows, C x (5 x 2048 + 3 x 768) x 2 B = 12.25 GiB, what the v5p compile holds at its peak; a capacity factor
    of 2 cuts C to 2 x n·k, and without an expert axis there is no receive buffer."""
    config = qlx.load_config(ROOT / "configs/qwen3-30b-a3b/tpu-v5p-stage1.yaml")
    sizes = {"data": 1, "fsdp": 2, "expert": 8, "tensor": 1, "seq": 4}
    rules = axis_rules(config.mesh.rules)
    tokens = 16 * 32768
    assert plan.expert_parallel_rows(config, sizes, rules, tokens) == 8 * (tokens // 64) * 8
    capped = dataclasses.replace(config, model=dataclasses.replace(config.model, moe_capacity_factor=2.0))
    assert plan.expert_parallel_rows(capped, sizes, rules, tokens) == 2 * (tokens // 64) * 8
    assert plan.expert_parallel_rows(config, {**sizes, "expert": 1, "fsdp": 16}, rules, tokens) == 0
    moe = plan.estimate(config, plan.parse_topology("v5p:4x4x4")).item("MoE buffers").bytes
    assert moe > 524288 * (5 * 2048 + 3 * 768) * 2


def test_cli_table_json_and_exit_codes(capsys):
    stage1 = str(ROOT / "configs/qwen3-30b-a3b/tpu-v5p-stage1.yaml")
    assert main(["plan", "--config", stage1, "--topology", "v5p:4x4x4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    mesh = out["mesh"]
    assert out["fits"] and (mesh["fsdp"], mesh["expert"], mesh["seq"]) == (2, 8, 4) and out["remat"] == "full"
    params = next(i for i in out["items"] if i["name"] == "parameters")["bytes"]
    assert abs(params * 64 / 4 - 30.53e9) / 30.53e9 < 0.01  # 30.53 B float32 parameters over 64 chips
    assert out["peak_bytes"] == max(out["train_peak_bytes"], out["rollout_peak_bytes"])

    stage3 = str(ROOT / "configs/qwen3-30b-a3b/gpu-8xh100-stage3.yaml")
    assert main(["plan", "--config", stage3, "--device", "h100", "--devices", "8"]) == 3
    text = capsys.readouterr().out
    assert "GPU plan: an estimate" in text and "DOES NOT FIT" in text
    assert "fix: rollouts are over" in text and "sequences per call instead of 1024" in text
    wave = re.search(r"rollout\.max_sequences=(\d+)", text).group(1)  # the advice, taken: the rollouts then fit
    argv = ["plan", "--config", stage3, "--device", "h100", "--devices", "8", "--set", f"rollout.max_sequences={wave}"]
    main(argv)
    text = capsys.readouterr().out
    assert f"{wave} sequences per call" in text and "rollouts are over" not in text


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--topology", "v9x:2x2"], "--topology 'v9x:2x2'"),
        (["--topology", "v5p:2xQ"], "--topology 'v5p:2xQ'"),
        (["--device", "a100"], "--device 'a100'"),
        (["--topology", "v5p:2x2x2", "--set", "mesh.fsdp=3"], "mesh"),
        (["--topology", "v5p:2x2x2", "--set", "model.remat=sometimes"], "model.remat"),
    ],
)
def test_bad_input_names_the_key(capsys, argv, names):
    config = str(ROOT / "configs/qwen3-30b-a3b/tpu-v5p-stage1.yaml")
    assert main(["plan", "--config", config, *argv]) == 2
    assert names in capsys.readouterr().err


def test_bad_mesh_raises_config_error():
    with pytest.raises(ConfigError, match="mesh"):
        plan.estimate(_config(mesh={"fsdp": 3}), CPU)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install -e .[tpu-aot])")
def test_tpu_v5p_aot_compile_of_tiny_step(monkeypatch):
    """The tiny RL step compiled for a v5p:2x2x1 slice from this CPU host, with flash attention: the program calls
    the Mosaic kernel, and its arguments hold at least the estimated parameters and Adam moments. (Tiny dimensions
    pad to TPU tiles, so the estimate's activations are not compared here; the 30B table in
    configs/qwen3-30b-a3b/README.md is.)"""
    from jax.experimental import topologies

    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    except jax.errors.JaxRuntimeError as e:  # another process on this machine holds libtpu's lock
        if "lockfile" not in str(e):
            raise
        pytest.skip(f"libtpu is in use by another process: {e}")
    config = _config(family="qwen3_moe", remat="full", attention="flash", head_dim=64)  # Mosaic: 64 or 128k
    lowered = lower_train_step(config, make_mesh(config.mesh, devices=devices), platform="tpu")
    stats = compiled_stats(lowered.compile())
    estimate = plan.estimate(config, plan.parse_topology("v5p:2x2x1"))
    assert "tpu_custom_call" in lowered.as_text()  # the Mosaic flash kernel (forward and backward)
    assert stats.flops > 0
    assert stats.argument_bytes >= estimate.item("parameters").bytes + estimate.item("optimizer state").bytes
