"""Run configs: the recipe's stages, the Qwen3-30B-A3B platform sets and the demo load; every key is documented."""

import dataclasses
import math
import re
from pathlib import Path

import pytest

import qlx
from qlx import config as config_module
from qlx.demo import FULL

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_stages_follow_the_recipe_curriculum():
    limits = [(20480, 12288), (61440, 20480), (122880, 51200)]
    for i, (max_in, max_out) in enumerate(limits, 1):
        c = qlx.load_config(CONFIGS / f"stages/stage{i}.yaml")
        assert (c.data.max_input_tokens, c.data.max_output_tokens) == (max_in, max_out)
        assert c.train.init_from == (None if i == 1 else f"runs/stage{i - 1}")
        assert c.data.refilter_k > 0 and 0 < c.data.min_pass_rate <= c.data.max_pass_rate < 1
        assert (c.train.mode, c.train.batch_size, c.rl.group_size) == ("rl", 128, 8)
        assert (c.train.optimizer.learning_rate, c.train.optimizer.grad_clip, c.rl.advantage) == (2e-6, 1.0, "task")
        assert (c.rollout.temperature, c.rollout.top_p, c.rl.updates_per_batch) == (0.7, 0.95, 1)


@pytest.mark.parametrize(("platform", "devices"), [("gpu-8xh100", 8), ("tpu-v5p", 64)])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_qwen3_30b_a3b_platform_stages(platform, devices, stage):
    c = qlx.load_config(CONFIGS / f"qwen3-30b-a3b/{platform}-stage{stage}.yaml")
    assert math.prod(c.mesh.sizes().values()) == devices
    assert (c.model.num_layers, c.model.num_experts, c.model.hidden_size) == (48, 128, 2048)
    assert (c.model.param_dtype, c.model.dtype, c.model.remat, c.model.attention) == (
        "float32",
        "bfloat16",
        "full",
        "ring",
    )
    if platform == "tpu-v5p":  # expert parallelism, dropless, scanned layers (README.md in the config folder)
        assert c.mesh.rules == {"embed": ["fsdp", "seq", "expert"]} and c.mesh.expert == 8
        assert (c.model.moe_ep_transport, c.model.moe_capacity_factor, c.model.scanned) == ("ragged", None, True)
    else:
        assert c.mesh.rules == {"embed": ["fsdp", "seq"]} and c.mesh.expert == 1
    stage_config = qlx.load_config(CONFIGS / f"stages/stage{stage}.yaml")
    assert c.data == stage_config.data and c.rl == stage_config.rl
    expected = "checkpoints/Qwen3-30B-A3B-Thinking-2507" if stage == 1 else f"runs/stage{stage - 1}"
    assert c.train.init_from == expected


def test_demo_configs_chain_sft_into_rl():
    sft, rl = qlx.load_config(CONFIGS / "demo/sft.yaml"), qlx.load_config(CONFIGS / "demo.yaml")
    assert (sft.train.mode, rl.train.mode) == ("sft", "rl")
    assert rl.train.init_from == sft.train.run_dir and sft.model == rl.model and sft.data == rl.data
    # the files run as plain `qlx train` on what `qlx demo` synthesised: the same task types and batch
    assert rl.model.family == "qwen3_moe" and rl.data.task_types == FULL.task_types
    assert (rl.train.steps, rl.train.batch_size) == (FULL.rl_steps, FULL.rl_batch) and sft.train.steps == FULL.sft_steps


def _documented_names(doc: str) -> set[str]:
    """Names at the start of docstring lines of the form ``name: ...`` or ``a, b, c: ...``."""
    names = set()
    for line in doc.splitlines():
        match = re.match(r"\s*([a-z_][a-z0-9_]*(?:,\s*[a-z_][a-z0-9_]*)*):\s", line)
        if match:
            names.update(n.strip() for n in match.group(1).split(","))
    return names


def _config_classes():
    return [
        obj
        for obj in vars(config_module).values()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == config_module.__name__
    ]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_config_key_is_documented(cls):
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in _documented_names(cls.__doc__ or "")]
    assert not missing, f"{cls.__name__} docstring does not document {missing}"
