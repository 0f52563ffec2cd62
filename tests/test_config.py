"""Typed configs: every shipped YAML loads, overrides apply, and bad values fail naming the key."""

import dataclasses
from pathlib import Path

import pytest

import qlx
from qlx.config import ConfigError, ModelConfig, config_from_dict, parse_override, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


PIPELINES = {p for p in CONFIGS.rglob("*.yaml") if p.name == "pipeline.yaml" or p.name.endswith("-pipeline.yaml")}


@pytest.mark.parametrize(
    "path", sorted(set(CONFIGS.rglob("*.yaml")) - PIPELINES), ids=lambda p: str(p.relative_to(CONFIGS))
)
def test_every_shipped_config_loads(path):
    config = qlx.load_config(path)
    assert isinstance(config, qlx.Config)


@pytest.mark.parametrize("path", sorted(PIPELINES), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_pipeline_loads(path):
    from qlx.train.pipeline import load_pipeline

    assert load_pipeline(path).stages


def test_qwen3_30b_a3b_is_the_published_architecture():
    m = qlx.load_config(CONFIGS / "models/qwen3-30b-a3b.yaml").model
    published = dict(
        family="qwen3_moe", num_layers=48, hidden_size=2048, num_heads=32, num_kv_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, moe_intermediate_size=768, rope_theta=1e7,
        vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=262144, rms_norm_eps=1e-6,
        decoder_sparse_step=1, mlp_only_layers=(), rope_scaling=None,
    )  # fmt: skip
    assert {k: getattr(m, k) for k in published} == published
    assert all(m.is_moe_layer(i) for i in range(m.num_layers))


def test_overrides_are_typed_and_nested(tmp_path):
    config = qlx.load_config(
        CONFIGS / "models/tiny-moe.yaml",
        ["model.num_layers=4", "model.mlp_only_layers=[0, 2]", "model.rope_scaling={factor: 2.0}", "mesh.fsdp=2"],
    )
    assert config.model.num_layers == 4
    assert config.model.mlp_only_layers == (0, 2)
    assert config.model.rope_scaling.factor == 2.0 and config.model.rope_scaling.beta_fast == 32.0
    assert config.mesh.fsdp == 2


def test_include_merges_and_later_keys_win(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {num_layers: 3, hidden_size: 32}\nseed: 1\n")
    (tmp_path / "run.yaml").write_text("include: base.yaml\nmodel: {family: qwen3, num_layers: 5, head_dim: 8}\n")
    config = qlx.load_config(tmp_path / "run.yaml")
    assert (config.model.num_layers, config.model.hidden_size, config.seed) == (5, 32, 1)


def test_include_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        qlx.load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("model.num_kv_heads=3", "model.num_kv_heads", "valid values: 1, 2, 4"),
        ("model.num_experts_per_tok=9", "model.num_experts_per_tok", r"\[1, num_experts=8\]"),
        ("model.nmu_layers=2", "model.nmu_layers", "valid keys of ModelConfig"),
        ("model.num_layers=two", "model.num_layers", "expected an integer"),
        ("model.norm_topk_prob=1", "model.norm_topk_prob", "true or false"),
        ("model.attention=flashy", "model.attention", "'reference', 'flash', 'ring'"),
        ("model.mlp_only_layers=[0, 7]", "model.mlp_only_layers", r"\[7\] outside \[0, 2\)"),
        ("model.rope_scaling={factor: 0.5}", "model.rope_scaling.factor", ">= 1"),
        ("mesh.data=0", "mesh.data", "positive integer or -1"),
        ("mesh.data=-1", "mesh.fsdp", "only one mesh axis may be -1"),
        ("seed=1.5", "seed", "expected an integer"),
        ("seed=-1", "seed", r"must be in \[0, 2\*\*63\) \(got -1\)"),
        ("train.optimizer.learning_rate=.inf", "train.optimizer.learning_rate", "finite number .got inf"),
        ("train.optimizer.learning_rate=.nan", "train.optimizer.learning_rate", "finite number .got nan"),
        ("train.optimizer.learning_rate=-1e-6", "train.optimizer.learning_rate", "must be positive"),
        ("train.optimizer.grad_clip=-.inf", "train.optimizer.grad_clip", "finite number"),
        ("rollout.temperature=.inf", "rollout.temperature", "finite number"),
        ("rl.h_high=.nan", "rl.h_high", "finite number"),
        ("model.rope_theta=.inf", "model.rope_theta", "finite number"),
        ("model.rope_scaling={factor: .inf}", "model.rope_scaling.factor", "finite number"),
        ("data.max_input_tokens=8", "data.max_input_tokens", "must be >= 16"),
        ("data.max_pass_rate=.nan", "data.max_pass_rate", "finite number"),
    ],
)
def test_bad_values_name_the_key(override, key, hint):
    with pytest.raises(ConfigError, match=hint) as info:
        qlx.load_config(CONFIGS / "models/tiny-moe.yaml", [override])
    assert info.value.key == key
    assert str(info.value).startswith(key + ":")


@pytest.mark.parametrize("bad", ["model.num_layers", "=3", "model..x=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        qlx.load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        qlx.load_config(tmp_path / "bad.yaml")


def test_dict_round_trip():
    config = qlx.load_config(CONFIGS / "models/tiny-moe.yaml", ["model.mlp_only_layers=[1]"])
    assert config_from_dict(to_dict(config)) == config


def test_is_moe_layer_follows_hugging_face():
    base = dict(family="qwen3_moe", num_layers=6, num_experts=4, num_experts_per_tok=2, intermediate_size=8)
    every_other = ModelConfig(**base, decoder_sparse_step=2)
    assert [every_other.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
    mlp_only = ModelConfig(**base, mlp_only_layers=(0, 3))
    assert [mlp_only.is_moe_layer(i) for i in range(6)] == [False, True, True, False, True, True]
    dense = dataclasses.replace(mlp_only, family="qwen3")
    assert not any(dense.is_moe_layer(i) for i in range(6))
